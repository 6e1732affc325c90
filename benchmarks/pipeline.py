"""Orchestration overhead of the pipeline, and the time of a fully cached re-run.

Overhead = the part of the run's wall time when no stage function was computing (wall time minus the
union of the stages' compute intervals, each measured inside its stage function), as a fraction of the
wall time. Resource limits that serialise stages the DAG would allow in parallel are not overhead.
Goal (issue 6): <= 5% on the digits pipeline; a fully cached re-run <= 10 s.

    python -m benchmarks.pipeline [--quick]     # --quick: the toy2d pipeline, small settings

writes benchmarks/results/pipeline{,_quick}.md and logs it to MLflow.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from matplotlib.figure import Figure
from rich.console import Console

from benchmarks.common import command, machine, png, write_report
from pipelines.config import PipelineConfig, load_config
from pipelines.runner import PipelineRun, run_pipeline

CONFIGS = Path(__file__).resolve().parent.parent / "pipelines" / "configs"
QUICK = (
    "train.steps=300",
    "distill.start_steps=8",
    "distill.end_steps=2",
    "distill.round.updates=50",
    "distill.round.final_updates=50",
    "evaluate.num_samples=300",
)
# The CI smoke test's: every stage runs, each for a few steps.
TINY = (
    "train.steps=4",
    "train.checkpoint_every=2",
    "distill.start_steps=4",
    "distill.end_steps=2",
    "distill.round.updates=2",
    "distill.round.final_updates=2",
    "evaluate.num_samples=32",
    "evaluate.batch_size=32",
    "evaluate.samplers=[{method: heun, steps: 4}]",
)


@dataclass(frozen=True)
class Mode:
    """Which shipped config one invocation runs, with which overrides."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    cached_repeats: int = 3


