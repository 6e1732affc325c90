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
from infra.tracking import Tracking, provenance_tags, run_link
from pipelines import interrupt, preflight
from pipelines.config import PipelineConfig, parse_config
from pipelines.executor import (
    CorruptInputError,
    RunEnv,
    execute_stage,
    gate_failure,
    record_resolved,
    serve,
    skip_reason,
    skipped,
    warm_worker,
)
from pipelines.plan import Gate, StageError, StageSpec, downstream_of, first_teacher, plan, round_stages
from tasks.stage import StageResult
from tasks.stages.evaluate import SamplerSpec

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

    @property
    def failed(self) -> list[StageOutcome]:
        return [o for o in self.outcomes.values() if o.status == "failed"]


def headline(spec: StageSpec, result: StageResult | None, error: str | None = None) -> str:
    """The stage's headline metric (from its declaration), its skip reason, or its error."""
    if result is None:
        return error.splitlines()[0][:60] if error else ""
    if result.info.get("skipped"):
        return str(result.info["skipped"])
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
                    env.tracking.close_stale(run.run_id, name, status="FAILED")
            live.update(ray.get(board.snapshot.remote()))
    # Results arrive in any order; in plan (topological) order, a failure below a failure is "not run".
    for o in run.outcomes.values():
        if o.status == "failed" and any(
            run.outcomes[u].status in ("failed", "not run") for u in o.spec.upstream
        ):
            o.status = "not run"


Point = tuple[int, float, int]  # (sampling steps, quality, NFE)


def _quality_points(run: PipelineRun, teacher: SamplerSpec) -> dict[str, list[Point]]:
    """Quality by sampling steps: the base model's samplers, and the distilled students on their own grids,
    joined to the teacher they started from (the base model with sampler `teacher`)."""
    base = run.outcomes.get("evaluate_base")
    if base is None or base.result is None:
        return {}
    series: dict[str, list[Point]] = {}
    by_sampler = base.result.info.get("by_sampler", {})
    for tag, m in by_sampler.items():
        method = tag.rstrip("0123456789")
        series.setdefault(f"base model, {method}", []).append(
            (int(tag[len(method) :]), m["quality"], int(m["nfe"]))
        )
    students = [
        (o.spec.steps, o.result.metrics["quality"], int(o.result.metrics.get("nfe", o.spec.steps)))
        for o in run.outcomes.values()
        if o.spec.round and o.result and "quality" in o.result.metrics
    ]
    if students:
        first = by_sampler.get(teacher.tag)
        start = [(teacher.steps, first["quality"], int(first["nfe"]))] if first else []
        series[f"distilled students (from the base model's {teacher.method})"] = start + students
    return {label: sorted(pts) for label, pts in series.items()}


def _summary_plot(points: dict[str, list[Point]], metric: str, title: str) -> bytes:
    """The quality-vs-steps plot, about 800 px wide (matplotlib is imported only when one is drawn)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.subplots()
    for label, pts in points.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for steps, quality, nfe in pts:
            ax.annotate(f"NFE {nfe}", (steps, quality), textcoords="offset points", xytext=(4, 4), fontsize=7)
    steps = sorted({p[0] for pts in points.values() for p in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(n) for n in steps])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def summary_png(run: PipelineRun, cfg: PipelineConfig, store: ArtifactStore) -> bytes | None:
    """The run's quality-vs-steps plot, kept in the store by a hash of what it shows: a re-run with the
    same results (every fully cached run) reuses it instead of drawing it again."""
    points = _quality_points(run, first_teacher(cfg))
    if not points:
        return None
    metric = run.outcomes["evaluate_base"].result.info.get("metric_name", "quality").upper()
    title = f"{cfg.name}: sample quality against sampling steps"
    digest = hashlib.sha256(json.dumps([points, metric, title, PLOT_VERSION]).encode()).hexdigest()[:16]
    path = f"plots/quality_vs_steps-{digest}.png"
    try:
        return store.read_bytes(path)
    except NotFoundError:
        png = _summary_plot(points, metric, title)
        store.write_bytes(path, png)
        return png


@dataclass
class Halving:
    """What distillation delivered: each student's steps, quality and gate verdict, the final student (the
    last one within the quality gate; None: the base model is final) and why halving stopped."""

    students: list[dict[str, Any]] = field(default_factory=list)
    final: StageOutcome | None = None
    stopped: str = ""

    def record(self) -> dict[str, Any]:
        final = self.final
        return {
            "students": self.students,
            "final_model": {"stage": final.spec.name, "steps": final.spec.steps} if final else None,
            "halving_stopped": self.stopped,
        }


def halving(run: PipelineRun, cfg: PipelineConfig) -> Halving:
    """Walk the rounds in order: a student counts while its round produced it and, with a quality gate, its
    evaluation is within `quality_gate` x the base model's headline; the first that is not ends halving."""
    out, factor = Halving(), cfg.distill.quality_gate
    if not cfg.distill.student_steps:
        out.stopped = "distillation disabled"
        return out
    base = run.outcomes.get("evaluate_base")
    specs = [o.spec for o in run.outcomes.values()]
    for k, steps in enumerate(cfg.distill.student_steps, start=1):
        dist_spec, ev_spec = round_stages(specs, k)
        dist = run.outcomes[dist_spec.name] if dist_spec else None
        ev = run.outcomes[ev_spec.name] if ev_spec else None
        if dist is None or dist.result is None:
            out.stopped = f"{dist.spec.name} {dist.status}" if dist else f"round {k} not planned"
            return out
        if dist.result.info.get("skipped"):
            out.stopped = dist.result.info["skipped"]
            return out
        quality = ev.result.metrics.get("quality") if ev and ev.result else None
        out.students.append({"stage": dist.spec.name, "steps": steps, "quality": quality})
        if factor is not None:
            if quality is None or base is None or base.result is None:
                what = f"{ev.spec.name} {ev.status}" if ev else f"round {k}'s evaluation missing"
                out.stopped = f"{what}: no quality to gate on"
                return out
            failure = gate_failure(Gate(ev.spec.name, base.spec.name, None, factor), ev.result, base.result)
            out.students[-1]["passed_gate"] = failure is None
            if failure:
                out.stopped = f"{failure}; the {steps}-step student is not kept"
                return out
        out.final = dist
    out.stopped = f"reached end_steps {cfg.distill.end_steps}"
    return out


