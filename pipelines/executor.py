"""Executing one stage: skip it, serve it from the cache, or compute it inside an MLflow child run.

The cache check reads manifests only: a stage is a hit when its key's current output has a complete
manifest (every listed file present at its recorded size) whose recorded input digests equal the current
digests of the outputs it consumes; the bytes are verified when a consumer reads them. A computation
writes a new immutable version directory (`stages/<kind>/<key>/<version>/`) through `run_stage`, then
switches the key's CURRENT pointer to it, so a failure never disturbs the previous complete output.
Before computing, a stage claims its key with a lease (infra/lease.py): a second run of the same config
waits for the first's output instead of computing it again. A consumer that finds an input's bytes differ
from its manifest quarantines that input's version (`_CORRUPT.json` written beside it, the key's CURRENT
and checkpoints removed) and fails with CorruptInputError: the producer is then recomputed from scratch,
and everything downstream misses, since the inputs it recorded no longer match.
This module is torch-free; the stage functions are imported only where a stage computes.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from infra.lease import LEASE_NAME, Lease, acquire_or_wait
from infra.manifest import (
    CURRENT,
    MANIFEST_NAME,
    CorruptOutputError,
    IncompleteOutputError,
    Manifest,
    check_present,
    read_manifest,
)
from infra.store import ArtifactStore, NotFoundError, StoreError, open_store
from infra.tracking import Tracking
from pipelines.headlines import stage_note
from pipelines.plan import Gate, StageSpec
from tasks.registry import STAGES
from tasks.stage import StageContext, StageResult, run_stage
from tasks.stages.distill_round import passes_quality_gate

# The project's packages, shipped with every logged MLflow model so it loads and serves on its own.
CODE_PATHS = [str(Path(__file__).resolve().parent.parent / p) for p in ("fdm_core", "infra", "tasks")]
CORRUPT_NOTE = "_CORRUPT.json"


class CorruptInputError(StoreError):
    """An input's bytes differ from its manifest: `producer` (a stage name) is recomputed from scratch."""

    def __init__(self, message: str, producer: str) -> None:
        super().__init__(message, producer)  # all in args: it pickles across Ray
        self.producer = producer

    def __str__(self) -> str:
        return self.args[0]


def warm_worker() -> None:
    """Ray's worker start-up hook for the pipeline: importing the stage functions (torch, every stage) is
    the work, done while the worker waits in Ray's pool rather than when the first stage reaches it."""
    for kind in STAGES.values():
        kind.function()


@dataclass(frozen=True)
class RunEnv:
    """Everything a worker needs besides the stage: store, tracking, parent run, device policy."""

    store_root: str
    endpoint_url: str | None
    tracking: Tracking
    parent_run_id: str
    use_gpu: bool = False
    board: Any = None
    rerun: bool = False
    lease_timeout: float = 120.0
    store_env: dict[str, str] = field(default_factory=dict)  # S3 timeouts and retries (S3Settings.env)

    def store(self) -> ArtifactStore:
        os.environ.update(self.store_env)  # before a store is opened: a Ray worker gets them here
        return open_store(self.store_root, self.endpoint_url)


def _report(env: RunEnv, name: str, **fields: Any) -> None:
    if env.board is not None:
        env.board.report.remote(name, **fields)


def current_output(store: ArtifactStore, spec: StageSpec) -> tuple[str, Manifest] | None:
    """The version directory and manifest of the key's current complete output, or None; a listed file
    that is missing or has the wrong size makes it incomplete (one listing, no file read)."""
    try:
        version = store.read_bytes(posixpath.join(spec.out_root, CURRENT)).decode().strip()
    except NotFoundError:
        return None
    prefix = posixpath.join(spec.out_root, version)
    try:
        return prefix, check_present(store, prefix)
    except (IncompleteOutputError, CorruptOutputError):
        return None


def input_digests(spec: StageSpec, ups: dict[str, StageResult]) -> dict[str, str]:
    """The digests of the outputs this stage consumes, by input name."""
    return {name: ups[stage].digest for name, stage in spec.inputs.items()}


def serve(store: ArtifactStore, spec: StageSpec, ups: dict[str, StageResult]) -> StageResult | None:
    """The stage's result from the cache, if its current output was made from these very inputs."""
    found = current_output(store, spec)
    if found is None:
        return None
    prefix, manifest = found
    if manifest.result is None or manifest.inputs != input_digests(spec, ups):
        return None
    result = StageResult.from_record(manifest.result, store, manifest.digest)
    result.info["output_version"] = posixpath.basename(prefix)
    return result


