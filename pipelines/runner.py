"""The driver: plan the DAG, submit it as chained Ray tasks, show live status, record the MLflow parent run.

Stages are chained by passing ObjectRefs of small StageResults from one `.remote()` call to the next (no
deprecated DAG API, no Ray Workflows). Re-running a stage forces it (and optionally its downstream) while
its upstream must be served from the store's cache.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml
from matplotlib.figure import Figure
from rich.console import Console
from rich.live import Live
from rich.table import Table

from infra.ray_runtime import ProgressBoard, cluster_gpus, init_ray
from infra.tracking import Tracking
from pipelines.config import PipelineConfig, parse_config
from pipelines.plan import StageSpec, downstream_of, plan
from pipelines.stage_exec import RunEnv, execute_stage, warm_worker
from tasks.stage import StageResult

TRANSIENT = (ConnectionError, TimeoutError)


@dataclass
class StageOutcome:
    spec: StageSpec
    status: str = "pending"
    result: StageResult | None = None
    error: str | None = None
    seconds: float | None = None


@dataclass
class PipelineRun:
    run_id: str
    outcomes: dict[str, StageOutcome] = field(default_factory=dict)
    wall_seconds: float = 0.0

    @property
    def failed(self) -> list[StageOutcome]:
        return [o for o in self.outcomes.values() if o.status == "failed"]


def _resources(cfg: PipelineConfig, spec: StageSpec, gpus: bool) -> dict[str, Any]:
    group = {"prepare_data": cfg.resources.prepare_data, "evaluate": cfg.resources.evaluate}.get(
        spec.kind, cfg.resources.train
    )
    return {"num_cpus": group.num_cpus, "num_gpus": group.num_gpus if gpus else 0}


def _headline(o: StageOutcome) -> str:
    if o.result is None:
        return o.error.splitlines()[0][:60] if o.error else ""
    if o.result.info.get("skipped"):
        return str(o.result.info["skipped"])[:60]
    m = o.result.metrics
    if "quality" in m:
        name = o.result.info.get("metric_name", "quality")
        return f"{name}={m['quality']:.4g}"
    if "val_accuracy" in m:
        return f"val_acc={m['val_accuracy']:.3f}"
    if "loss" in m:
        return f"loss={m['loss']:.4g}"
    if "n_train" in m:
        return f"n_train={int(m['n_train'])}"
    return ""


def stage_table(run: PipelineRun, board: dict[str, dict[str, Any]] | None = None) -> Table:
    table = Table(title=f"pipeline run {run.run_id}")
    for col in ("stage", "key", "status", "progress", "seconds", "headline"):
        table.add_column(col)
    for name, o in run.outcomes.items():
        live = (board or {}).get(name, {})
        status = o.status if o.status != "pending" else live.get("state", "pending")
        progress = ""
        if live.get("total") and status == "running":
            progress = f"{live.get('step', 0)}/{live['total']}"
        secs = (
            o.seconds
            if o.seconds is not None
            else (time.time() - live["started"] if "started" in live else None)
        )
        table.add_row(
            name, o.spec.key[:10], status, progress, f"{secs:.1f}" if secs is not None else "", _headline(o)
        )
    return table


def _submit(
    cfg: PipelineConfig, stages: list[StageSpec], env: RunEnv, force: set[str], cached_only: set[str]
) -> dict[str, ray.ObjectRef]:
    refs: dict[str, ray.ObjectRef] = {}
    task = ray.remote(execute_stage)
    gpus = env.use_gpu
    for spec in stages:
        res = _resources(cfg, spec, gpus)
        spec.params.update(res)
        if spec.kind == "train_base" and cfg.train.workers > 1:
            res = {"num_cpus": 0, "num_gpus": 0}  # it only coordinates: its Ray Train workers hold `res` each
        refs[spec.name] = task.options(
            name=spec.name, max_retries=cfg.resources.max_retries, retry_exceptions=list(TRANSIENT), **res
        ).remote(spec, env, spec.name in force, spec.name in cached_only, *[refs[u] for u in spec.upstream])
    return refs


def _wait(run: PipelineRun, refs: dict[str, ray.ObjectRef], board: Any, console: Console) -> None:
    pending = {ref: name for name, ref in refs.items()}
    with Live(
        stage_table(run), console=console, refresh_per_second=2, transient=not console.is_terminal
    ) as live:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                name = pending.pop(ref)
                o = run.outcomes[name]
                try:
                    o.result = ray.get(ref)
                    o.status = (
                        "skipped" if o.result.info.get("skipped") else "cached" if o.result.cached else "done"
                    )
                    o.seconds = 0.0 if o.result.cached else o.result.info.get("seconds")
                except Exception as err:  # a stage failure: recorded; who failed first is settled below
                    o.status = "failed"
                    cause = getattr(err, "cause", None) or err
                    o.error = f"{type(cause).__name__}: {cause}"
            live.update(stage_table(run, ray.get(board.snapshot.remote())))
    # Results arrive in any order; in plan (topological) order, a failure below a failure is "not run".
    for o in run.outcomes.values():
        if o.status == "failed" and any(
            run.outcomes[u].status in ("failed", "not run") for u in o.spec.upstream
        ):
            o.status = "not run"


def _summary_plot(run: PipelineRun) -> bytes | None:
    """Quality vs sampling steps: the base model's DDIM/other samplers and each distilled student."""
    base = run.outcomes.get("evaluate_base")
    if base is None or base.result is None:
        return None
    fig = Figure(figsize=(5, 3.5), dpi=100)
    ax = fig.subplots()
    by_method: dict[str, list[tuple[int, float]]] = {}
    for k, v in base.result.metrics.items():
        if k.endswith("/quality"):
            tag = k.split("/")[0]
            method = tag.rstrip("0123456789")
            by_method.setdefault(f"base {method}", []).append((int(tag[len(method) :]), v))
    students = [
        (o.spec.steps, o.result.metrics["quality"])
        for o in run.outcomes.values()
        if o.spec.kind == "evaluate" and o.spec.round and o.result and "quality" in o.result.metrics
    ]
    if students:
        by_method["distilled students"] = students
    for label, pts in by_method.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(base.result.info.get("metric_name", "quality") + " (lower is better)")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _finish(run: PipelineRun, tracking: Tracking, console: Console) -> None:
    summary = {
        name: {
            "status": o.status,
            "key": o.spec.key,
            "seconds": o.seconds,
            "error": o.error,
            "metrics": o.result.metrics if o.result else {},
            "outputs": o.result.outputs if o.result else {},
        }
        for name, o in run.outcomes.items()
    }
    tracking.log_text(run.run_id, json.dumps(summary, indent=2, default=str), "summary.json")
    png = _summary_plot(run)
    if png:
        tracking.log_bytes(run.run_id, png, "quality_vs_steps.png")
    tracking.log_metrics(run.run_id, {"wall_seconds": run.wall_seconds})
    tracking.end(run.run_id, "FAILED" if run.failed else "FINISHED")
    console.print(stage_table(run))
    for o in run.failed:
        console.print(f"[red]stage {o.spec.name} failed:[/red] {o.error}")


