"""FDM's training-speed claim at our scale: how many training steps does FDM need to match the baseline?

Anchor (Wu et al., docs/design.md: The math): FDM at 100 Mimg ≈ baseline at 200 Mimg on CIFAR-10/FFHQ/AFHQv2,
i.e. FDM needs about half the training to reach the baseline's final quality (a step ratio baseline ÷ FDM ≈
2). The reference repo's own tables show it is regime-dependent: EDM-FDM leads early on CIFAR-10, VP-FDM lags
badly early on FFHQ/AFHQv2 (12.5 vs 3.1, 25.7 vs 3.5 FID at 50 Mimg) and overtakes later.

Each cell (process, fdm, seed, setting) trains a digits U-Net for 4000 steps (EDM's and VP's baseline
curves have flattened by then, VE's has not) and scores its EMA model every 250 steps by the Fréchet
distance of 1000 Heun samples drawn from fixed noise, in the features of a classifier trained on the
training split. Headline per process: the steps FDM needs to reach the baseline's final FD (interpolated
on FDM's curve), as the ratio baseline steps ÷ FDM steps, paired by seed (mean and min–max over 3 seeds).
EDM ablations (2 seeds): warm-up W, gradient clipping, a wider U-Net and a constant EMA decay. A VP pair
trained 12000 steps and a VE pair 8000 (seed 0) show where VP-FDM's early lag closes and where VE's
curves flatten. The final model of every main cell is also scored at several Heun step counts
(benchmarks.fdm_sampling renders that).

    python -m benchmarks.fdm_training [--jobs 2]    # full study, resumable cell by cell
    python -m benchmarks.fdm_training --report-only # re-render the report from the committed JSON
    python -m benchmarks.fdm_training --quick       # CI smoke: EDM, 1 seed, 400 steps, 200 samples

The full study records every finished cell in benchmarks/results/fdm_training.json (commit it: a later
session skips the cells present there) and re-renders the report after each; a cell costs about 9 minutes
on one idle core (16 channels; the 32-channel ablation about 20).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import CACHE, RESULTS, machine, write_report
from benchmarks.fdm_cell import CellConfig, study_setting
from benchmarks.fdm_common import (
    BENCH_VERSION,
    TRAINED_BY,
    Cell,
    Digits,
    Results,
    cached_model,
    describe,
    digits_data,
    first_reach,
    fmt,
    input_scale,
    mean,
    plot,
    run_cells,
    unique_cells,
    warmup,
)
from fdm_core.processes import ProcessName, make_process, vp_sigma

HEUN_SWEEP = (4, 5, 6, 8, 10, 13, 18, 25)
MAIN = study_setting(steps=4000, eval_every=250, num_samples=1000, sweep=HEUN_SWEEP)
# EDM ablations: each changes one thing of MAIN (a baseline that does not depend on it is MAIN's).
ABLATIONS: dict[str, tuple[CellConfig, str]] = {
    "W50": (MAIN.changed(warmup_iters=50, sweep=[]), "W = 50 steps"),
    "W800": (MAIN.changed(warmup_iters=800, sweep=[]), "W = 800 steps"),
    "noclip": (MAIN.changed(grad_clip=None, sweep=[]), "no gradient clipping"),
    "ema995": (
        MAIN.changed(ema_decay=0.995, ema_rampup=None, sweep=[]),
        "constant EMA decay 0.995 (the old benchmark's)",
    ),
    "wide32": (MAIN.changed(model_channels=32, sweep=[]), "U-Net 32 channels (4x the weights)"),
}
# Past MAIN's 4000 steps (one seed, evaluated every 500): where VP-FDM's lag closes, and where VE (still
# falling steeply at 4000) flattens and which of the pair is ahead there.
LONG: dict[ProcessName, CellConfig] = {
    "vp": MAIN.changed(steps=12000, eval_every=500, sweep=[]),
    "ve": MAIN.changed(steps=8000, eval_every=500, sweep=[]),
}


def long_setting(cfg: CellConfig) -> str:
    """The setting name of a long pair's cells, e.g. long12000."""
    return f"long{cfg.train.steps}"


