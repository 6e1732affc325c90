"""What one Ray task does for one stage: skip, serve from cache, or run it inside an MLflow child run.

Runs in a Ray worker. Inputs arrive as small StageResults of the upstream stages (URIs, metrics); large
objects are read from the artifact store by the stage functions themselves.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from fdm_core.samplers import process_grid
from infra.manifest import clear_output, is_complete
from infra.store import open_store
from infra.tracking import Tracking
from pipelines.plan import StageSpec
from tasks.checkpoints import load_model
from tasks.distill_round import DistillConfig, distill_round, passes_quality_gate
from tasks.evaluate import EvalConfig, evaluate
from tasks.prepare_data import DataConfig, prepare_data
from tasks.stage import StageContext, StageResult
from tasks.train_base import ModelConfig, TrainConfig, train_base
from tasks.train_classifier import ClassifierConfig, train_classifier


def warm_worker() -> None:
    """Ray's worker start-up hook for the pipeline: importing this module (torch, MLflow, every stage) is
    the work, done while the worker waits in Ray's pool rather than when the first stage reaches it."""


class StageError(RuntimeError):
    """A stage could not run as asked (e.g. a re-run whose upstream outputs are gone)."""


@dataclass(frozen=True)
class RunEnv:
    """Everything a worker needs besides the stage: store, tracking, parent run, device policy."""

    store_root: str
    endpoint_url: str | None
    tracking: Tracking
    parent_run_id: str
    use_gpu: bool
    board: Any = None
    quality_gate: float | None = None
    start_steps: int = 0
    rerun: bool = False


def _report(env: RunEnv, name: str, **fields: Any) -> None:
    if env.board is not None:
        env.board.report.remote(name, **fields)


def _result_path(spec: StageSpec) -> str:
    return f"{spec.out_prefix}.result.json"


def _quality(result: StageResult, sampler_tag: str | None = None) -> float:
    if sampler_tag is not None:
        return result.metrics.get(f"{sampler_tag}/quality", math.nan)
    return result.metrics.get("quality", math.nan)


def skip_reason(spec: StageSpec, ups: dict[str, StageResult], env: RunEnv) -> str | None:
    """Why this stage must not run: an upstream stage was skipped, or the quality gate stopped halving."""
    for name, r in ups.items():
        if r.info.get("skipped"):
            return f"upstream {name} skipped"
    if spec.kind == "distill_round" and env.quality_gate is not None and spec.round and spec.round >= 2:
        student = ups[f"evaluate_{spec.round - 1}"]
        teacher_name = "evaluate_base" if spec.round == 2 else f"evaluate_{spec.round - 2}"
        teacher = ups[teacher_name]
        t_metric = _quality(teacher, f"euler{env.start_steps}") if spec.round == 2 else _quality(teacher)
        s_metric = _quality(student)
        if not passes_quality_gate(s_metric, t_metric, env.quality_gate):
            return (
                f"quality gate: student metric {s_metric:.4g} > {env.quality_gate} x teacher "
                f"{t_metric:.4g}; halving stops"
            )
    return None


def _teacher_sigmas(teacher: StageResult, steps: int, endpoint_url: str | None) -> list[float]:
    if "sigmas" in teacher.info:
        return list(teacher.info["sigmas"])
    model, _ = load_model(open_store(teacher.outputs["model"], endpoint_url), "")
    return process_grid(model.process, steps).tolist()


def call_task(spec: StageSpec, ups: dict[str, StageResult], ctx: StageContext) -> StageResult:
    """Dispatch to the plain stage function in tasks/."""
    c = spec.config
    if spec.kind == "prepare_data":
        return prepare_data(DataConfig.model_validate(c), ctx)
    dataset = ups["prepare_data"].outputs["dataset"] if "prepare_data" in ups else None
    if spec.kind == "train_classifier":
        return train_classifier(ClassifierConfig.model_validate(c), dataset, ctx)
    if spec.kind == "train_base":
        return train_base(
            ModelConfig.model_validate(c["model"]), TrainConfig.model_validate(c["train"]), dataset, ctx
        )
    if spec.kind == "distill_round":
        teacher = ups[spec.upstream[0]]
        round_cfg = {k: v for k, v in c.items() if k != "teacher_steps"}
        sigmas = _teacher_sigmas(teacher, c["teacher_steps"], ctx.endpoint_url)
        return distill_round(
            DistillConfig.model_validate(round_cfg),
            teacher.outputs["model"],
            sigmas,
            dataset,
            spec.round or 0,
            ctx,
        )
    if spec.kind == "evaluate":
        model = ups[spec.upstream[0]]
        clf = ups.get("train_classifier")
        data_uri = _dataset_of(ups)
        return evaluate(
            EvalConfig.model_validate(c),
            model.outputs["model"],
            data_uri,
            clf.outputs["classifier"] if clf else None,
            ctx,
        )
    raise StageError(f"unknown stage kind {spec.kind!r}")


def _dataset_of(ups: dict[str, StageResult]) -> str:
    for r in ups.values():
        if "dataset" in r.info:
            return r.info["dataset"]
    raise StageError("evaluate: no upstream stage names its dataset")


