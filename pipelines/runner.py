"""The driver: plan the DAG, serve what the cache holds, compute the rest as chained Ray tasks, show live
status, and record the MLflow parent run.

Everything the store already holds is resolved here from manifests alone; when that is every stage, Ray
is never started. Otherwise the remaining stages are chained by passing ObjectRefs of small StageResults
from one `.remote()` call to the next (no deprecated DAG API, no Ray Workflows). Re-running a stage forces
it (and optionally its downstream) to recompute from scratch as a new pipeline run (a new MLflow parent
tagged `fdm.rerun_of`), while its upstream comes from the cache.
"""

from __future__ import annotations

import contextlib
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
from infra.store import ArtifactStore
from infra.tracking import Tracking, provenance_tags, run_link
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
from pipelines.headlines import format_headline, headline_value
from pipelines.parent_run import (
    describe,
    halving,
    log_numbers,
    log_resolved,
    model_ids,
    parent_params,
    register_final_student,
)
from pipelines.plan import StageError, StageSpec, downstream_of, first_teacher, plan
from pipelines.quality_plot import quality_curves, summary_png
from tasks.stage import StageResult

TRANSIENT = (ConnectionError, TimeoutError)
REPO = Path(__file__).resolve().parent.parent
PLOT_VERSION = 3  # bump when _summary_plot draws differently


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
    board: dict[str, dict[str, Any]] = field(default_factory=dict)  # the last progress board seen

    @property
    def failed(self) -> list[StageOutcome]:
        return [o for o in self.outcomes.values() if o.status == "failed"]


def headline(spec: StageSpec, result: StageResult | None, error: str | None = None) -> str:
    """The stage's headline metric (from its declaration), its skip reason, or its error."""
    if result is None:
        return error.splitlines()[0][:60] if error else ""
    if result.info.get("skipped"):
        return str(result.info["skipped"])
    found = headline_value(spec.decl.headline, result)
    return format_headline(*found) if found else ""


def stage_table(run: PipelineRun, board: dict[str, dict[str, Any]] | None = None) -> Table:
    table = Table(title=f"pipeline run {run.run_id}")
    for col in ("stage", "key", "status", "attempt", "node", "progress", "seconds", "headline"):
        table.add_column(col)
    for name, o in run.outcomes.items():
        live = (board or run.board).get(name, {})
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
            str(live.get("attempt", "")),
            live.get("node", ""),
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


class StageLines:
    """Progress for a log (stdout not a terminal, e.g. a Ray Job's): one plain line per stage transition,
    started and ended (done, cached, skipped, failed), printed as it happens."""

    def __init__(self, run: PipelineRun, console: Console) -> None:
        self.run, self.console, self.shown = run, console, {}

    def update(self, board: dict[str, dict[str, Any]] | None = None) -> None:
        for name, o in self.run.outcomes.items():
            running = (board or {}).get(name, {}).get("state") == "running"
            state = o.status if o.status != "pending" else "running" if running else "pending"
            if state == self.shown.get(name, "pending"):
                continue
            if state in ("done", "failed") and name not in self.shown:
                self._line(f"stage {name} started")  # it started and ended between two looks
            self.shown[name] = state
            if state == "running":
                self._line(f"stage {name} started")
            elif state == "done":
                secs = f" in {o.seconds:.1f} s" if o.seconds is not None else ""
                self._line(f"stage {name} done{secs}  {headline(o.spec, o.result)}".rstrip())
            elif state == "failed":
                self._line(f"stage {name} failed: {headline(o.spec, None, o.error)}")
            else:
                self._line(f"stage {name} {state}  {headline(o.spec, o.result)}".rstrip())

    def _line(self, text: str) -> None:
        self.console.print(f"{time.strftime('%H:%M:%S')} {text}", highlight=False, soft_wrap=True)


class _TableView:
    """Progress on a terminal: the stage table, redrawn live."""

    def __init__(self, run: PipelineRun, console: Console) -> None:
        self.run = run
        self.live = Live(stage_table(run), console=console, refresh_per_second=2)

    def __enter__(self) -> _TableView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)

    def update(self, board: dict[str, dict[str, Any]]) -> None:
        self.live.update(stage_table(self.run, board))