def skip_reason(spec: StageSpec, ups: dict[str, StageResult]) -> str | None:
    """Why this stage must not run: an upstream stage was skipped, or its quality gate stopped halving."""
    for name, r in ups.items():
        if r.info.get("skipped"):
            return f"upstream {name} skipped"
    if spec.gate is not None:
        failure = gate_failure(spec.gate, ups[spec.gate.student], ups[spec.gate.teacher])
        return f"{failure}; halving stops" if failure else None
    return None


def gate_failure(gate: Gate, student: StageResult, reference: StageResult) -> str | None:
    """Why evaluation `student` fails `gate` against evaluation `reference` (None: it passes)."""
    value = student.metrics.get("quality", float("nan"))
    by_sampler = reference.info.get("by_sampler", {})
    ref_metrics = by_sampler.get(gate.teacher_sampler, {}) if gate.teacher_sampler else reference.metrics
    ref = ref_metrics.get("quality", float("nan"))
    if passes_quality_gate(value, ref, gate.factor):
        return None
    metric = student.info.get("metric_name", "quality")
    return f"quality gate: {gate.student} {metric} {value:.4g} > {gate.factor} x {gate.teacher} {ref:.4g}"


def skipped(spec: StageSpec, reason: str) -> StageResult:
    return StageResult(spec.kind, spec.key, info={"skipped": reason, "name": spec.name})


