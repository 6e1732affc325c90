"""The driver: plan the DAG, serve what the cache holds, compute the rest as chained Ray tasks, show live
status, and record the MLflow parent run.

Everything the store already holds is resolved here from manifests alone; when that is every stage, Ray
is never started. Otherwise the remaining stages are chained by passing ObjectRefs of small StageResults
from one `.remote()` call to the next (no deprecated DAG API, no Ray Workflows). Re-running a stage forces
it (and optionally its downstream) to recompute from scratch, while its upstream must come from the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from infra.secrets import scrub_tree
from infra.store import ArtifactStore, NotFoundError
from infra.tracking import Tracking
from pipelines import interrupt, preflight
from pipelines.config import PipelineConfig, parse_config
from pipelines.executor import (
    CorruptInputError,
    RunEnv,
    execute_stage,
    record_resolved,
    serve,
    skip_reason,
    skipped,
    warm_worker,
)
from pipelines.plan import StageError, StageSpec, downstream_of, plan
from tasks.stage import StageResult

TRANSIENT = (ConnectionError, TimeoutError)
PLOT_VERSION = 1  # bump when _summary_plot draws differently


@dataclass
class StageOutcome:
    spec: StageSpec
    status: str = "pending"
    result: StageResult | None = None
    error: str | None = None
    seconds: float | None = None
    cause: BaseException | None = None


@dataclass
class PipelineRun:
    run_id: str
    outcomes: dict[str, StageOutcome] = field(default_factory=dict)
    wall_seconds: float = 0.0
    used_ray: bool = False

    @property
    def failed(self) -> list[StageOutcome]:
        return [o for o in self.outcomes.values() if o.status == "failed"]


def headline(spec: StageSpec, result: StageResult | None, error: str | None = None) -> str:
    """The stage's headline metric (from its declaration), its skip reason, or its error."""
    if result is None:
        return error.splitlines()[0][:60] if error else ""
    if result.info.get("skipped"):
        return str(result.info["skipped"])[:60]
    key = spec.decl.headline
    if key not in result.metrics:
        return ""
    name = result.info.get("metric_name", key) if key == "quality" else key
    return f"{name}={result.metrics[key]:.4g}"


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
            name,
            o.spec.key[:10],
            status,
            progress,
            f"{secs:.1f}" if secs is not None else "",
            headline(o.spec, o.result, o.error),
        )
    return table


def resolve_cached(stages: list[StageSpec], env: RunEnv, force: set[str]) -> dict[str, StageResult]:
    """Stages settled without computing, in plan order: cache hits (manifests only) and the stages a
    skipped upstream or a failed quality gate rules out. A forced stage, and all below it, stay open."""
    store = env.store()
    resolved: dict[str, StageResult] = {}
    for spec in stages:
        if spec.name in force or any(u not in resolved for u in spec.upstream):
            continue
        ups = {u: resolved[u] for u in spec.upstream}
        reason = skip_reason(spec, ups)
        result = skipped(spec, reason) if reason else serve(store, spec, ups)
        if result is not None:
            resolved[spec.name] = result
    return resolved


def _outcome(o: StageOutcome, result: StageResult) -> None:
    o.result = result
    o.status = "skipped" if result.info.get("skipped") else "cached" if result.cached else "done"
    o.seconds = None if o.status == "skipped" else 0.0 if result.cached else result.info.get("seconds")


def _submit(
    cfg: PipelineConfig,
    pending: list[StageSpec],
    resolved: dict[str, StageResult],
    env: RunEnv,
    force: set[str],
) -> dict[str, Any]:
    import ray

    refs: dict[str, Any] = {}
    task = ray.remote(execute_stage)
    for spec in pending:
        decl = spec.decl
        res = {
            "num_cpus": spec.resources["num_cpus"],
            "num_gpus": spec.resources["num_gpus"] if env.use_gpu else 0,
        }
        if decl.coordinates and decl.coordinates(decl.config.model_validate(spec.config)):
            res = {"num_cpus": 0, "num_gpus": 0}  # its workers hold the stage's resources, each
        args = [refs[u] if u in refs else resolved[u] for u in spec.upstream]
        refs[spec.name] = task.options(
            name=spec.name, max_retries=cfg.resources.max_retries, retry_exceptions=list(TRANSIENT), **res
        ).remote(spec, env, spec.name in force, *args)
    return refs


