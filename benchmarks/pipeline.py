"""The pipeline engine's costs as a user meets them: `fdm run` and `fdm stages` timed as subprocesses.

- Orchestration overhead of a first run: the part of its wall time (the whole `fdm run` process) when no
  stage function was computing (wall minus the union of the stages' compute spans, which each stage
  records in the run's summary.json), as a fraction of the wall time. Resource limits that serialise
  stages the DAG would allow in parallel are not overhead. Goal (issue 17): <= 5% on the digits pipeline.
- A fully cached re-run (`fdm run` again): goals <= 3 s for digits, <= 0.1 x the first run for toy2d.
- `fdm stages RUN_ID`: goal <= 1.5 s.

    python -m benchmarks.pipeline [--quick]   # full: digits and toy2d; --quick: toy2d, small settings

writes benchmarks/results/pipeline{,_quick}.md and logs it to MLflow.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from benchmarks.common import command, machine, png, summary, write_report

CONFIGS = Path(__file__).resolve().parent.parent / "pipelines" / "configs"
QUICK = (
    "train.steps=300",
    "distill.start_steps=8",
    "distill.end_steps=2",
    "distill.round.updates=50",
    "distill.round.final_updates=50",
    "evaluate.num_samples=300",
)
# Every stage runs, each for a few steps: the CI smoke test's (TINY) and tests/test_engine.py's settings.
FEW_STEPS = (
    "train.steps=4",
    "distill.start_steps=4",
    "distill.end_steps=2",
    "distill.round.updates=2",
    "distill.round.final_updates=2",
    "evaluate.num_samples=32",
    "evaluate.batch_size=32",
    "evaluate.samplers=[{method: heun, steps: 4}]",
)
TINY = (*FEW_STEPS, "train.checkpoint_every=2")
RUN_ID = re.compile(r"MLflow run id: ([0-9a-f]{32})")


@dataclass(frozen=True)
class Mode:
    """Which shipped configs one invocation runs, with which overrides, and how often the cheap commands
    are repeated (their median is reported)."""

    name: str
    configs: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    repeats: int = 3


MODES = {
    "full": Mode("full", ("digits", "toy2d")),
    "quick": Mode("quick", ("toy2d",), QUICK),
    "tiny": Mode("tiny", ("toy2d",), TINY, repeats=1),
}


def busy_seconds(spans: list[list[float]]) -> float:
    """Length of the union of [start, end] intervals: the time at least one of them was running."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


@dataclass
class Timed:
    """One `fdm` process: its wall-clock interval, and for a pipeline run its id and stage summary."""

    start: float
    end: float
    out: str
    run_id: str | None = None
    summary: dict | None = None
    distillation: dict | None = None  # summary.json's record of the students, the final model, the stop

    @property
    def wall(self) -> float:
        return self.end - self.start

    def spans(self, kind: str) -> list[list[float]]:
        """The stages' wall-clock spans of `kind`: "task_span" (the Ray task) or "compute_span" (the stage
        function inside it; absent for stages that did not compute)."""
        return [v["spans"][kind] for v in (self.summary or {}).values() if kind in v.get("spans", {})]

    def phases(self, kind: str) -> tuple[float, float]:
        """(start-up: process start to the first span's start, finish: the last span's end to exit)."""
        spans = self.spans(kind)
        return min(b for b, _ in spans) - self.start, self.end - max(e for _, e in spans)

    def statuses(self) -> dict[str, str]:
        return {name: v["status"] for name, v in (self.summary or {}).items()}


def fdm(args: list[str], cwd: str, tracking_uri: str | None = None) -> Timed:
    """Run `fdm ARGS` as a user does (a fresh process) and time it; for `fdm run`, fetch its summary."""
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"fdm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    found = RUN_ID.search(proc.stdout)
    timed = Timed(start, end, proc.stdout, found.group(1) if found else None)
    if tracking_uri and timed.run_id:
        path = MlflowClient(tracking_uri).download_artifacts(timed.run_id, "summary.json", cwd)
        record = json.loads(Path(path).read_text())
        timed.summary, timed.distillation = record["stages"], record["distillation"]
    return timed