def register_final_student(
    run: PipelineRun, cfg: PipelineConfig, tracking: Tracking, final: StageOutcome | None
) -> str | None:
    """Register `final` (the run's final student, `halving(...).final`) as a version of
    `<experiment>-student` with alias `candidate`: the model logged when it was computed; a cached student's
    earlier version (same key) gets the alias again, and a cached student never registered (e.g. the last
    one within a quality gate) its logged model."""
    from infra.mlflow_models import logged_model_uri, register

    if final is None:
        return None
    name, key = f"{cfg.tracking.experiment}-student", final.spec.key
    tags = {"fdm.key": key, "fdm.steps": str(final.spec.steps), "fdm.pipeline_run": run.run_id}
    versions = [
        v for v in tracking.client.search_model_versions(f"name = '{name}'") if v.tags.get("fdm.key") == key
    ]
    uri = final.result.info.get("model_uri") or (None if versions else logged_model_uri(tracking, key))
    if uri is not None:
        version = register(tracking, uri, name, "candidate", tags)
    elif versions:
        version = max(versions, key=lambda v: int(v.version)).version
        tracking.client.set_registered_model_alias(name, "candidate", version)
    else:
        return None
    tracking.set_tags(run.run_id, {"fdm.registered_model": f"models:/{name}/{version}"})
    return f"models:/{name}@candidate"


def describe(run: PipelineRun, cfg: PipelineConfig, command: str, h: Halving) -> str:
    """The parent run's description: what ran, the final student, and how to reproduce it."""
    status = [o.status for o in run.outcomes.values()]
    text = (
        f"Pipeline `{cfg.name}` on `{cfg.data.source.kind}` data: {len(status)} stages, "
        f"{status.count('done')} computed, {status.count('cached')} cached, {status.count('failed')} failed."
    )
    if h.students:
        steps = ", ".join(
            f"{st['steps']}" + ("" if st.get("passed_gate", True) else " (outside the quality gate)")
            for st in h.students
        )
        final = h.final
        text += (
            f"\n\nStudents' sampling steps: {steps}. "
            + (
                f"Final student: {final.spec.name}, {final.spec.steps} sampling steps."
                if final
                else "No student is kept: the base model is final."
            )
            + f" Halving stopped: {h.stopped}."
        )
    return text + f"\n\nReproduce: `{command}` at the commit in the `mlflow.source.git.commit` tag."


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
    png = summary_png(run, cfg, store)
    if png:
        tracking.log_bytes(run.run_id, png, "quality_vs_steps.png")
    tracking.log_metrics(run.run_id, {"wall_seconds": run.wall_seconds})
    data = run.outcomes.get("prepare_data")
    if data is not None and data.result is not None:
        tracking.log_dataset(run.run_id, data.result.output_uri, "prepare_data", data.result.digest)
    for o in run.outcomes.values():  # quality against sampling steps, drawn by MLflow as a curve
        if o.result is not None and o.spec.steps and "quality" in o.result.metrics:
            name = o.result.info.get("metric_name", "quality")
            tracking.log_metrics(run.run_id, {name: o.result.metrics["quality"]}, o.spec.steps)
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
    registered = None if run.failed else register_final_student(run, cfg, tracking, h.final)
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
    tracking.close_stale(run.run_id, status="KILLED")
    tracking.set_tags(run.run_id, {"fdm.interrupted": stop.signal_name})
    tracking.end(run.run_id, "KILLED")


def open_parent(
    cfg: PipelineConfig, tracking: Tracking, console: Console, tags: dict[str, str] | None = None
) -> str:
    """A new MLflow parent run for `cfg` (its params, tags and config.yaml); prints its id and UI link."""
    run_id = tracking.start_parent(
        cfg.name, cfg.model_dump(mode="json"), {"pipeline": cfg.name, **(tags or {})}
    )
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
) -> PipelineRun:
    """Run the full DAG as a new MLflow parent run; stages whose outputs are in the store are cached.
    `command` is how the run was started (its MLflow source), e.g. the `fdm run ...` command line."""
    console = console or Console()
    command = command or f"fdm run ({cfg.name})"

    def open_run() -> tuple[Tracking, str]:
        tracking = Tracking.setup(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
        for gone in tracking.fail_orphans(interrupt.driver_tags()["fdm.driver_host"], interrupt.driver_alive):
            console.print(f"marked run {gone} FAILED: it was RUNNING, its driver is gone")
        tags = {**interrupt.driver_tags(), **provenance_tags(command, REPO)}
        return tracking, open_parent(cfg, tracking, console, tags)

    return _execute(cfg, plan(cfg), open_run, address, console, command=command)


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
    )
