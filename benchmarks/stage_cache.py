"""The benchmarks' cache: stages run into a store laid out as `fdm run` lays it out, and served from it.

A stage's output lives at `stages/<kind>/<key>/<version>/` (its files, `_MANIFEST.json` last with the result
inside) and the key's `CURRENT` names the version in use, as pipelines/executor.py writes them; the key is the
pipeline's (config, inputs' keys, declaration version, source of the code the stage runs), so studies that
share a stage compute it once and a change to the code it runs recomputes it. Training resumes from the
product's checkpoints (`checkpoints/<kind>/<key>/`) until the output is complete.
"""

from __future__ import annotations

import posixpath

from pydantic import BaseModel

from infra.manifest import CURRENT, current_version, is_complete, read_manifest
from infra.store import open_store
from pipelines.cache import new_version
from pipelines.plan import stage_key
from tasks.registry import STAGES
from tasks.stage import MetricLogger, StageContext, StageKind, StageResult, run_stage


class Stages:
    """Runs stages in the store at `root` (a local directory), serving a key whose current version is
    complete and made from the same inputs (their manifests' digests); `log_metrics` receives what the
    stages log (a test that interrupts them)."""

    def __init__(self, root: str, log_metrics: MetricLogger | None = None) -> None:
        self.root, self.store = root, open_store(root)
        self.log_metrics = log_metrics

    def key(self, kind: StageKind, cfg: BaseModel, inputs: dict[str, StageResult]) -> str:
        return stage_key(kind, cfg.model_dump(mode="json"), {n: r.key for n, r in inputs.items()})

    def served(self, kind: StageKind, key: str, inputs: dict[str, StageResult]) -> StageResult | None:
        """The key's current output if it is complete and was made from these very inputs, else None."""
        out_root = posixpath.join("stages", kind.name, key)
        prefix = current_version(self.store, out_root)
        if prefix == out_root or not is_complete(self.store, prefix):
            return None
        manifest = read_manifest(self.store, prefix)
        if manifest.result is None or manifest.inputs != {n: r.digest for n, r in inputs.items()}:
            return None
        return StageResult.from_record(manifest.result, self.store, manifest.digest)

    def __call__(self, kind: StageKind | str, cfg: BaseModel, **inputs: StageResult) -> StageResult:
        """The stage's result: served from the store, else computed into a new version made current."""
        kind = STAGES[kind] if isinstance(kind, str) else kind
        key = self.key(kind, cfg, inputs)
        hit = self.served(kind, key, inputs)
        if hit is not None:
            return hit
        out_root, version = posixpath.join("stages", kind.name, key), new_version()
        ctx = StageContext(self.root, posixpath.join(out_root, version), key=key, num_threads=1)
        if self.log_metrics is not None:
            ctx.log_metrics = self.log_metrics
        uris = {n: r.output_uri for n, r in inputs.items()}
        digests = {n: r.digest for n, r in inputs.items()}
        result = run_stage(kind, cfg, ctx, input_digests=digests, **uris)
        self.store.write_bytes(posixpath.join(out_root, CURRENT), version.encode())
        return result