@dataclass
class Measured:
    """A config's first run, its fully cached re-runs, and `fdm stages` on the first run."""

    config: str
    tracking_uri: str
    first: Timed
    cached: list[Timed]
    stages: list[Timed]

    @property
    def overhead(self) -> tuple[float, float, float, float]:
        """(overhead, start-up, between stages, finish) of the first run, in seconds."""
        total = self.first.wall - busy_seconds(self.first.spans("compute_span"))
        startup, finish = self.first.phases("compute_span")
        return total, startup, total - startup - finish, finish


def measure(config: str, mode: Mode, tmp: str) -> Measured:
    """First run, then `mode.repeats` fully cached re-runs and `fdm stages`, in a scratch store and MLflow."""
    tracking = f"sqlite:///{tmp}/{config}/mlflow.db"
    scratch = [f"store.root={tmp}/{config}/store", f"tracking.uri={tracking}"]
    sets = [a for o in (*mode.overrides, *scratch) for a in ("--set", o)]
    run_args = ["run", str(CONFIGS / f"{config}.yaml"), *sets]
    first = fdm(run_args, tmp, tracking)
    cached = [fdm(run_args, tmp, tracking) for _ in range(mode.repeats)]
    stages = [fdm(["stages", first.run_id, "--tracking-uri", tracking], tmp) for _ in range(mode.repeats)]
    return Measured(config, tracking, first, cached, stages)