def _wait(run: PipelineRun, refs: dict[str, Any], env: RunEnv, console: Console) -> None:
    import ray

    board = env.board

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
                    _outcome(o, ray.get(ref))
                except Exception as err:  # a stage failure: recorded; who failed first is settled below
                    o.status = "failed"
                    o.cause = getattr(err, "cause", None) or err
                    o.error = f"{type(o.cause).__name__}: {o.cause}"
                    # a worker that died on its last retry left its child run RUNNING
                    env.tracking.close_stale(run.run_id, name, status="FAILED")
            live.update(stage_table(run, ray.get(board.snapshot.remote())))
    # Results arrive in any order; in plan (topological) order, a failure below a failure is "not run".
    for o in run.outcomes.values():
        if o.status == "failed" and any(
            run.outcomes[u].status in ("failed", "not run") for u in o.spec.upstream
        ):
            o.status = "not run"


def _quality_points(run: PipelineRun) -> dict[str, list[tuple[int, float]]]:
    """Quality by sampling steps: the base model's samplers, and each distilled student on its own grid."""
    base = run.outcomes.get("evaluate_base")
    if base is None or base.result is None:
        return {}
    by_method: dict[str, list[tuple[int, float]]] = {}
    for k, v in base.result.metrics.items():
        if k.endswith("/quality"):
            tag = k.split("/")[0]
            method = tag.rstrip("0123456789")
            by_method.setdefault(f"base {method}", []).append((int(tag[len(method) :]), v))
    students = [
        (o.spec.steps, o.result.metrics["quality"])
        for o in run.outcomes.values()
        if o.spec.round and o.result and "quality" in o.result.metrics
    ]
    if students:
        by_method["distilled students"] = students
    return {label: sorted(pts) for label, pts in by_method.items()}