def stage_tags(spec: StageSpec, env: RunEnv, state: str) -> dict[str, str]:
    """The tags of a stage's child run, from its spec and declaration."""
    tags = {
        "stage": spec.name,
        "kind": spec.kind,
        "key": spec.key,
        "version": spec.decl.version,
        "headline": spec.decl.headline,
        "round": spec.round,
        "steps": spec.steps,
        "rerun": env.rerun or None,
        "cached": str(state == "cached").lower(),
        "skipped": "true" if state == "skipped" else None,
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


def node_tags() -> dict[str, str]:
    """The Ray node this process runs on (`fdm.node_id`, `fdm.node_ip`); empty outside Ray."""
    ray = sys.modules.get("ray")  # imported by every Ray worker; never imported here just to ask
    if ray is None or not ray.is_initialized():
        return {}
    return {
        "fdm.node_id": ray.get_runtime_context().get_node_id(),
        "fdm.node_ip": ray.util.get_node_ip_address(),
    }


def log_inputs(env: RunEnv, run_id: str, spec: StageSpec, ups: dict[str, StageResult]) -> None:
    """What a stage consumed, on its run: every input as tags (`fdm.input.<name>`: the output's digest and
    URI); the dataset as an MLflow dataset input; a model input as an MLflow model input when that model
    was logged by this pipeline run (a cached teacher's model is known by its tags only)."""
    tags = {}
    for name, stage in spec.inputs.items():
        up = ups[stage]
        tags |= {f"fdm.input.{name}": up.digest[:16], f"fdm.input.{name}.uri": up.output_uri}
    env.tracking.set_tags(run_id, tags)
    if "dataset" in spec.inputs:
        data = ups[spec.inputs["dataset"]]
        env.tracking.log_dataset(run_id, data.output_uri, spec.inputs["dataset"], data.digest)
    models = [
        ups[stage].info["model_uri"] for stage in spec.inputs.values() if "model_uri" in ups[stage].info
    ]
    if models:
        env.tracking.log_model_inputs(run_id, [uri.removeprefix("models:/") for uri in models])


def params(spec: StageSpec) -> dict[str, Any]:
    """A stage's config as MLflow params, under its path in the pipeline config (as the parent logs it)."""
    return {spec.section: spec.config} if spec.section else spec.config


def record_resolved(
    env: RunEnv, spec: StageSpec, result: StageResult, ups: dict[str, StageResult]
) -> StageResult:
    """Log a stage that did not compute (served from the cache, or skipped) as a finished child run."""
    state = "skipped" if result.info.get("skipped") else "cached"
    tags = stage_tags(spec, env, state)
    if state == "skipped":
        tags["skip_reason"] = result.info["skipped"]
        result.run_id = env.tracking.record_child(env.parent_run_id, spec.name, tags)
    else:  # the output it reuses, linked: which key's which version
        tags.update(output_uri=result.output_uri, **result.info.get("tags", {}))
        tags["output_version"] = result.info.get("output_version", "")
        result.run_id = env.tracking.record_child(
            env.parent_run_id, spec.name, tags, params(spec), result.metrics
        )
    return result


def new_version() -> str:
    """A fresh, sortable version directory name for one computation of a key."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def execute_stage(spec: StageSpec, env: RunEnv, force: bool, *upstream: StageResult) -> StageResult:
    """Ray task body: skip, serve from the cache or compute `spec`, recorded as a child run of the pipeline.

    The result carries this task's wall-clock span (info["task_span"]) and, when the stage function ran,
    its span too (info["compute_span"]), so the driver can line the stages up."""
    began = time.time()
    ups = dict(zip(spec.upstream, upstream))
    reason = skip_reason(spec, ups)
    store = env.store()
    if reason:
        result = record_resolved(env, spec, skipped(spec, reason), ups)
        _report(env, spec.name, state="skipped", note=reason)
    elif not force and (hit := serve(store, spec, ups)) is not None:
        result = record_resolved(env, spec, hit, ups)
        _report(env, spec.name, state="cached", seconds=0.0)
    else:
        result = compute(spec, env, store, ups, fresh=force)
    result.info["task_span"] = [began, time.time()]
    return result


def compute(
    spec: StageSpec, env: RunEnv, store: ArtifactStore, ups: dict[str, StageResult], fresh: bool
) -> StageResult:
    """Claim the stage's key, then compute it into a new version and make that version current (the
    previous version stays as it was); if another run holds the key, wait for its output and serve it
    instead (recorded as cached). If the previous version was made from the same inputs and its files
    differ from the new ones (a non-deterministic stage), the result and the child run say so
    (`fdm.output_differs`).

    `fresh` (a forced re-run) first drops the key's training checkpoints, so nothing is resumed."""
    owner = {"run": env.parent_run_id, "stage": spec.name}
    lease = Lease(store, posixpath.join(spec.out_root, LEASE_NAME), env.lease_timeout, owner)

    def waiting(holder: dict[str, Any]) -> None:
        who = f"run {holder.get('run', '?')}, pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        note = f"waiting for {who}"
        _report(env, spec.name, state="waiting", note=note)

    hit = acquire_or_wait(lease, lambda: None if fresh else serve(store, spec, ups), waiting)
    if hit is not None:
        result = record_resolved(env, spec, hit, ups)
        _report(env, spec.name, state="cached", seconds=0.0)
        return result
    try:
        return _compute(spec, env, store, ups, fresh)
    finally:
        lease.release()