def _median(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"{statistics.median(xs):.2f} s ({xs[0]:.2f}-{xs[-1]:.2f})"


def timeline(m: Measured) -> Figure:
    """Each stage's Ray task (light) and stage function (dark) against seconds since `fdm run` started,
    so the start-up and the gaps between stages show as white space."""
    t = m.first
    names = list(t.summary)
    fig = Figure(figsize=(8, 1.2 + 0.28 * len(names)), layout="constrained")
    ax = fig.subplots()
    for y, name in enumerate(names):
        spans = t.summary[name].get("spans", {})
        for kind, color in (("task_span", "#9ecae1"), ("compute_span", "#08519c")):
            if kind in spans:
                b, e = spans[kind]
                ax.barh(y, e - b, left=b - t.start, color=color, height=0.6)
    ax.axvline(t.wall, color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1.02 * t.wall)  # from the process start: the white space before the first bar is start-up
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since `fdm run` started (dashed: exit)")
    ax.set_title(f"{m.config}: first run", fontsize=10)
    return fig


def section(m: Measured, mode: Mode) -> str:
    """The report's table for one config."""
    overhead, startup, between, finish = m.overhead
    first, walls = m.first, [c.wall for c in m.cached]
    all_cached = all(set(c.statuses().values()) == {"cached"} for c in m.cached)
    client = MlflowClient(m.tracking_uri)
    no_ray = all(client.get_run(c.run_id).data.tags.get("fdm.used_ray") == "false" for c in m.cached)
    ratio = statistics.median(walls) / first.wall
    stages_wall = _median([t.wall for t in m.stages])
    rows = "\n".join(f"| {n} | {v['status']} | {v['seconds'] or 0:.1f} |" for n, v in first.summary.items())
    return f"""## {m.config}

Config `pipelines/configs/{m.config}.yaml` with overrides `{" ".join(mode.overrides) or "none"}`.

| measure | value | goal |
|---|---:|---:|
| first run: `fdm run` wall time (process start to exit) | {first.wall:.1f} s | |
| compute: time some stage function was running | {first.wall - overhead:.1f} s | |
| orchestration overhead: time none was | {overhead:.1f} s = **{overhead / first.wall:.1%}** of wall | <= 5% |
| of which start-up: imports, MLflow, Ray, a warm worker, to the first stage | {startup:.1f} s | |
| of which between stage functions: MLflow child runs, store, scheduling | {between:.1f} s | |
| of which finish: after the last stage function, summary, Ray shutdown, exit | {finish:.1f} s | |
| fully cached re-run: `fdm run` wall, median (min-max) | **{_median(walls)}** | digits <= 3 s |
| fully cached re-run / first run | **{ratio:.3f}** | toy2d <= 0.1 |
| every stage cached in every re-run | {all_cached} | |
| no re-run started Ray | {no_ray} | |
| `fdm stages RUN_ID` wall, median (min-max) | **{stages_wall}** | <= 1.5 s |

Stages of the first run:

| stage | status | compute seconds |
|---|---|---:|
{rows}
{distilled(first)}"""


def distilled(first: Timed) -> str:
    """The first run's students: quality against the base model's headline, the final model, the stop."""
    d, stages = first.distillation or {}, first.summary or {}
    base = stages.get("evaluate_base", {}).get("metrics", {}).get("quality")
    if not d.get("students") or not base:
        return ""
    rows = "\n".join(
        f"| {st['steps']} | {st['quality']:.3f} | {st['quality'] / base:.2f} | "
        f"{'' if 'passed_gate' not in st else 'yes' if st['passed_gate'] else 'no'} |"
        for st in d["students"]
    )
    final = d["final_model"]
    kept = (
        f"{final['stage']} ({final['steps']} step{'s' * (final['steps'] != 1)})"
        if final
        else "the base model"
    )
    return f"""
Distillation in the first run (quality: the config's headline metric; the base model's {base:.3f}):

| student steps | quality | ÷ base model | within the quality gate |
|---:|---:|---:|---|
{rows}

Final model: {kept}. Halving stopped: {d["halving_stopped"]}.
"""


def run(mode: Mode) -> tuple[str, dict[str, bytes]]:
    """Measure every config of `mode` in one scratch directory; the report and the first run's timeline."""
    with tempfile.TemporaryDirectory() as tmp:
        measured = [measure(config, mode, tmp) for config in mode.configs]
        sections = "\n".join(section(m, mode) for m in measured)
    plot_name = f"pipeline{'' if mode.name == 'full' else '_' + mode.name}.png"
    plot = png(timeline(measured[0]))
    report = f"""# Pipeline engine: overhead, cached re-runs, `fdm stages` ({mode.name})

Machine: {machine()}. Command: `{command("pipeline", mode.name)}`. Medians over {mode.repeats} repeats.
Every number is a fresh `fdm`
process, as a user runs it (`python -m pipelines.cli ...`), on a scratch store and a fresh MLflow sqlite
file; seeds as in the configs (0). A first run starts and stops its own embedded Ray cluster; a fully
cached re-run decides every hit from manifests and starts no Ray at all.

{sections}
![stage timeline of the first {measured[0].config} run]({plot_name})

Reading: a first run's overhead is mostly fixed start-up (imports, Ray's processes, then a worker
importing torch and the stage code, which Ray's setup hook starts as the worker is prestarted), so its
fraction shrinks as stages grow. A cached re-run is the `fdm` process itself: Python, MLflow's import and
one MLflow child run per stage.
"""
    return report, {plot_name: plot, **headline(measured[0], plot_name.removesuffix(".png"))}


def headline(m: Measured, name: str) -> dict[str, bytes]:
    """The summary file: the first run's wall time and overhead, and the cached re-run's median wall."""
    overhead = m.overhead[0] / m.first.wall
    cached = statistics.median(c.wall for c in m.cached)
    return summary(
        name,
        f"the {m.config} pipeline in {m.first.wall:.1f} s; orchestration overhead {overhead:.1%} of it "
        f"(goal <= 5%: {'met' if overhead <= 0.05 else 'not met'}); a fully cached re-run {cached:.2f} s",
        wall_seconds=round(m.first.wall, 1),
        overhead_fraction=round(overhead, 4),
        cached_seconds=round(cached, 2),
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="the toy2d pipeline, small settings")
    args = ap.parse_args(argv)
    report, files = run(MODES["quick" if args.quick else "full"])
    print(report)
    print(f"report: {write_report('pipeline' + ('_quick' if args.quick else ''), report, files)}")


if __name__ == "__main__":
    main()