def _wait(
    run: PipelineRun, refs: dict[str, Any], env: RunEnv, console: Console, lines: StageLines | None = None
) -> None:
    import ray

    board = env.board

    pending = {ref: name for name, ref in refs.items()}
    lines = lines or StageLines(run, console)
    view = _TableView(run, console) if console.is_terminal else contextlib.nullcontext(lines)
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


def _finish(
    run: PipelineRun,
    cfg: PipelineConfig,
    command: str,
    tracking: Tracking,
    store: ArtifactStore,
    console: Console,
) -> None:
    h = halving(run, cfg)
    stages = {
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
    summary = {"stages": stages, "distillation": h.record()}
    tracking.log_text(run.run_id, json.dumps(summary, indent=2, default=str), "summary.json")
    curves = quality_curves(run, first_teacher(cfg))
    if curves is not None:
        metric = run.outcomes["evaluate_base"].result.info.get("metric_name", "quality").upper()
        title = f"{cfg.name}: sample quality against sampling steps"
        tracking.log_bytes(run.run_id, summary_png(curves, metric, title, store), "quality_vs_steps.png")
    data = run.outcomes.get("prepare_data")
    if data is not None and data.result is not None:
        tracking.log_dataset(run.run_id, data.result.output_uri, "prepare_data", data.result.digest)
    ids = model_ids(run, tracking)
    log_numbers(run, tracking, h, curves, ids)
    final = h.final.spec if h.final else run.outcomes["train_base"].spec
    tracking.set_tags(
        run.run_id,
        {
            "fdm.used_ray": str(run.used_ray).lower(),
            "mlflow.note.content": describe(run, cfg, command, h),
            "fdm.final_model": final.name,
            **({"fdm.final_steps": str(final.steps)} if final.steps else {}),
            "fdm.student_steps": ",".join(str(st["steps"]) for st in h.students),
            "fdm.halving_stopped": h.stopped,
        },
    )
    registered = None if run.failed else register_final_student(run, cfg, tracking, h)
    tracking.end(run.run_id, "FAILED" if run.failed else "FINISHED")
    if registered:
        console.print(f"final student registered: {registered}")
    console.print(stage_table(run))
    if h.students or cfg.distill.student_steps:
        n = h.final.spec.steps if h.final else 0
        kept = f"{h.final.spec.name} ({n} step{'s' * (n != 1)})" if h.final else "the base model"
        console.print(f"final model: {kept}; halving stopped: {h.stopped}", highlight=False, soft_wrap=True)
    for o in run.outcomes.values():
        info = o.result.info if o.result else {}
        if info.get("output_differs"):
            console.print(
                f"{o.spec.name}: the recomputed output differs from the previous version "
                f"{info['output_differs']} (a non-deterministic stage); both are kept, this run used "
                f"{info['output_version']}",
                highlight=False,
                soft_wrap=True,
            )
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
                from infra.placement import PLACEMENT_ENV
                from infra.ray_join import cluster_address
                from infra.ray_runtime import cluster_gpus, init_ray, new_board

                started = init_ray(address, setup_hook=warm_worker)
                interrupt.arm()  # after ray.init, which sets its own SIGTERM handler
                if cluster_address(address):  # joined, not started here
                    check_joined(cfg, pending, allow_local)
                store_env[PLACEMENT_ENV] = str(cfg.resources.placement_timeout)
            tracking, run_id = open_run()
            env = RunEnv(
                store_root=root,
                endpoint_url=cfg.store.endpoint_url,
                tracking=tracking,
                parent_run_id=run_id,
                use_gpu=bool(pending) and cluster_gpus() > 0,
                board=new_board() if pending else None,
                rerun=rerun,
                lease_timeout=cfg.store.lease_timeout,
                store_env=store_env,
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
            _finish(run, cfg, command, tracking, env.store(), console)
            return run
        except KeyboardInterrupt as err:
            stop = interrupt.as_interrupted(err)
            _interrupted(run, env, refs, stop, len(stages))
            raise stop from None
        finally:
            if started:
                import ray

                ray.shutdown()


def check_joined(cfg: PipelineConfig, pending: list[StageSpec], allow_local: bool) -> None:
    """On a joined cluster, before anything runs: with more than one node, every node must reach the store
    and the tracking store (no local path, unless `allow_local`: the user knows it is shared); every stage
    still to compute must ask for resources some node has (or an autoscaler can add). PreflightError
    (exit 2) names what is wrong."""
    from infra.placement import Unplaceable, alive_nodes, check

    nodes = alive_nodes()
    local = preflight.node_local(cfg)
    if len(nodes) > 1 and local and not allow_local:
        raise preflight.PreflightError(
            f"{' and '.join(local)}: a path on this machine's disk, but the cluster has {len(nodes)} nodes, "
            "whose workers would each write their own copy. Store in S3 (--set store.root=s3://BUCKET/fdm) "
            "or on a filesystem every node mounts at the same path, and track to a server (`fdm "
            "tracking-server`, then --set tracking.uri=http://HEAD:5000); --allow-local runs anyway when "
            "the path is shared"
        )
    gpus = any(n.get("GPU", 0) > 0 for n in nodes)
    for spec in pending:
        coordinates = spec.decl.coordinates and spec.decl.coordinates(
            spec.decl.config.model_validate(spec.config)
        )
        if coordinates:
            continue  # its workers ask for the stage's resources, through Ray Train
        bundle = {"CPU": spec.resources["num_cpus"]}
        if gpus and spec.resources["num_gpus"]:
            bundle["GPU"] = spec.resources["num_gpus"]
        try:
            check(f"stage {spec.name} (resources.{spec.decl.resources})", [bundle])
        except Unplaceable as err:
            raise preflight.PreflightError(str(err)) from None


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
    tracking.close_stale(
        run.run_id, status="KILLED", reason=f"the pipeline run was interrupted ({stop.signal_name})"
    )
    tracking.set_tags(run.run_id, {"fdm.interrupted": stop.signal_name})
    tracking.end(run.run_id, "KILLED")


def open_parent(
    cfg: PipelineConfig, tracking: Tracking, console: Console, tags: dict[str, str] | None = None
) -> str:
    """A new MLflow parent run for `cfg` (its params, tags and config.yaml); prints its id and UI link."""
    run_id = tracking.start_parent(cfg.name, parent_params(cfg), {"pipeline": cfg.name, **(tags or {})})
    config = scrub_tree(cfg.model_dump(mode="json"))  # no credential reaches the record
    tracking.log_text(run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
    console.print(f"MLflow run id: [bold]{run_id}[/bold]  (tracking {tracking.tracking_uri})", soft_wrap=True)
    link = run_link(tracking.tracking_uri, tracking.experiment_id, run_id)
    console.print(f"MLflow UI: {link}", highlight=False, soft_wrap=True)
    return run_id


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

    return _execute(cfg, plan(cfg), open_run, address, console, command=command, allow_local=allow_local)


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
    overrides: list[str] | None = None,
    allow_local: bool = False,
) -> PipelineRun:
    """Re-run `stage` (and its downstream if asked) of a past run as a new pipeline run.

    The new MLflow parent run (in the same experiment) is tagged `fdm.rerun_of` = `run_id`; the past run's
    record is only read. The forced stages recompute from scratch into new versions of their outputs. The
    stages they need upstream are logged as cached child runs linking the outputs they reuse; those must be
    in the store, unless `overrides` (`--set`, applied to the past run's config) changed their key, which is
    then an ordinary cache miss."""
    console = console or Console()
    cfg, tracking = load_run_config(tracking_uri, run_id)
    original = {s.name: s.key for s in plan(cfg)}
    if overrides:
        cfg = parse_config(cfg.model_dump(mode="json"), overrides)
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
    unchanged = {s.name for s in selected if original.get(s.name) == s.key}
    command = f"fdm rerun {run_id} --stage {stage}" + (" --downstream" if downstream else "")
    command += "".join(f" --set {o}" for o in overrides or [])
    tags = {"fdm.rerun_of": run_id, "fdm.rerun_stage": stage, "fdm.rerun_downstream": str(downstream).lower()}
    tags.update({**interrupt.driver_tags(), **provenance_tags(command, REPO)})
    if overrides:
        tags["fdm.rerun_set"] = " ".join(overrides)

    def open_run() -> tuple[Tracking, str]:
        new_id = open_parent(cfg, tracking, console, tags)
        what = f"{stage} and its downstream" if downstream else stage
        console.print(f"a re-run of {run_id} ({what}); that run's record is left as it was", highlight=False)
        return tracking, new_id

    return _execute(
        cfg,
        selected,
        open_run,
        address,
        console,
        force=set(targets),
        cached_only=(needed - set(targets)) & unchanged,
        rerun=True,
        command=command,
        allow_local=allow_local,
    )