@dataclass(frozen=True)
class Mode:
    """What one invocation covers: the main grid (processes with their seeds) under `run`, EDM ablations
    with their seeds, how many cells train at once, the model cache, the committed record (None:
    nowhere) and long runs (per process, on `long_seeds`)."""

    name: str
    seeds: dict[ProcessName, tuple[int, ...]]
    run: CellConfig
    ablations: dict[str, tuple[CellConfig, str]] = field(default_factory=dict)
    ablation_seeds: tuple[int, ...] = (0, 1)
    classifier_steps: int = 300
    workers: int = min(2, os.cpu_count() or 1)
    cache: Path | None = CACHE
    record: Path | None = None
    long: dict[ProcessName, CellConfig] = field(default_factory=dict)
    long_seeds: tuple[int, ...] = (0,)

    def cells(self) -> list[Cell]:
        """Main grid first (process by process, seed by seed, baseline then FDM), then the ablations."""
        cells = [
            Cell(p, fdm, seed, "main", self.run)
            for p, seeds in self.seeds.items()
            for seed in seeds
            for fdm in (False, True)
        ]
        cells += [
            Cell("edm", fdm, seed, name, cfg)
            for name, (cfg, _) in self.ablations.items()
            for seed in self.ablation_seeds
            for fdm in (False, True)
        ]
        cells += [
            Cell(p, fdm, seed, long_setting(cfg), cfg)
            for p, cfg in self.long.items()
            for seed in self.long_seeds
            for fdm in (False, True)
        ]
        return cells


MODES = {
    "full": Mode(
        "full",
        {"edm": (0, 1, 2), "vp": (0, 1, 2), "ve": (0, 1, 2)},
        MAIN,
        ABLATIONS,
        record=RESULTS / "fdm_training.json",
        long=LONG,
    ),
    "quick": Mode("quick", {"edm": (0,)}, study_setting(steps=400, eval_every=50, num_samples=200)),
    "tiny": Mode(
        "tiny",
        {"edm": (0,)},
        study_setting(steps=4, eval_every=2, num_samples=40, sample_steps=3),
        {},
        (),
        5,
        1,
        None,
        long={"edm": study_setting(steps=6, eval_every=2, num_samples=40, sample_steps=3)},
    ),
}


NOTES = {
    "vp": """
Is VP-FDM's gap a defect of the port? `tests/test_fdm_reference.py` checks our VP-FDM denoiser (c_skip = 1,
c_out = −σ, c_in = γ(σ) on σ_vp(1e-5)..σ_vp(1) with m = 2, c_noise = 999·t(σ)) and loss (1/σ², the warm-up
cap, t ~ U(1e-5, 1)) coefficient by coefficient against the reference formulation (sail-sg/FDM
`FDM_VPPrecond`, `VPLoss`): they agree, so no. Where the formulation costs VP (table below): for t > 0.9 (σ
59–152) γ(σ) < 0.2, down to 4e-8 at σ_max, so the network's input is nearly zeroed, while VP's
parameterisation D = x − σF needs F ≈ n from that input (EDM's c_skip → 0 there makes a blind network
harmless); the network can only recover n by learning to amplify a vanishing input, which takes training. At
4000 steps VP-FDM's error equals VP's for t < 0.9 (the unscaled inputs up to σ ≈ 20 cost nothing by then)
and is ~34x VP's above. The gap is closing (FD ratio by step above), as in the reference's own tables:
VP-FDM lags early (FID at 50 Mimg: FFHQ 12.49 vs 3.07, AFHQv2 25.70 vs 3.46) and is level by 100 Mimg.
""",
}


# --- reading the record -------------------------------------------------------------------------------
def smoothed(curve: list[list[float]]) -> tuple[list[float], list[float]]:
    """The curve's centred 3-evaluation running mean at its interior steps (its raw points if it has fewer
    than 3): FD jumps by ~10% between evaluations of one model, and a centred mean adds no lag."""
    s, q = zip(*curve)
    if len(q) < 3:
        return list(s), list(q)
    return list(s[1:-1]), [mean(q[i - 1 : i + 2]) for i in range(1, len(q) - 1)]


