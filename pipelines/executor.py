"""Executing one stage: skip it, serve it from the cache, or compute it inside an MLflow child run.

A computation writes a new immutable version directory (`stages/<kind>/<key>/<version>/`) through
`run_stage`, then switches the key's CURRENT pointer to it, so a failure never disturbs the previous
complete output. Before computing, a stage claims its key with a lease (infra/lease.py): a second run of
the same config waits for the first's output instead of computing it again. The cache and its integrity
are pipelines/cache.py's; the child run's record is pipelines/stage_record.py's. This module is
torch-free; the stage functions are imported only where a stage computes.
"""

from __future__ import annotations

import os
import posixpath
import time
from typing import Any

from infra.lease import LEASE_NAME, Lease, acquire_or_wait
from infra.manifest import CURRENT
from infra.store import ArtifactStore
from pipelines.cache import (
    CorruptInputError,
    corrupt_cause,
    current_output,
    differs_from,
    input_digests,
    new_version,
    quarantine,
    serve,
)
from pipelines.run_env import RunEnv, report_progress
from pipelines.stage_record import (
    log_inputs,
    log_model,
    log_outputs,
    metric_links,
    node_tags,
    params,
    record_resolved,
    stage_tags,
)
from tasks.graph import StageSpec
from tasks.headlines import stage_note
from tasks.registry import STAGES
from tasks.stage import StageContext, StageResult, run_stage


def warm_worker() -> None:
    """Ray's worker start-up hook for the pipeline: importing the stage functions (torch, every stage) is
    the work, done while the worker waits in Ray's pool rather than when the first stage reaches it."""
    for kind in STAGES.values():
        kind.function()


def skip_reason(spec: StageSpec, ups: dict[str, StageResult]) -> str | None:
    """Why this stage must not run: an upstream stage was skipped, or its node's condition (e.g. a quality
    gate) fails on the results of the stages it waits for."""
    for name, r in ups.items():
        if r.info.get("skipped"):
            return f"upstream {name} skipped"
    condition = spec.node.condition
    return condition.failure({name: ups[name] for name in spec.after}) if condition else None


def skipped(spec: StageSpec, reason: str) -> StageResult:
    return StageResult(spec.kind, spec.key, info={"skipped": reason, "name": spec.name})


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
        report_progress(env, spec.name, state="skipped", note=reason)
    elif not force and (hit := serve(store, spec, ups)) is not None:
        result = record_resolved(env, spec, hit, ups)
        report_progress(env, spec.name, state="cached", seconds=0.0)
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
        report_progress(env, spec.name, state="waiting", note=note)

    hit = acquire_or_wait(lease, lambda: None if fresh else serve(store, spec, ups), waiting)
    if hit is not None:
        result = record_resolved(env, spec, hit, ups)
        report_progress(env, spec.name, state="cached", seconds=0.0)
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
    report_progress(env, spec.name, state="running", pid=os.getpid(), attempt=attempt, node=node)
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
            report_progress(env, spec.name, step=step, total=total)

        ctx = StageContext(
            store_uri=env.store_root,
            out_prefix=posixpath.join(spec.out_root, version),
            key=spec.key,
            num_threads=num_cpus,
            device=device,
            log_metrics=log_metrics,
            s3=env.s3,
            placement_timeout=env.placement_timeout,
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
            corrupt = corrupt_cause(err)
            if corrupt is not None:
                err = quarantine(store, spec, ups, corrupt) or err
                tracking.set_tags(run_id, {"corrupt_input": corrupt.uri})
            report_progress(env, spec.name, state="failed", error=f"{type(err).__name__}: {err}")
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
        differs = differs_from(store, previous, ctx.out_prefix, input_digests(spec, ups))
        if differs:
            result.info["output_differs"] = differs
            tags.update({"fdm.output_differs": "true", "fdm.previous_version": differs})
        if decl.output == "model":
            result.info["model_uri"] = log_model(env, run_id, store, ctx.out_prefix, spec)
            tags["fdm.model_uri"] = result.info["model_uri"]
        tracking.set_tags(run_id, tags)
        log_outputs(tracking, run_id, store, ctx.out_prefix)
    report_progress(env, spec.name, state="done", seconds=seconds)
    return result