def _summary_plot(points: dict[str, list[tuple[int, float]]], metric: str) -> bytes:
    """The quality-vs-steps plot (matplotlib is imported here, only when a plot must be drawn)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=100)
    ax = fig.subplots()
    for label, pts in points.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def summary_png(run: PipelineRun, store: ArtifactStore) -> bytes | None:
    """The run's quality-vs-steps plot, kept in the store by a hash of what it shows: a re-run with the
    same results (every fully cached run) reuses it instead of drawing it again."""
    points = _quality_points(run)
    if not points:
        return None
    base = run.outcomes["evaluate_base"].result
    metric = base.info.get("metric_name", "quality")
    digest = hashlib.sha256(json.dumps([points, metric, PLOT_VERSION]).encode()).hexdigest()[:16]
    path = f"plots/quality_vs_steps-{digest}.png"
    try:
        return store.read_bytes(path)
    except NotFoundError:
        png = _summary_plot(points, metric)
        store.write_bytes(path, png)
        return png


def _finish(run: PipelineRun, tracking: Tracking, store: ArtifactStore, console: Console) -> None:
    summary = {
        name: {
            "status": o.status,
            "key": o.spec.key,
            "seconds": o.seconds,
            "error": o.error,
            "metrics": o.result.metrics if o.result else {},
            "outputs": o.result.outputs if o.result else {},
            "spans": {
                k: o.result.info[k] for k in ("task_span", "compute_span") if o.result and k in o.result.info
            },
        }
        for name, o in run.outcomes.items()
    }
    tracking.log_text(run.run_id, json.dumps(summary, indent=2, default=str), "summary.json")
    png = summary_png(run, store)
    if png:
        tracking.log_bytes(run.run_id, png, "quality_vs_steps.png")
    tracking.log_metrics(run.run_id, {"wall_seconds": run.wall_seconds})
    tracking.set_tags(run.run_id, {"fdm.used_ray": str(run.used_ray).lower()})
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
    """Check the tracking URI and the store, resolve the cached stages, check what the rest ask for; if
    any remain, start Ray first, so its prestarted workers warm up while `open_run` sets up the MLflow
    parent run, then submit them and follow them to the end. SIGINT or SIGTERM cancels the Ray tasks,
    marks the run and its running children KILLED and raises Interrupted."""
    t0 = time.perf_counter()
    root = cfg.store.root if "://" in cfg.store.root else str(Path(cfg.store.root).resolve())
    store_env = cfg.store.s3_settings().env()
    os.environ.update(store_env)  # S3 calls of this driver, and of the workers it starts, are bounded
    preflight.check_store(cfg)  # creates a local root, which may hold the sqlite file checked next
    preflight.check_tracking(cfg.tracking.uri)
    probe = RunEnv(root, cfg.store.endpoint_url, Tracking("", ""), "")
    resolved = resolve_cached(stages, probe, set(force))
    missing = sorted(set(cached_only) - set(resolved))
    if missing:
        spec = next(s for s in stages if s.name == missing[0])
        raise StageError(
            f"{spec.name}: no complete output at {probe.store().uri(spec.out_root)} to re-run from"
        )
    pending = [s for s in stages if s.name not in resolved]
    if pending and not address:
        preflight.check_local_resources(pending)
    started, run, env, refs = False, None, None, {}
    with interrupt.interruptible():
        try:
            if pending:
                from infra.ray_runtime import ProgressBoard, cluster_gpus, init_ray

                started = init_ray(address, setup_hook=warm_worker)
                interrupt.arm()  # after ray.init, which sets its own SIGTERM handler
            tracking, run_id = open_run()
            env = RunEnv(
                store_root=root,
                endpoint_url=cfg.store.endpoint_url,
                tracking=tracking,
                parent_run_id=run_id,
                use_gpu=bool(pending) and cluster_gpus() > 0,
                board=ProgressBoard.remote() if pending else None,
                rerun=rerun,
                lease_timeout=cfg.store.lease_timeout,
                store_env=store_env,
            )
            run = PipelineRun(run_id, {s.name: StageOutcome(s) for s in stages}, used_ray=bool(pending))
            for spec in stages:
                if spec.name in resolved:
                    _outcome(run.outcomes[spec.name], record_resolved(env, spec, resolved[spec.name]))
            if pending:
                refs.update(_submit(cfg, pending, resolved, env, set(force)))
                _wait(run, refs, env, console)
                _recompute_corrupt(cfg, run, stages, env, set(force), refs, console)
            run.wall_seconds = time.perf_counter() - t0
            _finish(run, tracking, env.store(), console)
            return run
        except KeyboardInterrupt as err:
            stop = interrupt.as_interrupted(err)
            _interrupted(run, env, refs, stop, len(stages))
            raise stop from None
        finally:
            if started:
                import ray

                ray.shutdown()


def _recompute_corrupt(
    cfg: PipelineConfig,
    run: PipelineRun,
    stages: list[StageSpec],
    env: RunEnv,
    force: set[str],
    refs: dict[str, Any],
    console: Console,
) -> None:
    """Once per run: if a stage found an input corrupt (its producer's version is quarantined by then),
    recompute that producer from scratch and every stage that now misses (all below it), in this run."""
    corrupt = [o for o in run.failed if isinstance(o.cause, CorruptInputError)]
    if not corrupt:
        return
    for line in dict.fromkeys(str(o.cause) for o in corrupt):
        console.print(f"[red]{line}[/red]", highlight=False, soft_wrap=True)
    force = force | {o.cause.producer for o in corrupt}
    resolved = resolve_cached(stages, env, force)
    for spec in stages:
        o = run.outcomes[spec.name]
        if spec.name not in resolved:
            run.outcomes[spec.name] = StageOutcome(spec)  # computed again below
        elif o.status not in ("done", "cached", "skipped"):
            _outcome(o, record_resolved(env, spec, resolved[spec.name]))
    pending = [s for s in stages if s.name not in resolved]
    refs.clear()
    refs.update(_submit(cfg, pending, resolved, env, force))
    _wait(run, refs, env, console)


def _interrupted(
    run: PipelineRun | None, env: RunEnv | None, refs: dict[str, Any], stop: interrupt.Interrupted, total: int
) -> None:
    """Cancel the run's Ray tasks and mark the parent run and its running children KILLED."""
    if refs:
        import ray

        for ref in refs.values():
            with contextlib.suppress(Exception):  # finished, or Ray already going down
                ray.cancel(ref, force=True)
    stop.total = total
    if run is None or env is None:
        return
    stop.finished = [n for n, o in run.outcomes.items() if o.status in ("done", "cached", "skipped")]
    tracking = env.tracking
    tracking.close_stale(run.run_id, status="KILLED")
    tracking.set_tags(run.run_id, {"fdm.interrupted": stop.signal_name})
    tracking.end(run.run_id, "KILLED")


def run_pipeline(
    cfg: PipelineConfig, address: str | None = None, console: Console | None = None
) -> PipelineRun:
    """Run the full DAG as a new MLflow parent run; stages whose outputs are in the store are cached."""
    console = console or Console()

    def open_run() -> tuple[Tracking, str]:
        tracking = Tracking.setup(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
        for gone in tracking.fail_orphans(interrupt.driver_tags()["fdm.driver_host"], interrupt.driver_alive):
            console.print(f"marked run {gone} FAILED: it was RUNNING, its driver is gone")
        tags = {"pipeline": cfg.name, **interrupt.driver_tags()}
        run_id = tracking.start_parent(cfg.name, cfg.model_dump(mode="json"), tags)
        config = scrub_tree(cfg.model_dump(mode="json"))
        tracking.log_text(run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
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
    """Recompute `stage` (and its downstream if asked) of a past run from scratch, as new child runs of the
    same parent; everything upstream must come from the store's cache and is never recomputed."""
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
