"""The driver: plan the DAG, serve what the cache holds, compute the rest as chained Ray tasks, show live
status, and record the MLflow parent run.

Everything the store already holds is resolved here from manifests alone; when that is every stage, Ray
is never started. Otherwise the remaining stages are chained by passing ObjectRefs of small StageResults
from one `.remote()` call to the next (no deprecated DAG API, no Ray Workflows). Re-running a stage forces
it (and optionally its downstream) to recompute from scratch as a new pipeline run (a new MLflow parent
tagged `fdm.rerun_of`; pipelines/rerun.py), while its upstream comes from the cache.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from infra.tracking import Tracking, provenance_tags
from pipelines import interrupt, preflight
from pipelines.cache import CorruptInputError, serve
from pipelines.config import PipelineConfig
from pipelines.executor import execute_stage, skip_reason, skipped, warm_worker
from pipelines.parent_run import finish, log_resolved, open_parent
from pipelines.plan import StageError, plan
from pipelines.progress import StageLines, TableView
from pipelines.run_env import RunEnv
from pipelines.stage_record import record_resolved
from tasks.graph import PipelineRun, StageOutcome, StageSpec
from tasks.stage import StageResult

TRANSIENT = (ConnectionError, TimeoutError)
REPO = Path(__file__).resolve().parent.parent


def resolve_cached(stages: list[StageSpec], env: RunEnv, force: set[str]) -> dict[str, StageResult]:
    """Stages settled without computing, in plan order: cache hits (manifests only) and the stages a
    skipped upstream or a failed node condition (a quality gate) rules out. A forced stage, and all below
    it, stay open."""
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
    """Record `result` on its outcome: done, cached or skipped, with its seconds."""
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
    """Submit the pending stages as chained Ray tasks (each gets its upstream's ObjectRefs), with the
    resources their groups ask for and Ray's retries; their refs by stage name."""
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


def _wait(
    run: PipelineRun, refs: dict[str, Any], env: RunEnv, console: Console, lines: StageLines | None = None
) -> None:
    """Follow the submitted stages to their ends, showing progress; a failure below a failure is
    "not run"."""
    import ray

    board = env.board
    pending = {ref: name for name, ref in refs.items()}
    lines = lines or StageLines(run, console)
    view = TableView(run, console) if console.is_terminal else contextlib.nullcontext(lines)
    with view as live:
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
                    env.tracking.close_stale(run.run_id, name, status="FAILED", reason=o.error[:5000])
            run.board = ray.get(board.snapshot.remote())
            live.update(run.board)
    # Results arrive in any order; in plan (topological) order, a failure below a failure is "not run".
    for o in run.outcomes.values():
        if o.status == "failed" and any(
            run.outcomes[u].status in ("failed", "not run") for u in o.spec.upstream
        ):
            o.status = "not run"


def execute(
    cfg: PipelineConfig,
    stages: list[StageSpec],
    open_run: Callable[[], tuple[Tracking, str]],
    address: str | None,
    console: Console,
    force: set[str] = frozenset(),
    cached_only: set[str] = frozenset(),
    rerun: bool = False,
    command: str = "fdm run",
    allow_local: bool = False,
) -> PipelineRun:
    """Check the tracking URI and the store, resolve the cached stages, check what the rest ask for; if
    any remain, start Ray first, so its prestarted workers warm up while `open_run` sets up the MLflow
    parent run, then submit them and follow them to the end. SIGINT or SIGTERM cancels the Ray tasks,
    marks the run and its running children KILLED and raises Interrupted. Joined to a multi-node cluster,
    a node-local store or tracking path is refused (PreflightError) unless `allow_local`."""
    t0 = time.perf_counter()
    root = cfg.store.root if "://" in cfg.store.root else str(Path(cfg.store.root).resolve())
    preflight.check_store(cfg)  # creates a local root, which may hold the sqlite file checked next
    preflight.check_tracking(cfg.tracking.uri)
    probe = RunEnv(root, cfg.store.s3_settings(), Tracking("", ""), "")
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
                from infra.ray_join import cluster_address
                from infra.ray_runtime import cluster_gpus, init_ray, new_board

                started = init_ray(address, setup_hook=warm_worker)
                interrupt.arm()  # after ray.init, which sets its own SIGTERM handler
                if cluster_address(address):  # joined, not started here
                    preflight.check_joined(cfg, pending, allow_local)
            tracking, run_id = open_run()
            env = RunEnv(
                store_root=root,
                s3=probe.s3,
                tracking=tracking,
                parent_run_id=run_id,
                use_gpu=bool(pending) and cluster_gpus() > 0,
                board=new_board() if pending else None,
                rerun=rerun,
                lease_timeout=cfg.store.lease_timeout,
                placement_timeout=cfg.resources.placement_timeout,
            )
            log_resolved(tracking, run_id, cfg, bool(pending), env.use_gpu, address)
            run = PipelineRun(run_id, {s.name: StageOutcome(s) for s in stages}, used_ray=bool(pending))
            for spec in stages:
                if spec.name in resolved:
                    ups = {u: resolved[u] for u in spec.upstream}
                    _outcome(run.outcomes[spec.name], record_resolved(env, spec, resolved[spec.name], ups))
            lines = StageLines(run, console)
            if not console.is_terminal:
                lines.update()
            if pending:
                refs.update(_submit(cfg, pending, resolved, env, set(force)))
                _wait(run, refs, env, console, lines)
                _recompute_corrupt(cfg, run, stages, env, set(force), refs, console)
            run.wall_seconds = time.perf_counter() - t0
            finish(run, cfg, command, tracking, env.store(), console)
            return run
        except KeyboardInterrupt as err:
            stop = interrupt.as_interrupted(err)
            interrupt.cancel_run(run, env.tracking if env else None, refs, stop, len(stages))
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
            ups = {u: resolved[u] for u in spec.upstream}
            _outcome(o, record_resolved(env, spec, resolved[spec.name], ups))
    pending = [s for s in stages if s.name not in resolved]
    refs.clear()
    refs.update(_submit(cfg, pending, resolved, env, force))
    _wait(run, refs, env, console)


def run_pipeline(
    cfg: PipelineConfig,
    address: str | None = None,
    console: Console | None = None,
    command: str | None = None,
    allow_local: bool = False,
) -> PipelineRun:
    """Run the full DAG as a new MLflow parent run; stages whose outputs are in the store are cached.
    `command` is how the run was started (its MLflow source), e.g. the `fdm run ...` command line;
    `allow_local` accepts local store and tracking paths on a multi-node cluster (see check_joined)."""
    console = console or Console()
    command = command or f"fdm run ({cfg.name})"

    def open_run() -> tuple[Tracking, str]:
        tracking = Tracking.setup(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
        for gone in tracking.fail_orphans(interrupt.driver_tags()["fdm.driver_host"], interrupt.driver_alive):
            console.print(f"marked run {gone} FAILED: it was RUNNING, its driver is gone")
        tags = {**interrupt.driver_tags(), **provenance_tags(command, REPO)}
        return tracking, open_parent(cfg, tracking, console, tags)

    return execute(cfg, plan(cfg), open_run, address, console, command=command, allow_local=allow_local)
