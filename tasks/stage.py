"""The stage contract: how a stage kind is declared, what its function receives and returns, and the one
edge (`run_stage`) where its outputs reach the artifact store.

A stage function is plain Python, `fn(cfg, ctx, **inputs) -> StageResult`: it reads its inputs (store URIs,
by name) and writes its files into the local staging directory `ctx.out_dir`, never into the store.
`run_stage` then uploads them and writes the manifest last, with the result inside it, so a failed stage
leaves nothing complete-looking and a served result is covered by the same digests as the files.
This module is torch-free: planning and cache checks import it without the stages' heavy code.
"""

from __future__ import annotations

import importlib
import posixpath
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from infra.store import S3Settings

# Every config model: unknown keys refused; numbers and booleans strict (YAML gives real ints, floats and
# bools, so `steps: true` or `steps: "3"` is an error, not 1 or 3; an int is still a valid float); floats
# finite (`lr: .inf` and `.nan` refused).
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

MetricLogger = Callable[[dict[str, float], int], None]


class BadInputError(ValueError):
    """The stage's input is unusable (not a bug, not an outage): the user fixes it, `fdm` exits 2."""


def _no_log(metrics: dict[str, float], step: int) -> None:
    """Default logger: stages run without tracking (tests, plain Python use)."""


@dataclass(frozen=True)
class AutoNode:
    """How the planner adds a kind's one node by itself, named after the kind, with its config at `section`
    of the pipeline config: `required` sections must be given; otherwise `default` makes the section's value
    when the config omits it (None: the section is optional and absent means no node). The node is added
    when `when(pipeline config)` holds (default: its section is set); it also answers to `provides`, and
    `bind(section config)` says which node feeds each input (default: the node answering to its name).
    `description` documents the section in the config reference."""

    section: str
    description: str = ""
    provides: str = ""
    required: bool = False
    default: Callable[[], BaseModel] | None = None
    when: Callable[[Any], bool] | None = None
    bind: Callable[[Any], dict[str, str]] | None = None


@dataclass(frozen=True)
class StageKind:
    """One declaration per stage kind; planner, executor, tables and MLflow tags all read it.

    `inputs` maps each input name to the artifact kind it takes (a trailing "?" marks it optional); the
    planner feeds each from the node answering to that name (tasks/graph.py). `output` names the one
    artifact the stage writes. `version` is bumped by hand when the stage's meaning changes; together with a
    hash of the project modules `run` imports it enters the stage's cache key. `resources` names the group
    in the pipeline's `resources` config, `default_resources` that group's (num_cpus, num_gpus) when the
    config omits it; `headline` the metric shown for it; `auto` (optional) how the planner adds the kind's
    one node by itself (kinds without it get their nodes from a policy); `total_steps` (optional) how many
    progress steps a config implies; `coordinates` (optional) whether a config makes the stage's task only
    coordinate workers that hold the resources (data-parallel training)."""

    name: str
    config: type[BaseModel]
    run: str
    inputs: Mapping[str, str]
    output: str
    resources: str
    headline: str
    version: str
    default_resources: tuple[float, float] = (1.0, 0.0)
    auto: AutoNode | None = None
    total_steps: Callable[[Any], int | None] | None = None
    coordinates: Callable[[Any], bool] | None = None

    @property
    def module(self) -> str:
        return self.run.partition(":")[0]

    def function(self) -> Callable[..., StageResult]:
        """The stage function (imports its module, with torch and the rest, on first use)."""
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)

    def required_inputs(self) -> list[str]:
        return [n for n, k in self.inputs.items() if not k.endswith("?")]


@dataclass
class StageContext:
    """Where a stage writes and how it reports.

    `store_uri` is the artifact store root (local dir or s3://bucket/prefix); `out_prefix` the directory
    inside it that `run_stage` fills with what the function left in `out_dir` (a local staging directory);
    `checkpoints` the store prefix for resumable training state, kept only while the stage is unfinished;
    `s3` how every store the stage opens reaches S3 (endpoint, timeouts, retries: the run's `store.*`);
    `placement_timeout` how long a placement the stage asks for (Picard's actors) may wait for resources
    that exist but are in use.
    """

    store_uri: str
    out_prefix: str
    key: str = "adhoc"
    num_threads: int = 1
    device: str = "cpu"
    log_metrics: MetricLogger = _no_log
    s3: S3Settings | None = None
    placement_timeout: float = 60.0
    out_dir: Path | None = None
    checkpoints: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def output_path(self, name: str) -> Path:
        """Local path of output file `name` (may contain "/") in the staging directory."""
        if self.out_dir is None:
            raise RuntimeError("out_dir: a stage function runs through run_stage, which stages its outputs")
        path = self.out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class StageResult:
    """A stage's small, picklable outcome: output URIs, headline metrics and identity.

    `outputs` holds absolute URIs for this process; what is persisted (in the manifest) is relative to the
    store root, so a store can be moved."""

    stage: str
    key: str
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    run_id: str | None = None
    digest: str = ""

    @property
    def output_uri(self) -> str:
        """The URI of the stage's one output."""
        (uri,) = self.outputs.values()
        return uri

    def record(self, prefix: str) -> dict[str, Any]:
        """What the manifest keeps of this result: outputs as the store-relative prefix; no run id, no
        cache flag, no digest (the manifest's own)."""
        doc = asdict(self)
        doc["outputs"] = {name: prefix for name in self.outputs}
        for runtime in ("cached", "run_id", "digest"):
            doc.pop(runtime)
        return doc

    @classmethod
    def from_record(cls, doc: dict[str, Any], store: Any, digest: str) -> StageResult:
        """A result served from a manifest (of digest `digest`) in `store`: relative outputs made absolute."""
        outputs = {name: store.uri(prefix) for name, prefix in doc["outputs"].items()}
        return cls(**{**doc, "outputs": outputs}, cached=True, digest=digest)


def run_stage(
    kind: StageKind,
    cfg: BaseModel,
    ctx: StageContext,
    *,
    producer: dict[str, Any] | None = None,
    input_digests: dict[str, str] | None = None,
    **inputs: str | None,
) -> StageResult:
    """Run the stage function of `kind` with a fresh staging directory, then persist its outputs at
    `ctx.out_prefix` (manifest last, the result inside it) and drop its training checkpoints: the stage is
    complete. Nothing reaches the store if the function raises, so an earlier output there stays intact."""
    from infra.manifest import clear_output, seal_dir
    from infra.store import open_store

    if not ctx.out_prefix.strip("/"):
        raise ValueError("out_prefix: must name a directory inside the store (it is replaced by the output)")
    ctx.checkpoints = ctx.checkpoints or posixpath.join("checkpoints", kind.name, ctx.key)
    store = open_store(ctx.store_uri, ctx.s3)
    with tempfile.TemporaryDirectory(prefix=f"fdm-{kind.name}-") as tmp:
        ctx.out_dir = Path(tmp)
        result = kind.function()(cfg, ctx, **inputs)
        result.stage, result.key = kind.name, ctx.key
        result.outputs = {kind.output: store.uri(ctx.out_prefix)}
        clear_output(store, ctx.out_prefix)
        result.digest = seal_dir(
            store,
            tmp,
            ctx.out_prefix,
            {"stage": kind.name, "key": ctx.key, **(producer or {})},
            result=result.record(ctx.out_prefix),
            inputs=input_digests,
        ).digest
    store.delete_prefix(ctx.checkpoints)
    return result