def _execute(
    cfg: PipelineConfig,
    stages: list[StageSpec],
    open_run: Callable[[], tuple[Tracking, str]],
    address: str | None,
    console: Console,
    force: set[str] = frozenset(),
    cached_only: set[str] = frozenset(),
    rerun: bool = False,
) -> PipelineRun:
    """Start Ray first, so its prestarted workers warm up while `open_run` sets up the MLflow parent run,
    then submit the stages and follow them to the end."""
    started = init_ray(address, setup_hook=warm_worker)
    try:
        tracking, run_id = open_run()
        board = ProgressBoard.remote()
        env = RunEnv(
            store_root=cfg.store.root if "://" in cfg.store.root else str(Path(cfg.store.root).resolve()),
            endpoint_url=cfg.store.endpoint_url,
            tracking=tracking,
            parent_run_id=run_id,
            use_gpu=cluster_gpus() > 0,
            board=board,
            quality_gate=cfg.distill.quality_gate,
            start_steps=cfg.distill.start_steps,
            rerun=rerun,
        )
        run = PipelineRun(run_id, {s.name: StageOutcome(s) for s in stages})
        t0 = time.perf_counter()
        refs = _submit(cfg, stages, env, set(force), set(cached_only))
        _wait(run, refs, board, console)
        run.wall_seconds = time.perf_counter() - t0
        _finish(run, tracking, console)
        return run
    finally:
        if started:
            ray.shutdown()