def _compute(
    spec: StageSpec, env: RunEnv, store: ArtifactStore, ups: dict[str, StageResult], fresh: bool
) -> StageResult:
    decl, tracking = spec.decl, env.tracking
    checkpoints = posixpath.join("checkpoints", spec.kind, spec.key)
    if fresh:
        store.delete_prefix(checkpoints)
    previous = current_output(store, spec)
    attempt = tracking.attempts(env.parent_run_id, spec.name) + 1
    where = node_tags()
    lost = f"its worker or node {{node}} was lost; the stage was retried as attempt {attempt}"
    tracking.close_stale(env.parent_run_id, spec.name, reason=lost)
    node = where.get("fdm.node_id", "")[:8]
    _report(env, spec.name, state="running", pid=os.getpid(), attempt=attempt, node=node)
    num_cpus = max(1, int(spec.resources.get("num_cpus", 1)))
    cfg = decl.config.model_validate(spec.config)
    total = decl.total_steps(cfg) if decl.total_steps else None
    version = new_version()
    device = "cuda" if env.use_gpu and spec.resources.get("num_gpus", 0) > 0 else "cpu"
    tags = {**stage_tags(spec, env, "computed"), **where, "fdm.attempt": str(attempt)}
    with tracking.child_run(env.parent_run_id, spec.name, tags) as run_id:
        tracking.log_params(run_id, {**params(spec), "resolved": {"device": device, "num_threads": num_cpus}})
        log_inputs(env, run_id, spec, ups)
        logged: dict[str, int] = {}  # metric key -> last step the stage logged it at
        links = metric_links(env, spec, ups)

        def log_metrics(metrics: dict[str, float], step: int) -> None:
            # An evaluation logs its headline sampler first: only those values go on the model, so the
            # model's metrics are its headline numbers, not whichever sampler was logged last.
            tracking.log_metrics(run_id, metrics, step, **({} if logged else links))
            logged.update(dict.fromkeys(metrics, step))
            _report(env, spec.name, step=step, total=total)

        ctx = StageContext(
            store_uri=env.store_root,
            out_prefix=posixpath.join(spec.out_root, version),
            key=spec.key,
            num_threads=num_cpus,
            device=device,
            log_metrics=log_metrics,
            endpoint_url=env.endpoint_url,
            checkpoints=checkpoints,
        )
        inputs = {name: ups[stage].output_uri for name, stage in spec.inputs.items()}
        t0, computing = time.perf_counter(), time.time()
        try:
            result = run_stage(
                decl,
                cfg,
                ctx,
                producer={"stage_name": spec.name, "version": decl.version},
                input_digests=input_digests(spec, ups),
                **inputs,
            )
        except BaseException as err:
            corrupt = _corrupt_cause(err)
            if corrupt is not None:
                err = quarantine(store, spec, ups, corrupt) or err
                tracking.set_tags(run_id, {"corrupt_input": corrupt.uri})
            _report(env, spec.name, state="failed", error=f"{type(err).__name__}: {err}")
            tracking.set_tags(run_id, {"fdm.end_reason": f"{type(err).__name__}: {err}"[:5000]})
            if isinstance(err, CorruptInputError):
                raise err from corrupt
            raise
        seconds = time.perf_counter() - t0
        store.write_bytes(posixpath.join(spec.out_root, CURRENT), version.encode())
        result.info.update({"name": spec.name, "seconds": seconds, "compute_span": [computing, time.time()]})
        result.run_id = run_id
        result.info["output_version"] = version
        # Summaries the stage did not log as a series: one value each, logged once (MLflow's step 0).
        summary = {k: v for k, v in {**result.metrics, "stage_seconds": seconds}.items() if k not in logged}
        tracking.log_metrics(run_id, summary, 0, **links)
        tags = {
            "output_uri": result.outputs[decl.output],
            "output_version": version,
            "mlflow.note.content": stage_note(spec.name, decl.headline, result),
            **result.info.get("tags", {}),
        }
        differs = _differs_from(store, previous, ctx.out_prefix, input_digests(spec, ups))
        if differs:
            result.info["output_differs"] = differs
            tags.update({"fdm.output_differs": "true", "fdm.previous_version": differs})
        if decl.output == "model":
            result.info["model_uri"] = _log_model(env, run_id, store, ctx.out_prefix, spec)
            tags["fdm.model_uri"] = result.info["model_uri"]
        tracking.set_tags(run_id, tags)
        _log_outputs(tracking, run_id, store, ctx.out_prefix)
    _report(env, spec.name, state="done", seconds=seconds)
    return result


def model_name(spec: StageSpec) -> str:
    """A logged model's name, by its role and sampling steps: `base`, `student-4`."""
    if spec.kind == "distill_round":
        return f"student-{spec.steps}"
    return "base" if spec.kind == "train_base" else spec.name


def model_note(spec: StageSpec, pipeline_run: str) -> str:
    """A logged model's description: what it is and which stage of which pipeline run made it."""
    made = f"stage `{spec.name}` of pipeline run {pipeline_run}"
    if spec.kind == "distill_round":
        teacher = spec.config.get("teacher_steps")
        return f"Student sampling in {spec.steps} steps, distilled from the {teacher}-step teacher by {made}."
    return f"Base model (the distillation's first teacher), trained by {made}."