def execute_stage(
    spec: StageSpec, env: RunEnv, force: bool, require_cached: bool, *upstream: StageResult
) -> StageResult:
    """Run `spec` (or serve it from the cache) and record it as a child run of the pipeline's MLflow run.

    The result carries this task's wall-clock span (info["task_span"]) and, when the stage function ran,
    its span too (info["compute_span"]), so the driver can line the stages up."""
    began = time.time()
    result = _run_or_serve(spec, env, force, require_cached, dict(zip(spec.upstream, upstream)))
    result.info["task_span"] = [began, time.time()]
    return result


def _run_or_serve(
    spec: StageSpec, env: RunEnv, force: bool, require_cached: bool, ups: dict[str, StageResult]
) -> StageResult:
    tags = {
        "stage": spec.name,
        "kind": spec.kind,
        "key": spec.key,
        "round": spec.round,
        "steps": spec.steps,
        "rerun": env.rerun,
    }
    tags = {k: str(v) for k, v in tags.items() if v is not None}
    tracking, store = env.tracking, open_store(env.store_root, env.endpoint_url)
    dataset = _dataset_of(ups) if spec.kind != "prepare_data" and spec.kind != "train_classifier" else None

    reason = skip_reason(spec, ups, env)
    if reason:
        with tracking.child_run(env.parent_run_id, spec.name, {**tags, "skipped": "true"}) as run_id:
            tracking.set_tags(run_id, {"skip_reason": reason})
        _report(env, spec.name, state="skipped", note=reason)
        return StageResult(
            spec.kind,
            spec.key,
            {},
            info={"skipped": reason, "name": spec.name},
            run_id=run_id,
        )

    if not force and is_complete(store, spec.out_prefix) and store.exists(_result_path(spec)):
        result = StageResult(**json.loads(store.read_bytes(_result_path(spec))))
        result.cached = True
        with tracking.child_run(env.parent_run_id, spec.name, {**tags, "cached": "true"}) as run_id:
            tracking.log_params(run_id, {"config": spec.config})
            tracking.log_metrics(run_id, result.metrics)
            tracking.set_tags(run_id, {"output_uri": store.uri(spec.out_prefix)})
        result.run_id = run_id
        _report(env, spec.name, state="cached", seconds=0.0, headline=result.metrics.get("quality"))
        return result
    if require_cached:
        raise StageError(f"{spec.name}: no complete output at {store.uri(spec.out_prefix)} to re-run from")

    clear_output(store, spec.out_prefix)
    retried = tracking.close_stale(env.parent_run_id, spec.name)
    _report(env, spec.name, state="running", pid=os.getpid(), attempt=retried + 1)
    num_cpus = max(1, int(spec.params.get("num_cpus", 1)))
    with tracking.child_run(env.parent_run_id, spec.name, {**tags, "cached": "false"}) as run_id:
        tracking.log_params(run_id, {"config": spec.config})
        total = _expected_steps(spec)

        def log_metrics(metrics: dict[str, float], step: int) -> None:
            tracking.log_metrics(run_id, metrics, step)
            _report(env, spec.name, step=step, total=total)

        ctx = StageContext(
            store_uri=env.store_root,
            out_prefix=spec.out_prefix,
            key=spec.key,
            num_threads=num_cpus,
            device="cuda" if env.use_gpu and spec.params.get("num_gpus", 0) > 0 else "cpu",
            log_metrics=log_metrics,
            endpoint_url=env.endpoint_url,
        )
        t0, computing = time.perf_counter(), time.time()
        try:
            result = call_task(spec, ups, ctx)
        except BaseException as err:
            _report(env, spec.name, state="failed", error=f"{type(err).__name__}: {err}")
            raise
        seconds, computed = time.perf_counter() - t0, time.time()
        result.info.update({"name": spec.name, "seconds": seconds})
        if dataset or spec.kind == "prepare_data":
            result.info["dataset"] = dataset or result.outputs["dataset"]
        result.run_id = run_id
        store.write_bytes(_result_path(spec), json.dumps(asdict(result), default=str).encode())
        result.info["compute_span"] = [computing, computed]  # this run's only: not in the cached sidecar
        tracking.log_metrics(run_id, {**result.metrics, "stage_seconds": seconds})
        tracking.set_tags(run_id, {"output_uri": store.uri(spec.out_prefix)})
        _log_outputs(tracking, run_id, store, spec)
    _report(env, spec.name, state="done", seconds=seconds, headline=result.metrics.get("quality"))
    return result


def _expected_steps(spec: StageSpec) -> int | None:
    c = spec.config
    if spec.kind == "train_base":
        return c["train"]["steps"]
    if spec.kind == "train_classifier":
        return c["steps"]
    if spec.kind == "distill_round":
        final = c.get("final_updates") or 2 * c["updates"]
        return final if (spec.steps or 0) <= 2 else c["updates"]
    return None


def _log_outputs(tracking: Tracking, run_id: str, store: Any, spec: StageSpec) -> None:
    """Small outputs (grids, metrics, model spec) go to MLflow; weights stay in the store, linked by a tag."""
    for path in store.list(spec.out_prefix):
        if path.endswith((".png", ".json")):
            tracking.log_bytes(run_id, store.read_bytes(path), path.rsplit("/", 1)[-1])
