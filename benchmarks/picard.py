"""ParaDiGMS single-sample latency on the digits U-Net: the sequential sampler vs Picard windows, evaluated
locally in one batched call or by 1 and 2 Ray actors, with plain Picard or ParaTAA's triangular Anderson
solver; where an iteration's time goes; and the goals of issue 26 with today's value beside ours.

A VP-FDM digits U-Net, briefly trained by the product's train_base stage, samples one image with DDPM-1000
and Euler (= DDIM) 100, sequentially
and by Picard iteration. Every row times the sequential and the Picard sampler alternately, after a warm-up.

    python -m benchmarks.picard [--quick]

writes benchmarks/results/picard.md, picard.png and the headline picard.summary.json (picard_quick.* with
--quick), and logs them to MLflow.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import ray
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FormatStrFormatter

from benchmarks.common import DIGITS_DATA, DIGITS_MODEL, command, machine, png, summary, write_report
from benchmarks.stage_cache import Stages
from fdm_core.picard import PicardStats, parallel_sample
from fdm_core.precond import Denoiser
from fdm_core.samplers import process_grid, sample
from infra.ray_evaluator import RayEvaluator
from infra.ray_runtime import init_ray
from infra.store import open_store
from tasks.checkpoints import load_model
from tasks.sample import StepFactory, draw_samples
from tasks.sample_options import SampleConfig
from tasks.stages.train_base import TrainBaseConfig, TrainConfig

SEED = 0
THREADS = 1
MODEL = "digits U-Net"
# Published figures beside ours (docs/design.md: ParaDiGMS; the papers' GPUs, not this CPU).
ANCHORS = (
    "ParaDiGMS (Shih et al. 2023): SD-v2 DDPM-1000 in 44 parallel iterations (2040 model evaluations), "
    "3.1x faster on 8 A100s; LSUN DDPM-1000 in 42, 2.9x; DDIM-200 in 16; DiffusionPolicy DDPM-100 in 25, "
    "3.4x; on one GPU about 0.7x. ParaTAA (Tang et al., ICML 2024): Stable Diffusion DDIM-100 in 7 "
    "parallel steps with the same images. ParaSolver (ICLR 2025): up to 12.1x wall-clock."
)

Case = tuple[str, int, float, str]  # evaluator name, window, tol, solver


@dataclass(frozen=True)
class Mode:
    """Training steps of the U-Net, each sampler's Picard cases, timed pairs per case, and the stage's
    settings (those of digits.yaml's picard section) for the headline row."""

    name: str
    train_steps: int
    configs: dict[str, tuple[str, int, tuple[Case, ...]]]
    pairs: int
    stage: dict[str, Any] = field(default_factory=dict)


def _both(evaluator: str, window: int, tol: float) -> tuple[Case, ...]:
    return ((evaluator, window, tol, "picard"), (evaluator, window, tol, "anderson"))


FULL = {
    "DDPM-1000": (
        "ddpm",
        1000,
        (
            *_both("local batched", 64, 0.1),
            *_both("local batched", 128, 0.03),
            *_both("local batched", 128, 0.01),
            *_both("Ray x1", 64, 0.1),
            *_both("Ray x2", 64, 0.1),
            *_both("Ray x2", 128, 0.01),
        ),
    ),
    "Euler-100": (
        "euler",
        100,
        (
            *_both("local batched", 32, 0.1),
            *_both("local batched", 100, 0.01),
            *_both("local batched", 100, 0.003),
            *_both("Ray x1", 100, 0.003),
            *_both("Ray x2", 100, 0.003),
        ),
    ),
}
# digits.yaml's picard section (the stage's driver holds resources.sample's 1 CPU, its actors 0.5 each).
STAGE = {"sampler": "ddpm", "steps": 1000, "window": 64, "tol": 0.1, "solver": "anderson", "num": 1}
MODES = {
    "full": Mode("full", 600, FULL, 3, {**STAGE, "actors": 2, "actor_cpus": 0.5}),
    "quick": Mode(
        "quick",
        200,
        {
            "DDPM-1000": ("ddpm", 1000, (*_both("local batched", 64, 0.1), *_both("Ray x2", 64, 0.1))),
            "Euler-100": ("euler", 100, (*_both("local batched", 100, 0.003), *_both("Ray x1", 100, 0.003))),
        },
        1,
    ),
    # The CI smoke test's: short samplers, one window per evaluator and at most one actor.
    "tiny": Mode(
        "tiny",
        2,
        {
            "DDPM-20": ("ddpm", 20, (("local batched", 8, 0.1, "picard"), ("Ray x1", 8, 0.1, "anderson"))),
            "Euler-10": ("euler", 10, (("local batched", 8, 0.1, "anderson"),)),
        },
        1,
    ),
}


@dataclass
class Row:
    config: str
    evaluator: str
    window: int
    tol: float
    solver: str
    seq_seconds: list[float]
    seconds: list[float]
    stats: PicardStats
    deviation: float
    actor_ms: dict[str, float]

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.seq_seconds, self.seconds)]

    @property
    def speedup(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ms_per_iteration(self) -> float:
        return 1e3 * statistics.median(self.seconds) / self.stats.parallel_iterations


def train(root: str, steps: int) -> tuple[Denoiser, str, str]:
    """VP-FDM training of the digits U-Net by the product's train_base stage on the prepared digits (Adam,
    constant EMA 0.99, no lr ramp-up or clipping), seeded: brief, but enough for a non-trivial denoiser.
    Returns the model, its artifact's URI and a note on the training."""
    stages = Stages(root)
    data = stages("prepare_data", DIGITS_DATA)
    train_cfg = TrainConfig(
        process="vp",
        fdm=True,
        steps=steps,
        lr_rampup=0,
        ema_decay=0.99,
        ema_rampup=None,
        grad_clip=None,
        seed=SEED,
    )
    result = stages("train_base", TrainBaseConfig(model=DIGITS_MODEL, train=train_cfg), dataset=data)
    denoiser, spec = load_model(open_store(result.output_uri), "")
    note = (
        f"{spec['parameters']:,} parameters, {steps} steps at batch {train_cfg.batch_size} in "
        f"{result.metrics['train_seconds']:.0f} s, final loss {result.metrics['train/loss']:.3f} (mean of "
        f"the last {min(steps, train_cfg.log_every)} steps)"
    )
    print(f"trained: {note}", file=sys.stderr, flush=True)
    return denoiser, result.output_uri, note


def noise() -> torch.Generator:
    """The sampler's noise: the same draw for the sequential and every Picard run."""
    return torch.Generator().manual_seed(SEED + 1)


def paired(
    seq: Callable[..., Any], par: Callable[..., Any], pairs: int
) -> tuple[list[float], list[float], Any]:
    """Wall seconds of the sequential and the Picard run, each given the same fresh noise generator, timed
    alternately so that a change in the machine's load hits both alike; one warm-up Picard run first.
    Returns the last Picard result."""
    result = par(generator=noise())
    seq_s, par_s = [], []
    for _ in range(pairs):
        gen_seq, gen_par = noise(), noise()
        t0 = time.perf_counter()
        seq(generator=gen_seq)
        t1 = time.perf_counter()
        result = par(generator=gen_par)
        seq_s.append(t1 - t0)
        par_s.append(time.perf_counter() - t1)
    return seq_s, par_s, result


def ray_floor(evaluator: RayEvaluator, calls: int = 50) -> float:
    """Median ms of one no-op call to every actor at once (Ray's own cost of a round trip)."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        evaluator.pids()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench(denoiser: Denoiser, uri: str, mode: Mode) -> tuple[list[Row], dict[str, Any]]:
    """Every case against the sequential sampler, evaluator by evaluator (the actors of two Ray evaluators
    would not fit on the machine together); the actors' processes and Ray's floor go into `actors`."""
    cases = []
    for config, (method, steps, runs) in mode.configs.items():
        sigmas = process_grid(denoiser.process, steps)
        x = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(SEED)) * sigmas[0]
        ref = sample(denoiser, x, sigmas, method, noise())
        cases.extend((config, method, sigmas, x, ref, run) for run in runs)
    rows: list[Row] = []
    actors: dict[str, Any] = {}
    for name in dict.fromkeys(case[-1][0] for case in cases):
        count = int(name.split("x")[1]) if name.startswith("Ray") else 0
        evaluator = RayEvaluator(StepFactory(uri), actors=count) if count else None
        try:
            if evaluator is not None:
                actors[name] = {"floor_ms": ray_floor(evaluator), "info": evaluator.replica_info}
            for config, method, sigmas, x, ref, (_, window, tol, solver) in cases:
                if _ != name:
                    continue
                if evaluator is not None:
                    evaluator.times = type(evaluator.times)()
                seq_s, par_s, (out, st) = paired(
                    partial(sample, denoiser, x, sigmas, method),
                    partial(
                        parallel_sample,
                        denoiser,
                        x,
                        sigmas,
                        method,
                        window,
                        tol,
                        evaluator=evaluator,
                        solver=solver,
                    ),
                    mode.pairs,
                )
                actor_ms = evaluator.times.per_call_ms() if evaluator is not None else {}
                dev = float((out - ref).abs().max())
                rows.append(Row(config, name, window, tol, solver, seq_s, par_s, st, dev, actor_ms))
                log(rows[-1])
        finally:
            if evaluator is not None:
                evaluator.close()
    order = list(mode.configs)
    return sorted(rows, key=lambda r: order.index(r.config)), actors


def stage_row(uri: str, mode: Mode) -> dict[str, Any] | None:
    """The picard_sample stage's own measurement (tasks.sample.draw_samples, as the stage calls it) with
    digits.yaml's picard settings on this model: median of its pairs, with their min and max."""
    if not mode.stage:
        return None
    cfg = SampleConfig(picard=True, compare=True, pairs=mode.pairs, seed=SEED, **mode.stage)
    _, stats = draw_samples(cfg, uri)
    print(
        f"stage: {stats['speedup']:.2f}x ({stats['speedup_min']:.2f}-{stats['speedup_max']:.2f})",
        file=sys.stderr,
    )
    return stats


def log(row: Row) -> None:
    print(
        f"{row.config} | {row.evaluator} {row.solver} p={row.window} tol={row.tol} | "
        f"{statistics.median(row.seq_seconds) * 1e3:.0f} -> {statistics.median(row.seconds) * 1e3:.0f} ms | "
        f"{row.speedup:.2f}x | {row.stats.parallel_iterations} it | {row.ms_per_iteration:.1f} ms/it | "
        f"dev {row.deviation:.2g}",
        file=sys.stderr,
        flush=True,
    )


def plot(rows: list[Row]) -> bytes:
    """PNG of median speed-up bars (whiskers: min-max of the pairs) per sampler, coloured by evaluator,
    hatched for the Anderson solver, labelled by parallel iterations."""
    configs = list(dict.fromkeys(r.config for r in rows))
    colours = dict(zip(dict.fromkeys(r.evaluator for r in rows), ["tab:blue", "tab:orange", "tab:green"]))
    fig = Figure(figsize=(6 * len(configs), 4))
    axes = fig.subplots(1, len(configs), squeeze=False)[0]
    for ax, config in zip(axes, configs):
        runs = [r for r in rows if r.config == config]
        med = [r.speedup for r in runs]
        err = [[m - min(r.ratios) for m, r in zip(med, runs)], [max(r.ratios) - m for m, r in zip(med, runs)]]
        bars = ax.bar(range(len(runs)), med, yerr=err, color=[colours[r.evaluator] for r in runs], capsize=2)
        for bar, r in zip(bars, runs):
            bar.set_hatch("//" if r.solver == "anderson" else "")
        ax.set_xticks(range(len(runs)), [f"p={r.window} tau={r.tol}" for r in runs], fontsize=6, rotation=90)
        for i, r in enumerate(runs):
            ax.text(i, r.speedup, str(r.stats.parallel_iterations), ha="center", va="bottom", fontsize=6)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%gx"))
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_title(f"{MODEL}, {config}", fontsize=9)
        ax.set_ylabel("speed-up vs sequential", fontsize=8)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    handles.append(Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="//"))
    fig.legend(handles, [*colours, "anderson"], loc="upper right", ncol=4, fontsize=8)
    fig.suptitle(
        "Picard single-sample speed-up (median, whiskers min-max; labels: parallel iterations)", x=0.4
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return png(fig)


def _fmt_ms(parts: dict[str, float]) -> str:
    if not parts:
        return ""
    keys = ("submit", "compute", "overhead", "gather")
    return " / ".join(f"{parts[k]:.1f}" for k in keys)


# Issue 26's goals on parallel iterations: (goal, sampler, max deviation, today, target at most).
ITERATION_GOALS = (
    ("DDPM-1000 parallel iterations at deviation <= 1e-3", "DDPM-1000", 1e-3, "56-62", 30),
    ("Euler-100 parallel iterations, deviation <= 1e-2", "Euler-100", 1e-2, "12-14", 8),
)


def goals(rows: list[Row], stage: dict[str, Any] | None) -> list[tuple[str, str, str, str, str]]:
    """Issue 26's goal rows: (goal, today, target, ours, verdict)."""

    def pick(config: str, evaluator: str, window: int, tol: float, solver: str) -> Row | None:
        key = (config, evaluator, window, tol, solver)
        return next((r for r in rows if (r.config, r.evaluator, r.window, r.tol, r.solver) == key), None)

    out = []
    local, ray1 = (
        pick("DDPM-1000", "local batched", 64, 0.1, "picard"),
        pick("DDPM-1000", "Ray x1", 64, 0.1, "picard"),
    )
    if local and ray1:
        extra = ray1.ms_per_iteration - local.ms_per_iteration
        own = sum(ray1.actor_ms[k] for k in ("submit", "overhead", "gather"))
        ours = (
            f"{extra:.1f} ms ({ray1.ms_per_iteration:.1f} vs {local.ms_per_iteration:.1f} ms per iteration; "
            f"Ray's part of the call {own:.1f} ms)"
        )
        out.append(
            (
                "actor cost per iteration above the local batched call, same CPUs (DDPM-1000, p=64, 1 actor)",
                "about 9-10 ms",
                "<= 2 ms",
                ours,
                extra <= 2,
            )
        )
    ratios = []
    for r in rows:
        if r.config == "DDPM-1000" and r.evaluator == "Ray x2":
            mate = pick(r.config, "local batched", r.window, r.tol, r.solver)
            if mate:
                ratios.append((r.speedup / mate.speedup, r, mate))
    if ratios:
        best, r, mate = max(ratios, key=lambda t: t[0])
        ours = f"{best:.2f} ({r.speedup:.2f}x / {mate.speedup:.2f}x, p={r.window} tau={r.tol} {r.solver})"
        out.append(
            (
                "2 actors' speed-up / the local evaluator's, DDPM-1000",
                "about 0.6",
                ">= 0.9",
                ours,
                best >= 0.9,
            )
        )
    tight = [r for r in rows if r.config == "DDPM-1000" and r.deviation <= 1e-3]
    local_tight = [r for r in tight if r.evaluator == "local batched"]
    if local_tight:
        r = max(local_tight, key=lambda r: r.speedup)
        ours = (
            f"{r.speedup:.2f}x ({min(r.ratios):.2f}-{max(r.ratios):.2f}; p={r.window} tau={r.tol} "
            f"{r.solver}, dev {r.deviation:.1g})"
        )
        out.append(
            (
                "DDPM-1000 latency speed-up, local, max deviation <= 1e-3",
                "3.4-3.7x (median)",
                ">= 4x",
                ours,
                r.speedup >= 4,
            )
        )
    for goal, config, max_deviation, today, most in ITERATION_GOALS:
        within = [r for r in rows if r.config == config and r.deviation <= max_deviation]
        if within:
            r = min(within, key=lambda r: r.stats.parallel_iterations)
            n = r.stats.parallel_iterations
            ours = f"{n} ({r.solver}, p={r.window} tau={r.tol}, dev {r.deviation:.1g})"
            out.append((goal, today, f"<= {most}", ours, n <= most))
    if stage is not None:
        ours = (
            f"{stage['speedup']:.2f}x, median of {stage['pairs']} pairs ({stage['speedup_min']:.2f}-"
            f"{stage['speedup_max']:.2f}x); the stage's code with digits.yaml's picard settings on this model"
        )
        out.append(
            (
                "`make run` picard_sample headline",
                "0.42x, unrepeated, contended",
                ">= 1.5x, median of >= 3 pairs",
                ours,
                stage["speedup"] >= 1.5,
            )
        )
    return [(g, today, target, ours, "met" if ok else "**not met**") for g, today, target, ours, ok in out]


def report(
    rows: list[Row], actors: dict[str, Any], stage: dict[str, Any] | None, note: str, mode: Mode, timing: dict
) -> str:
    """The Markdown report: set-up, one row per case with its breakdown, the goal table, the anchors."""
    load = ", ".join(f"{a:.1f}" for a in timing["load_before"])
    floors = "; ".join(
        f"{name}: {a['floor_ms']:.2f} ms per no-op round trip, actors at niceness "
        f"{sorted({i['niceness'] for i in a['info']})} with "
        f"{sorted({i['threads'] for i in a['info']})} torch thread(s) each"
        for name, a in actors.items()
    )
    lines = [
        "# ParaDiGMS: single-sample latency, sequential vs Picard (plain and Anderson), local vs Ray actors",
        "",
        f"Command: `{command('picard', mode.name)}` ({timing['seconds']:.0f} s)  ",
        f"Machine: {machine()}, Ray {ray.__version__}. Load average {load} (1/5/15 min) at the start, "
        f"{timing['load_after'][0]:.1f} (1 min) at the end.  ",
        f"Threads: the driver (sequential sampler, local batched Picard) uses {THREADS} torch thread; each "
        "Ray actor holds 1 CPU and sets its own torch threads to it, so Ray x2 computes on both cores.  ",
        f"Ray: {floors}.  ",
        f"Seeds: training {SEED}, initial noise x_T {SEED}, sampler noise {SEED + 1} (the same draw for the "
        "sequential and every Picard run); batch 1 (single-sample latency).  ",
        f"Timing: each row alternates the sequential and the Picard sampler, {mode.pairs} pairs after a "
        "warm-up run; speed-up = median of the pairs' ratios (min-max beside it); sampling only (model "
        "loading and actor start-up excluded).  ",
        f"Model: {MODEL}, VP-FDM (m = 2), the process's default grid (uniform in t): {note}.  ",
        f"Published figures: {ANCHORS}",
        "",
        "Deviation: max |x_picard - x_sequential| over the sample's elements (data in [-1, 1]). Breakdown "
        "per iteration (ms): `evaluate` is the evaluator's call, `update` Picard's prefix sums, error test "
        "and solver; on actors the call splits into submit (split + serialise + one task per actor) / "
        "compute (the slowest actor's own) / overhead (the rest of the wait: Ray's scheduling, transfer, "
        "object store, wake-up) / gather.",
        "",
        "| sampler | evaluator | solver | window | tol | sequential ms | Picard ms | speed-up | min-max "
        "| parallel iterations | model evaluations | ms per iteration | evaluate / update | "
        "actor submit / compute / overhead / gather | deviation |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        n = r.stats.parallel_iterations
        lines.append(
            f"| {r.config} | {r.evaluator} | {r.solver} | {r.window} | {r.tol} | "
            f"{statistics.median(r.seq_seconds) * 1e3:.0f} | {statistics.median(r.seconds) * 1e3:.0f} | "
            f"{r.speedup:.2f}x | {min(r.ratios):.2f}-{max(r.ratios):.2f} | {n} | "
            f"{r.stats.model_evaluations} | "
            f"{r.ms_per_iteration:.1f} | {1e3 * r.stats.evaluate_seconds / n:.1f} / "
            f"{1e3 * r.stats.update_seconds / n:.1f} | {_fmt_ms(r.actor_ms)} | {r.deviation:.2g} |"
        )
    lines += [
        "",
        "## Goals of issue 26 (this machine, this run)",
        "",
        "| goal | today (issue 26) | target | ours | verdict |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(g)} |" for g in goals(rows, stage)]
    lines += [
        "",
        "![speed-ups](picard.png)" if mode.name == "full" else f"![speed-ups](picard_{mode.name}.png)",
        "",
    ]
    return "\n".join(lines)


def _speed(ratio: float) -> str:
    if ratio < 1:  # a loss in words
        return f"the method lost: {1 / ratio:.2f}x slower than sequential"
    return f"{ratio:.2f}x lower latency than sequential"


def headline(rows: list[Row], stage: dict[str, Any] | None, mode: Mode, name: str) -> dict[str, bytes]:
    """The summary file: the first sampler's fastest local batched row, its fastest row on actors, and how
    many of issue 26's goals the run met."""
    first = next(iter(mode.configs))
    mine = [r for r in rows if r.config == first]
    local = max((r for r in mine if r.evaluator == "local batched"), key=lambda r: r.speedup)
    on_actors = max(
        (r for r in mine if r.evaluator != "local batched"), key=lambda r: r.speedup, default=None
    )
    verdicts = [v[4] == "met" for v in goals(rows, stage)]
    text = (
        f"{first} on the {MODEL}, one sample: {_speed(local.speedup)} locally ({local.solver}, "
        f"{local.stats.parallel_iterations} parallel iterations, deviation {local.deviation:.1g})"
    )
    numbers: dict[str, float | str | bool | None] = {
        "speedup": round(local.speedup, 3),
        "parallel_iterations": local.stats.parallel_iterations,
        "deviation": local.deviation,
    }
    if on_actors is not None:
        n = int(on_actors.evaluator.removeprefix("Ray x"))
        where, s = f"{n} Ray actor{'s' if n > 1 else ''}", on_actors.speedup
        text += f", {s:.2f}x on {where}" if s >= 1 else f", on {where} {_speed(s)}"
        numbers["actors"], numbers["actors_speedup"] = n, round(on_actors.speedup, 3)
    text += f"; {sum(verdicts)} of issue 26's {len(verdicts)} goals met"
    return summary(name, text, **numbers, goals_met=sum(verdicts), goals=len(verdicts), met=all(verdicts))


def run(mode: Mode) -> tuple[str, dict[str, bytes]]:
    """Train the U-Net, time every case (starting Ray unless it is up) and the stage's settings, build the
    report and its plot as {file name: PNG bytes}."""
    torch.set_num_threads(THREADS)
    timing: dict[str, Any] = {"load_before": os.getloadavg()}
    t0 = time.perf_counter()
    started = init_ray(num_cpus=os.cpu_count())
    try:
        with tempfile.TemporaryDirectory() as root:
            denoiser, uri, note = train(root, mode.train_steps)
            rows, actors = bench(denoiser, uri, mode)
            stage = stage_row(uri, mode)
    finally:
        if started:
            ray.shutdown()
    timing.update(seconds=time.perf_counter() - t0, load_after=os.getloadavg())
    name = "picard" if mode.name == "full" else f"picard_{mode.name}"
    files = {f"{name}.png": plot(rows), **headline(rows, stage, mode, name)}
    return report(rows, actors, stage, note, mode, timing), files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter training, fewer cases, one timed pair")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    text, files = run(mode)
    sys.stdout.write(text)
    print(f"report: {write_report('picard' + ('_quick' if args.quick else ''), text, files)}")


if __name__ == "__main__":
    main()