def _log_model(env: RunEnv, run_id: str, store: ArtifactStore, prefix: str, spec: StageSpec) -> str:
    """The stage's model artifact as an MLflow pyfunc model on its run (weights, model.json, a sampler),
    named by its role and steps; its files sit at fixed paths in the model (`artifacts/weights/...`)."""
    from infra.mlflow_models import log_sampler_model
    from tasks.sample import sample_rows

    with tempfile.TemporaryDirectory(prefix="fdm-mlflow-model-") as tmp:
        files = Path(tmp, "weights")
        store.download_dir(prefix, str(files))
        tags = {
            "fdm.stage": spec.name,
            "fdm.key": spec.key,
            "fdm.steps": str(spec.steps or ""),
            "fdm.pipeline_run": env.parent_run_id,
            "mlflow.source.name": f"fdm stage {spec.name}",  # "Logged from" in the UI
            "mlflow.note.content": model_note(spec, env.parent_run_id),  # the model's description
        }
        return log_sampler_model(
            env.tracking, run_id, str(files), sample_rows, CODE_PATHS, tags, name=model_name(spec)
        )


def metric_links(env: RunEnv, spec: StageSpec, ups: dict[str, StageResult]) -> dict[str, Any]:
    """What a stage's metrics are linked to in MLflow: the logged model it measures (its `model` input) and
    the dataset it measured it on (its `dataset` input); empty for a stage that measures no model."""
    if "model" not in spec.inputs:
        return {}
    up = ups[spec.inputs["model"]]
    uri = up.info.get("model_uri")
    if uri is None:  # a cached model: the one its computation logged, if this experiment has it
        from infra.mlflow_models import logged_model_uri

        uri = logged_model_uri(env.tracking, up.key)
    if uri is None:
        return {}
    links: dict[str, Any] = {"model_id": uri.removeprefix("models:/")}
    if "dataset" in spec.inputs:
        data = ups[spec.inputs["dataset"]]
        links["dataset"] = (spec.inputs["dataset"], data.digest[:36])
    return links


def _differs_from(
    store: ArtifactStore, previous: tuple[str, Manifest] | None, prefix: str, inputs: dict[str, str]
) -> str | None:
    """The previous version's name if it was made from the same inputs yet holds other files (names or
    sha256) than the new output at `prefix`; None when there is none to compare or they are equal."""
    if previous is None or previous[1].inputs != inputs:
        return None
    files = {name: e.sha256 for name, e in read_manifest(store, prefix).files.items()}
    if files == {name: e.sha256 for name, e in previous[1].files.items()}:
        return None
    return posixpath.basename(previous[0])


def _corrupt_cause(err: BaseException) -> CorruptOutputError | None:
    """The CorruptOutputError behind `err` (itself, or in its chain of causes), if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, CorruptOutputError) and err.uri:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def quarantine(
    store: ArtifactStore, spec: StageSpec, ups: dict[str, StageResult], err: CorruptOutputError
) -> CorruptInputError | None:
    """Take the input version holding the corrupt file out of service: a `_CORRUPT.json` note beside its
    manifest, its key's CURRENT removed (if it still names it) and its key's checkpoints deleted, so its
    next computation starts from scratch. None if the file belongs to no input of `spec`."""
    for stage in spec.inputs.values():
        up = ups[stage]
        if not err.uri.startswith(up.output_uri.rstrip("/") + "/"):
            continue
        version_dir = up.output_uri[len(store.root_uri) :].strip("/")  # outputs are store.uri(prefix)
        out_root, version = posixpath.split(version_dir)
        note = {
            "file": err.uri,
            "expected_sha256": err.expected,
            "actual_sha256": err.actual,
            "detected_by": spec.name,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
        }
        store.write_bytes(posixpath.join(version_dir, CORRUPT_NOTE), json.dumps(note, indent=2).encode())
        try:
            current = store.read_bytes(posixpath.join(out_root, CURRENT)).decode().strip()
        except NotFoundError:
            current = None
        if current == version:
            store.delete(posixpath.join(out_root, CURRENT))
        store.delete_prefix(posixpath.join("checkpoints", up.stage, up.key))
        return CorruptInputError(
            f"corruption: {err.uri}: sha256 {err.actual}, expected {err.expected} by its manifest; "
            f"{stage} quarantined: it is recomputed from scratch, and every stage downstream of it",
            stage,
        )
    return None


def _log_outputs(tracking: Tracking, run_id: str, store: ArtifactStore, prefix: str) -> None:
    """Small outputs (grids, metrics, model spec, dataset card) go to MLflow, the manifest not; weights stay
    in the store, linked by a tag."""
    for path in store.list(prefix):
        name = path.rsplit("/", 1)[-1]
        if path.endswith((".png", ".json")) and name != MANIFEST_NAME:
            tracking.log_bytes(run_id, store.read_bytes(path), name)