def run_pipeline(
    cfg: PipelineConfig, address: str | None = None, console: Console | None = None
) -> PipelineRun:
    """Run the full DAG as a new MLflow parent run; stages whose outputs verify in the store are cached."""
    console = console or Console()

    def open_run() -> tuple[Tracking, str]:
        tracking = Tracking.setup(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
        run_id = tracking.start_parent(cfg.name, cfg.model_dump(mode="json"), {"pipeline": cfg.name})
        tracking.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
        console.print(f"MLflow run id: [bold]{run_id}[/bold]  (tracking {tracking.tracking_uri})")
        return tracking, run_id

    return _execute(cfg, plan(cfg), open_run, address, console)


def load_run_config(tracking_uri: str, run_id: str) -> tuple[PipelineConfig, Tracking]:
    """The config a past pipeline run was started with (its logged config.yaml)."""
    tracking = Tracking(tracking_uri, "")
    run = tracking.client.get_run(run_id)
    text = Path(tracking.client.download_artifacts(run_id, "config.yaml")).read_text()
    return parse_config(yaml.safe_load(text)), Tracking(tracking.tracking_uri, run.info.experiment_id)


def rerun_stage(
    tracking_uri: str,
    run_id: str,
    stage: str,
    downstream: bool = False,
    address: str | None = None,
    console: Console | None = None,
) -> PipelineRun:
    """Recompute `stage` (and its downstream if asked) of a past run, as new child runs of the same parent;
    everything upstream must come from the store's cache and is never recomputed."""
    console = console or Console()
    cfg, tracking = load_run_config(tracking_uri, run_id)
    stages = plan(cfg)
    names = [s.name for s in stages]
    if stage not in names:
        raise KeyError(f"--stage: {stage!r} is not a stage of run {run_id} (stages: {', '.join(names)})")
    targets = downstream_of(stages, stage) if downstream else [stage]
    needed = set(targets)
    for s in reversed(stages):
        if s.name in needed:
            needed.update(s.upstream)
    selected = [s for s in stages if s.name in needed]

    def open_run() -> tuple[Tracking, str]:
        tracking.client.update_run(run_id, status="RUNNING")
        return tracking, run_id

    return _execute(
        cfg,
        selected,
        open_run,
        address,
        console,
        force=set(targets),
        cached_only=needed - set(targets),
        rerun=True,
    )


def past_stages(tracking_uri: str, run_id: str) -> Table:
    """The stage table of a past run, from its MLflow child runs."""
    client = Tracking(tracking_uri, "").client
    parent = client.get_run(run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        order_by=["start_time ASC"],
    )
    table = Table(title=f"pipeline run {run_id} ({parent.info.status})")
    for col in ("stage", "key", "status", "seconds", "headline", "child run"):
        table.add_column(col)
    for c in children:
        tags = c.data.tags
        status = (
            "skipped"
            if tags.get("skipped") == "true"
            else "cached"
            if tags.get("cached") == "true"
            else c.info.status.lower()
        )
        if tags.get("rerun") == "True":
            status += " (rerun)"
        secs = (c.info.end_time - c.info.start_time) / 1000 if c.info.end_time else None
        m = c.data.metrics
        head = next((f"{k}={m[k]:.4g}" for k in ("quality", "val_accuracy", "loss", "n_train") if k in m), "")
        table.add_row(
            tags.get("stage", c.info.run_name),
            tags.get("key", "")[:10],
            status,
            f"{secs:.1f}" if secs is not None else "",
            head,
            c.info.run_id[:12],
        )
    return table