def pair_stats(base: dict[str, Any], fdm: dict[str, Any], smooth: bool = True) -> dict[str, Any]:
    """One seed's pair: the target (the baseline's final FD: with `smooth`, its final model's mean FD over
    5 sampling seeds, else its last evaluation), the steps each curve first reaches it (interpolated; with
    `smooth`, on both curves' centred running means), and the ratio baseline ÷ FDM (None: FDM never
    reaches it; `bound` is then an upper bound of the ratio)."""
    bs, bq = smoothed(base["curve"]) if smooth else zip(*base["curve"])
    fs, fq = smoothed(fdm["curve"]) if smooth else zip(*fdm["curve"])
    target, fdm_final = bq[-1], fq[-1]
    if smooth and base.get("final_fds") and fdm.get("final_fds"):
        target, fdm_final = mean(base["final_fds"]), mean(fdm["final_fds"])
    last = base["curve"][-1][0]  # the final model is at the target by definition, FDM's when it is as good
    b_steps = first_reach(bs, bq, target) or last
    f_steps = first_reach(fs, fq, target) or (last if fdm_final <= target else None)
    return {
        "seed": base["seed"],
        "target": target,
        "fdm_final": fdm_final,
        "baseline_steps": b_steps,
        "fdm_steps": f_steps,
        "ratio": None if f_steps is None else b_steps / f_steps,
        "bound": b_steps / last,
    }


FIT_FROM = 1000  # the log-log fit skips the first, fast phase of a curve


def loglog_fit(curve: list[list[float]]) -> tuple[float, float]:
    """Least-squares line log FD = a + b log step through the curve's points from `FIT_FROM` on (all
    points if fewer than 3 are there): uses every evaluation of the late curve, so one evaluation's
    sampling noise (~0.3-0.5 FD at FD ~2) moves it little."""
    pts = [(s, q) for s, q in curve if s >= FIT_FROM]
    pts = pts if len(pts) >= 3 else [(s, q) for s, q in curve]
    xs, ys = [math.log(s) for s, _ in pts], [math.log(q) for _, q in pts]
    mx, my = mean(xs), mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    return my - b * mx, b


def pair_fit(base: dict[str, Any], fdm: dict[str, Any]) -> dict[str, Any]:
    """One seed's pair on the log-log fits: the target is the baseline's fitted FD at its last step, FDM's
    steps the step where its fit reaches it (extrapolated past the run when FDM is slower)."""
    last = base["curve"][-1][0]
    (ab, bb), (af, bf) = loglog_fit(base["curve"]), loglog_fit(fdm["curve"])
    target = math.exp(ab + bb * math.log(last))
    f_steps = math.exp((math.log(target) - af) / bf) if bf < 0 else None
    return {
        "seed": base["seed"],
        "target": target,
        "fdm_final": math.exp(af + bf * math.log(last)),
        "baseline_steps": float(last),
        "fdm_steps": f_steps,
        "ratio": None if f_steps is None else last / f_steps,
        "bound": 1.0,
        "slopes": (bb, bf),
    }