MODES = {
    "full": Mode("full", "digits"),
    "quick": Mode("quick", "toy2d", QUICK),
    "tiny": Mode("tiny", "toy2d", TINY, cached_repeats=1),
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
    """One pipeline run and the wall-clock interval around it."""

    run: PipelineRun
    start: float
    end: float

    @property
    def wall(self) -> float:
        return self.end - self.start

    def spans(self, kind: str) -> list[list[float]]:
        """The stages' wall-clock spans of `kind`: "task_span" (the Ray task) or "compute_span" (the stage
        function inside it; absent for cached stages)."""
        return [o.result.info[kind] for o in self.run.outcomes.values() if o.result and kind in o.result.info]

    def phases(self, kind: str) -> tuple[float, float]:
        """(start-up: run start to the first span's start, finish: the last span's end to run end)."""
        spans = self.spans(kind)
        return min(b for b, _ in spans) - self.start, self.end - max(e for _, e in spans)


def timed(cfg: PipelineConfig) -> Timed:
    """Run the pipeline once (Ray started and stopped inside, as `fdm run` does), timed on the wall clock."""
    start = time.time()
    run = run_pipeline(cfg, console=Console(quiet=True))
    if run.failed:
        raise RuntimeError(f"pipeline failed: {[o.error for o in run.failed]}")
    return Timed(run, start, time.time())


def timeline(runs: dict[str, Timed]) -> Figure:
    """One panel per run: each stage's Ray task (light) and stage function (dark) against seconds since
    the run started, so the start-up and the gaps between stages show as white space."""
    fig = Figure(figsize=(10, 1.2 + 0.28 * len(next(iter(runs.values())).run.outcomes)), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, (title, t) in zip(axes, runs.items()):
        names = list(t.run.outcomes)
        for y, name in enumerate(names):
            info = t.run.outcomes[name].result.info
            for kind, color in (("task_span", "#9ecae1"), ("compute_span", "#08519c")):
                if kind in info:
                    b, e = info[kind]
                    ax.barh(y, e - b, left=b - t.start, color=color, height=0.6)
        ax.axvline(t.wall, color="grey", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1.02 * t.wall)  # from the run start: the white space before the first bar is start-up
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds since the run started (dashed: run end)")
        ax.set_title(title, fontsize=10)
    return fig


def run(mode: Mode) -> tuple[str, dict[str, bytes]]:
    """Time the pipeline of `mode` in a scratch store and MLflow (on the running Ray, else one of its own),
    then its fully cached re-run `mode.cached_repeats` times; the report and its timeline plot."""
    ray_note = (
        "Runs share the Ray cluster that was already up."
        if ray.is_initialized()
        else "Each run starts and stops its own embedded Ray cluster, as `fdm run` does."
    )
    with tempfile.TemporaryDirectory() as tmp:
        scratch = [f"store.root={tmp}/store", f"tracking.uri=sqlite:///{tmp}/mlflow.db"]
        cfg = load_config(CONFIGS / f"{mode.config}.yaml", [*mode.overrides, *scratch])
        first = timed(cfg)
        cached = [timed(cfg) for _ in range(mode.cached_repeats)]
    compute = busy_seconds(first.spans("compute_span"))
    overhead = first.wall - compute
    startup, finish = first.phases("compute_span")
    between = overhead - startup - finish
    cached_walls = sorted(c.wall for c in cached)
    cached_median = statistics.median(cached_walls)
    c_startup = statistics.median(c.phases("task_span")[0] for c in cached)
    all_cached = all(o.status == "cached" for c in cached for o in c.run.outcomes.values())
    spread = f"{cached_walls[0]:.1f}-{cached_walls[-1]:.1f}"
    cached_cell = f"**{cached_median:.1f} s** ({spread}); all stages cached: {all_cached}"
    rows = "\n".join(f"| {n} | {o.status} | {o.seconds or 0:.1f} |" for n, o in first.run.outcomes.items())
    title = mode.config + ("" if mode.name == "full" else f" {mode.name}")
    config = f"pipelines/configs/{mode.config}.yaml"
    plot_name = f"pipeline{'' if mode.name == 'full' else '_' + mode.name}.png"
    plot = png(timeline({"first run": first, "a fully cached re-run": cached[len(cached) // 2]}))
    report = f"""# Pipeline orchestration overhead ({title})

Machine: {machine()}. Command: `{command("pipeline", mode.name)}`. Config `{config}`
with overrides `{" ".join(mode.overrides) or "none"}`; seeds as in the config (0). {ray_note}
MLflow is a fresh sqlite file in a scratch directory.

| measure | value | goal |
|---|---:|---:|
| wall time of the run (Ray start, MLflow, all stages) | {first.wall:.1f} s | |
| compute: time some stage function was running | {compute:.1f} s | |
| orchestration overhead: time none was | {overhead:.1f} s = **{overhead / first.wall:.1%}** of wall | <= 5% |
| of which start-up: MLflow, Ray start, a worker warm, to the first stage function | {startup:.1f} s | |
| of which between stage functions: MLflow child runs, store, scheduling | {between:.1f} s | |
| of which finish: after the last stage function, summary, Ray shutdown | {finish:.1f} s | |
| fully cached re-run, wall: median of {len(cached)} (min-max) | {cached_cell} | <= 10 s |
| of which start-up to the first stage (median) | {c_startup:.1f} s | |

![stage timeline]({plot_name})

Stages of the first run:

| stage | status | compute seconds |
|---|---|---:|
{rows}

Reading: the overhead is mostly fixed start-up (Ray's processes, then a worker importing torch, MLflow and
the stage code; Ray's setup hook starts that import as the worker is prestarted) and does not grow with
stage length, so its fraction shrinks as stages grow.
"""
    return report, {plot_name: plot}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="the toy2d pipeline, small settings")
    args = ap.parse_args(argv)
    report, files = run(MODES["quick" if args.quick else "full"])
    print(report)
    print(f"report: {write_report('pipeline' + ('_quick' if args.quick else ''), report, files)}")


if __name__ == "__main__":
    main()