def summarise(pairs: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    return {
        "step_ratio_mean": round(mean(ratios), 3) if ratios else None,
        "step_ratio_min": round(min(ratios), 3) if ratios else None,
        "step_ratio_max": round(max(ratios), 3) if ratios else None,
        "seeds": [p["seed"] for p in pairs],
        "steps": steps,
        "not_reached_seeds": [p["seed"] for p in pairs if p["ratio"] is None],
        "baseline_final_fd_mean": round(mean([p["target"] for p in pairs]), 4),
        "fdm_final_fd_mean": round(mean([p["fdm_final"] for p in pairs]), 4),
        "fdm_steps_to_baseline_final": [
            None if p["fdm_steps"] is None else round(p["fdm_steps"]) for p in pairs
        ],
    }


def ratio_text(pairs: list[dict[str, Any]]) -> str:
    """E.g. "**1.31** (1.10–1.52, 3 seeds)", with not-reached seeds as upper bounds."""
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    missing = [f"s{p['seed']} < {p['bound']:.2f}" for p in pairs if p["ratio"] is None]
    head = (
        f"**{mean(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f}, "
        f"{len(ratios)} seed{'s' if len(ratios) > 1 else ''})"
        if ratios
        else "—"
    )
    return head + (f"; FDM never reaches it: {', '.join(missing)}" if missing else "")


def mean_rows(records: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    steps = [s for s, _ in records[0]["curve"]]
    return steps, [mean([r["curve"][i][1] for r in records]) for i in range(len(steps))]


def settling(records: list[dict[str, Any]], last: int = 1000) -> str:
    """How flat the curves are at the end: mean relative FD change over the last `last` steps, and the
    mean eval-to-eval jump there relative to the FD level."""
    drops, jumps = [], []
    for r in records:
        s, q = zip(*r["curve"])
        tail = [i for i, x in enumerate(s) if x >= s[-1] - last]
        drops.append((q[tail[0]] - q[-1]) / q[-1])
        jumps += [abs(q[i] - q[i - 1]) / q[i] for i in tail[1:]]
    return (
        f"FD fell {mean(drops):+.0%} over the last {last} steps; eval-to-eval jumps there {mean(jumps):.0%}"
    )


def main_section(
    process: ProcessName, cells: list[Cell], results: Results, data_std: float
) -> tuple[str, dict]:
    """The Markdown of one process's main grid (curves, ratios, settling) and its JSON summary."""
    found = {(c.seed, c.fdm): results.find(c) for c in cells}
    seeds = sorted({c.seed for c in cells if found[(c.seed, False)] and found[(c.seed, True)]})
    name = process.upper()
    if not seeds:
        return f"## {name}: baseline vs {name}-FDM\n\nNo finished pair yet.\n", {}
    base = [found[(s, False)] for s in seeds]
    fdm = [found[(s, True)] for s in seeds]
    fits = [pair_fit(b, f) for b, f in zip(base, fdm)]
    pairs = [pair_stats(b, f) for b, f in zip(base, fdm)]
    raw = [pair_stats(b, f, smooth=False) for b, f in zip(base, fdm)]
    late = {
        arm: [mean([q for st, q in r["curve"] if st > r["curve"][-1][0] - 1250]) for r in rs]
        for arm, rs in (("base", base), ("fdm", fdm))
    }
    steps, bm = mean_rows(base)
    _, fm = mean_rows(fdm)
    per_seed = "".join(f" | base s{s} | FDM s{s}" for s in seeds)
    head = f"| step | baseline (mean) | FDM (mean){per_seed} |\n|---:|---:|---:{'|---:' * 2 * len(seeds)}|"
    rows = [
        f"| {st} | {bm[i]:.3f} | {fm[i]:.3f}"
        + "".join(f" | {b['curve'][i][1]:.3f} | {f['curve'][i][1]:.3f}" for b, f in zip(base, fdm))
        + " |"
        for i, st in enumerate(steps)
    ]
    estimators = (("log-log fit", fits), ("running mean", pairs), ("raw", raw))
    per_pair = "\n".join(
        f"| {p['seed']} | {label} | {p['target']:.3f} | {fmt(p['baseline_steps'], 0)} | "
        f"{fmt(p['fdm_steps'], 0)} | {fmt(p['ratio'])} |"
        for i in range(len(seeds))
        for label, ps in estimators
        for p in [ps[i]]
    )
    ahead = [st for st, b, f in zip(steps, bm, fm) if f < b]
    marks = [i for i, st in enumerate(steps) if st % 1000 == 0 or i == len(steps) - 1]
    gap = ", ".join(f"{steps[i]}: {fm[i] / bm[i]:.2f}" for i in dict.fromkeys(marks))
    summary = summarise(fits, steps[-1])
    for prefix, ps in (("running_mean", pairs), ("raw", raw)):
        summary |= {
            f"{prefix}_{k}": v for k, v in summarise(ps, steps[-1]).items() if k.startswith("step_ratio")
        }
    summary["estimator"] = (
        f"log-log least-squares fit of each curve from step {FIT_FROM}: target = the baseline's fitted FD at "
        "its last step, FDM steps = where FDM's fit reaches it (running_mean_*: centred 3-evaluation running "
        "means with the baseline final model's 5-seed mean FD as target; raw_*: the raw curves)"
    )
    summary["late_fd_baseline"] = [round(v, 4) for v in late["base"]]
    summary["late_fd_fdm"] = [round(v, 4) for v in late["fdm"]]
    late_ratio = [f / b for b, f in zip(late["base"], late["fdm"])]
    text = f"""## {name}: baseline vs {name}-FDM (W = {warmup(cells[0].config().train)} steps)

Paper anchor: FDM reaches the baseline's final quality with about half the training (ratio ≈ 2).

{chr(10).join([head, *rows])}

| seed | estimator | target FD | baseline steps | FDM steps | ratio baseline ÷ FDM |
|---:|---|---:|---:|---:|---:|
{per_pair}

Step ratio baseline ÷ FDM to reach the baseline's final FD, on log-log fits of the curves from step
{FIT_FROM} (headline; slopes baseline {mean([p["slopes"][0] for p in fits]):.2f}, FDM
{mean([p["slopes"][1] for p in fits]):.2f}): {ratio_text(fits)}. On centred 3-evaluation running means with
the baseline final model's 5-sampling-seed mean FD as target: {ratio_text(pairs)}. On the raw curves
(target = the baseline's last evaluation): {ratio_text(raw)}.
Mean FD over the last 5 evaluations, FDM ÷ baseline paired by seed: {mean(late_ratio):.2f}
({min(late_ratio):.2f}–{max(late_ratio):.2f}); baseline {mean(late["base"]):.3f}, FDM {mean(late["fdm"]):.3f}.
FDM's seed-mean curve is below the baseline's at steps: {", ".join(map(str, ahead)) or "none"}.
FD ratio FDM ÷ baseline (seed means) by step: {gap} (below 1: FDM ahead).
Settling: baseline {settling(base)}; FDM {settling(fdm)}.
{input_note(process, data_std)}
{NOTES.get(process, "")}{vp_band_text(results) if process == "vp" else ""}"""
    return text, summary


def ablation_section(mode: Mode, results: Results) -> str:
    """EDM ablations: per setting, the paired ratio on the ablation seeds, next to MAIN on the same seeds;
    each arm's final FD both on its log-log fit and as its final model's mean over 5 sampling seeds; then
    each arm at its own best setting, paired against the other's."""
    rows, complete = [], {}
    settings = {"main": (mode.run, "as the main grid")} | mode.ablations
    for name, (cfg, what) in settings.items():
        found = [
            (
                results.find(Cell("edm", False, seed, name, cfg)),
                results.find(Cell("edm", True, seed, name, cfg)),
            )
            for seed in mode.ablation_seeds
        ]
        found = [(b, f) for b, f in found if b and f]
        if not found:
            rows.append(f"| {name} | {what} | 0 | | | | | not run yet |")
            continue
        pairs = [pair_fit(b, f) for b, f in found]
        if len(found) == len(mode.ablation_seeds) and cfg.model == mode.run.model:
            complete[name] = found, pairs  # candidates for the best setting: same network, same step cost
        sets = [mean([mean(r["final_fds"]) for r in arm]) for arm in zip(*found)]
        rows.append(
            f"| {name} | {what} | {len(pairs)} | {mean([p['target'] for p in pairs]):.3f} | "
            f"{mean([p['fdm_final'] for p in pairs]):.3f} | {sets[0]:.3f} | {sets[1]:.3f} | "
            f"{ratio_text(pairs)} |"
        )
    best = ""
    if len(complete) > 1:
        fitted = {
            name: [mean([p[k] for p in pairs]) for k in ("target", "fdm_final")]
            for name, (_, pairs) in complete.items()
        }
        b_name = min(fitted, key=lambda n: fitted[n][0])
        f_name = min(fitted, key=lambda n: fitted[n][1])
        cross = [pair_fit(b, f) for (b, _), (_, f) in zip(complete[b_name][0], complete[f_name][0])]
        best = (
            "\nEach arm at its own best setting (lowest fitted final FD among the settings with every "
            f"seed and the main network): baseline {b_name} ({fitted[b_name][0]:.3f}), "
            f"FDM {f_name} ({fitted[f_name][1]:.3f}); "
            f"step ratio baseline ÷ FDM between them: {ratio_text(cross)}.\n"
        )
    return f"""## EDM ablations (seeds {", ".join(map(str, mode.ablation_seeds))})

Final FD: fitted = the log-log fit of the curve at its last step (as the ratio uses it); 5 sets = the final
model's mean FD over 5 sampling seeds (one model's FD moves by up to ~2x between sets, alike for all
models). Ratio: the step ratio baseline ÷ FDM on the fits, paired by seed.

| setting | differs from main | seeds | base FD, fit | FDM, fit | base, 5 sets | FDM, 5 sets | ratio |
|---|---|---:|---:|---:|---:|---:|---|
{chr(10).join(rows)}
{best}"""


def long_section(process: ProcessName, cfg: CellConfig, mode: Mode, results: Results) -> tuple[str, dict]:
    """A pair trained past MAIN's length: its curves side by side (centred running means) and the first
    step from which FDM's running mean stays at or below the baseline's; the plot panel."""
    name, blocks, panel = process.upper(), [], {}
    for seed in mode.long_seeds:
        base = results.find(Cell(process, False, seed, long_setting(cfg), cfg))
        fdm = results.find(Cell(process, True, seed, long_setting(cfg), cfg))
        if not (base and fdm):
            blocks.append(f"Seed {seed}: not run yet.")
            continue
        (steps, bq), (_, fq) = smoothed(base["curve"]), smoothed(fdm["curve"])
        behind = [st for st, b, f in zip(steps, bq, fq) if f > b]
        level = next((st for st in steps if not behind or st > behind[-1]), None)
        rows = [
            f"| {st} | {b:.3f} | {f:.3f} | {f / b:.2f} |"
            for st, b, f in zip(steps, bq, fq)
            if st % 2000 == 0 or st == steps[-1]
        ]
        fit = pair_fit(base, fdm)
        blocks.append(
            f"Seed {seed}, centred 3-evaluation running means:\n\n"
            f"| step | {name} | {name}-FDM | FDM ÷ baseline |\n|---:|---:|---:|---:|\n"
            + "\n".join(rows)
            + "\n\n"
            + (
                f"FDM's running mean is at or below the baseline's from step {level} on."
                if level is not None
                else f"FDM's running mean is still above the baseline's at step {steps[-1]}."
            )
            + f" Step ratio baseline ÷ FDM on the log-log fits: {fmt(fit['ratio'])}; final FDs (5 sampling"
            f" seeds) baseline {mean(base['final_fds']):.3f}, FDM {mean(fdm['final_fds']):.3f}."
        )
        panel = {f"baseline (seed {seed})": (steps, bq), f"FDM (seed {seed})": (steps, fq)}
    seeds = ", ".join(map(str, mode.long_seeds))
    steps, main_steps = cfg.train.steps, mode.run.train.steps
    text = f"""## {name}: {steps} steps (seeds {seeds}): the pair trained past {main_steps} steps

The main setting but {steps} steps, evaluated every {cfg.eval_every}.

{chr(10).join(blocks)}
"""
    return text, panel


def input_note(process: ProcessName, data_std: float) -> str:
    """One sentence on the scale of what the network sees, baseline vs FDM, over the training sigmas."""
    (b_med, b_p90), (f_med, f_p90) = (input_scale(process, fdm, data_std) for fdm in (False, True))
    return (
        f"Network input std c_in·√(s² + σ²) over the training σ law (data std s = {data_std:.2f}): "
        f"baseline median {b_med:.2f}, 90th percentile {b_p90:.2f}; FDM (c_in = γ(σ)) median {f_med:.2f}, "
        f"90th percentile {f_p90:.2f}."
    )


def render(mode: Mode, results: Results, data: Digits, wall: float) -> tuple[str, dict[str, bytes]]:
    """The report and its plot, from whatever cells `results` holds (missing cells listed)."""
    data_std = float(data.x_train.std())
    cells = mode.cells()
    unique = list(unique_cells(cells, results).values())
    missing = [c.label for c in unique if results.find(c) is None]
    sections, summary, panels = [], {}, {}
    for p in mode.seeds:
        text, s = main_section(
            p, [c for c in cells if c.process == p and c.setting == "main"], results, data_std
        )
        sections.append(text)
        if s:
            summary[p] = s
        recs = {
            fdm: [results.find(c) for c in cells if (c.process, c.setting, c.fdm) == (p, "main", fdm)]
            for fdm in (False, True)
        }
        recs = {fdm: [r for r in rs if r] for fdm, rs in recs.items()}
        if recs[False] and recs[True]:
            panels[p.upper()] = {
                f"baseline ({len(recs[False])} seeds)": mean_rows(recs[False]),
                f"FDM ({len(recs[True])} seeds)": mean_rows(recs[True]),
            }
    if mode.ablations:
        sections.append(ablation_section(mode, results))
    for p, cfg in mode.long.items():
        text, panel = long_section(p, cfg, mode, results)
        sections.append(text)
        if panel:
            panels[f"{p.upper()}, {cfg.train.steps} steps"] = panel
    results.doc["summary"] = summary
    results.doc["meta"] = {
        "bench_version": BENCH_VERSION,
        "main": describe(mode.run),
        "metric_floor": round(data.floor, 4),
        "classifier_val_accuracy": round(data.classifier_accuracy, 4),
        "cells_missing": missing,
    }
    suffix = "" if mode.name == "full" else f"_{mode.name}"
    png = f"fdm_training{suffix}.png"
    cmd = "python -m benchmarks.fdm_training" + ("" if mode.name == "full" else f" --{mode.name}")
    total = len(unique)
    done = total - len(missing)
    headline = [
        f"- {p.upper()}: FDM reaches the baseline's final FD {s['baseline_final_fd_mean']:.3f} (seed mean) "
        f"with a step ratio baseline ÷ FDM of "
        + (
            f"{s['step_ratio_mean']:.2f} (min {s['step_ratio_min']:.2f}, max {s['step_ratio_max']:.2f})"
            if s["step_ratio_mean"] is not None
            else "— (never reached)"
        )
        + f" over seeds {s['seeds']}"
        + (f"; not reached for seeds {s['not_reached_seeds']}" if s["not_reached_seeds"] else "")
        + f"; FDM final FD {s['fdm_final_fd_mean']:.3f}."
        for p, s in summary.items()
    ]
    report = f"""# FDM training speed: steps to match the baseline ({mode.name})

Machine: {machine()}. Command: `{cmd}`. Wall time of this invocation {wall:.0f} s (cells recorded earlier
are read from {"`benchmarks/results/fdm_training.json`" if mode.record else "memory"}). Benchmark version
`{BENCH_VERSION}`.
Data: sklearn digits, 8x8, train split ({len(data.x_train)} images, 10% held out).
Main setting: {describe(mode.run)}. Quality: Fréchet distance of the EMA model's samples to the train
split in the {data.metric.reference.shape[1]}-d features of a classifier trained once on it (val accuracy
{data.classifier_accuracy:.3f}); lower is better. The 180 held-out real images score {data.floor:.3f}
(the metric's floor at that sample size). A seed fixes the initial weights, batches and training noise of
both cells of a pair; the ratio is computed per seed pair.

Progress: {done} of {total} cells recorded.
{provenance(results)}
{("Cells still missing: " + ", ".join(missing) + ".") if missing else "All cells recorded."}

![quality vs steps]({png})

## Summary

{chr(10).join(headline) if headline else "No finished pair yet."}

{chr(10).join(sections)}"""
    files = {png: plot(panels, "training step", "Fréchet distance (classifier features)")} if panels else {}
    return report, files


# The old-vs-new check of the switch to the product's training loop (issue 27): one EDM pair trained by
# both; see provenance().
LOOP_CHECK = (
    "Check of the switch (one EDM pair, seed 0, 400 steps, FD of 200 Heun-18 samples every 100 steps, the "
    "same data and classifier; the benchmark's own loop vs the product's, side by side under the exclusive "
    "CPU lock): "
    "mean training loss per 100 steps, baseline 1.190/0.655/0.565/0.532 (own loop) vs "
    "1.188/0.659/0.566/0.537 (product), FDM 0.821/0.610/0.571/0.538 vs 0.817/0.605/0.574/0.542; "
    "FD at steps 100-400, baseline "
    "141.9/29.4/16.1/12.9 vs 141.5/30.9/16.9/16.2, FDM 114.8/37.7/22.5/15.0 vs 111.7/39.8/24.7/19.7; the "
    "final model's mean FD over its 5 sampling seeds, baseline 14.99 vs 14.55, FDM 16.12 vs 18.53 (one "
    "model's FD spans 11-21 over those seeds); training 31/27 s vs 31/28 s. The losses agree within 1% and "
    "the FDs within one model's spread over sampling seeds, so the recorded cells are kept, not re-run."
)


def provenance(results: Results) -> str:
    """Which training code produced the recorded cells: the product's loop (records with `trained_by`) or
    the benchmark's own loop it replaced, with the check that both measure the same."""
    cells = results.doc["cells"]
    product = sum(1 for r in cells if r.get("trained_by") == TRAINED_BY)
    if product == len(cells):
        return f"Every recorded cell was trained by the product's training code (`{TRAINED_BY}`)."
    return (
        f"Training code: the study now trains every cell through the product's code (`{TRAINED_BY}`, "
        f"TrainConfig, its checkpoints; benchmarks/fdm_cell.py); {len(cells) - product} of the "
        f"{len(cells)} recorded cells predate that switch and were trained by the benchmark's own loop (same "
        f"optimiser, lr ramp, EMA, clipping and loss; batches (drawn with replacement) and training noise "
        f"from one seeded generator instead of the product's shuffled loader and noise generator). "
        + LOOP_CHECK
    )


VP_BANDS = (1e-5, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def vp_band_errors(mode: Mode, results: Results, data: Digits, seed: int = 0) -> None:
    """Where VP-FDM is worse: the ε-MSE |(D − x0)/σ|² of the final VP and VP-FDM models of `seed` (from the
    model cache) on the training images, by band of t (σ = σ_vp(t)), recorded in the results' diagnostics."""
    g, rows = torch.Generator().manual_seed(0), []
    models = [cached_model(mode.run.for_cell("vp", fdm, seed), data) for fdm in (False, True)]
    if None in models:
        print("vp bands: the final VP models of this seed are not in the model cache")
        return
    gamma = make_process("vp", fdm=True).c_in
    for lo, hi in itertools.pairwise(VP_BANDS):
        errs = [0.0, 0.0]
        for _ in range(4):
            t = lo + (hi - lo) * torch.rand(len(data.x_train), generator=g, dtype=torch.float64)
            sigma, n = vp_sigma(t).float(), torch.randn(data.x_train.shape, generator=g)
            x = data.x_train + sigma[:, None, None, None] * n
            for i, model in enumerate(models):
                with torch.no_grad():
                    eps = (model(x, sigma) - data.x_train) / sigma[:, None, None, None]
                errs[i] += float((eps**2).mean()) / 4
        s_lo, s_hi = float(vp_sigma(lo)), float(vp_sigma(hi))
        g_hi = float(gamma(torch.tensor([s_hi])))
        rows.append([lo, hi, round(s_lo, 4), round(s_hi, 2), round(g_hi, 6), *(round(e, 6) for e in errs)])
    results.doc.setdefault("diagnostics", {})["vp_eps_mse_by_t"] = {"seed": seed, "rows": rows}
    results.save()


def vp_band_text(results: Results) -> str:
    diag = results.doc.get("diagnostics", {}).get("vp_eps_mse_by_t")
    if not diag:
        return ""
    rows = "\n".join(
        f"| {lo:.1f}–{hi:.1f} | {s_lo:.3g}–{s_hi:.3g} | {g:.3g} | {b:.4f} | {f:.4f} | {f / b:.2f} |"
        for lo, hi, s_lo, s_hi, g, b, f in diag["rows"]
    )
    return f"""
Where VP-FDM is worse (`python -m benchmarks.fdm_training --vp-bands`, seed {diag["seed"]}, final models):
ε-MSE |(D − x0)/σ|² on the training images by band of t.

| t | σ | γ(σ) at the band's top | VP | VP-FDM | VP-FDM ÷ VP |
|---|---|---:|---:|---:|---:|
{rows}
"""


def run(mode: Mode, train_missing: bool = True, jobs: int | None = None) -> tuple[str, dict[str, bytes]]:
    """Train every cell of `mode` that is not recorded yet (recording each as it finishes), then render."""
    t0 = time.perf_counter()
    data = digits_data(mode.classifier_steps, mode.cache)
    results = Results(mode.record, mode.classifier_steps)
    if train_missing:

        def checkpoint() -> None:  # keep the committed report in step with the record
            if mode.record is not None:
                report, files = render(mode, results, data, time.perf_counter() - t0)
                results.save()
                mode.record.with_suffix(".md").write_text(report)
                for name, png in files.items():
                    (mode.record.parent / name).write_bytes(png)

        run_cells(mode.cells(), results, data, jobs or mode.workers, checkpoint)
    report, files = render(mode, results, data, time.perf_counter() - t0)
    results.save()
    return report, files


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="EDM only, 1 seed, 400 steps (<= 5 min on 2 cores)")
    ap.add_argument("--jobs", type=int, default=None, help="cells trained at once (default 2, one core each)")
    ap.add_argument(
        "--report-only", action="store_true", help="render the report from the record, train nothing"
    )
    ap.add_argument(
        "--vp-bands", action="store_true", help="record VP vs VP-FDM error by t (cached models), then report"
    )
    args = ap.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    if args.vp_bands:
        data = digits_data(mode.classifier_steps, mode.cache)
        vp_band_errors(mode, Results(mode.record, mode.classifier_steps), data)
    report, files = run(mode, not (args.report_only or args.vp_bands), args.jobs)
    print(report)
    path = write_report("fdm_training" + ("_quick" if args.quick else ""), report, files)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
