"""FDM's sampling-speed claim at our scale: the Heun NFE a well-trained model needs to reach a given quality.

Anchor (Wu et al., docs/design.md: The math): with the same Heun sampler, FDM at 25 NFE ≈ baseline at 79 NFE
(AFHQv2: EDM 2.37 @79 vs EDM-FDM 2.32 @25), about 3x fewer evaluations. Here the models are fdm_training's
main cells (4000 steps, 3 seeds per process): the final EMA model of every cell is scored with Heun at several
step counts on the process's default grid (1000 samples from fixed noise) when its cell finishes, and recorded
with it in benchmarks/results/fdm_training.json. For targets set by the baseline's FD at its largest NFE, we
read off the NFE each model needs (interpolated), paired by seed.

    python -m benchmarks.fdm_sampling [--quick]   # full: renders fdm_training's record (run that first)
                                                  # --quick: EDM, 1 seed, 400 steps, trains its own pair
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import CACHE, machine, summary, write_report
from benchmarks.fdm_cell import CellConfig, generate, study_setting
from benchmarks.fdm_common import (
    TRAINED_BY,
    Digits,
    Results,
    describe,
    first_reach,
    fmt,
    mean,
    plot,
    run_pairs,
    trained,
)
from benchmarks.fdm_training import MODES as TRAINING_MODES
from benchmarks.fdm_training import provenance
from fdm_core.processes import ProcessName
from fdm_core.samplers import nfe

# Targets: the baseline's FD at its largest NFE times these factors ("within 10%", "within 50%").
TARGETS = (1.1, 1.5)


@dataclass(frozen=True)
class Mode:
    """Which processes (with their seeds) one invocation covers, how long each model trains, the Heun step
    sweep, how many processes work at once, the model cache (None: always train) and whether the sweeps
    come from fdm_training's committed record instead of models trained here."""

    name: str
    seeds: dict[ProcessName, tuple[int, ...]]
    run: CellConfig
    sweep: tuple[int, ...]
    classifier_steps: int = 300
    workers: int = min(2, os.cpu_count() or 1)
    cache: Path | None = CACHE
    from_record: bool = False


FULL = TRAINING_MODES["full"]
MODES = {
    "full": Mode("full", FULL.seeds, FULL.run, tuple(FULL.run.sweep), from_record=True),
    "quick": Mode(
        "quick",
        {"edm": (0,)},
        study_setting(steps=400, eval_every=400, num_samples=200),
        (3, 4, 6, 9, 13, 18),
    ),
    "tiny": Mode(
        "tiny",
        {"edm": (0,)},
        study_setting(steps=2, eval_every=2, num_samples=40, sample_steps=3),
        (2, 3),
        5,
        1,
        None,
    ),
}


def sweep(process: ProcessName, fdm: bool, mode: Mode, seed: int, data: Digits) -> dict[str, Any]:
    """One model's record with its Heun sweep ([steps, NFE, FD] rows) (a pool job)."""
    model = trained(mode.run.for_cell(process, fdm, seed), data)
    rows = [[n, nfe("heun", n), data.metric(generate(model, mode.run.num_samples, n))] for n in mode.sweep]
    print(f"  {process} fdm={fdm} seed {seed}: {', '.join(f'{q:.3f}' for *_, q in rows)}", flush=True)
    return {"process": process, "fdm": fdm, "seed": seed, "heun_sweep": rows}


def records(mode: Mode) -> tuple[list[dict[str, Any]], list[str], str, str]:
    """The swept models of `mode` (from the record or trained here), the cells still missing, the
    metric's description and which training code produced the models."""
    if not mode.from_record:
        data, runs = run_pairs(sweep, mode)
        trained_by = f"Training code: the product's (`{TRAINED_BY}`)."
        return runs, [], metric_text(data.metric.reference.shape[1], data.classifier_accuracy), trained_by
    training = TRAINING_MODES["full"]
    results = Results(training.record, training.classifier_steps)
    found, missing = [], []
    for cell in training.cells():
        if cell.setting != "main":
            continue
        record = results.find(cell)
        if record is not None and record.get("heun_sweep"):
            found.append(record)
        else:
            missing.append(cell.label)
    accuracy = results.doc.get("meta", {}).get("classifier_val_accuracy", float("nan"))
    return found, missing, metric_text(64, accuracy), provenance(results)


def metric_text(dims: int, accuracy: float) -> str:
    return (
        f"Fréchet distance of the samples to the train split in the {dims}-d features of a classifier "
        f"trained once on it (val accuracy {accuracy:.3f}); lower is better"
    )


def pair_nfe(base: dict[str, Any], fdm: dict[str, Any], factor: float) -> dict[str, Any]:
    """One seed's NFE to reach `factor` x the baseline's FD at its largest NFE, for both models."""
    bn, bq = [r[1] for r in base["heun_sweep"]], [r[2] for r in base["heun_sweep"]]
    fn, fq = [r[1] for r in fdm["heun_sweep"]], [r[2] for r in fdm["heun_sweep"]]
    target = factor * bq[-1]
    b, f = first_reach(bn, bq, target), first_reach(fn, fq, target)
    return {"target": target, "base": b, "fdm": f, "ratio": None if f is None else b / f}


def converged_nfe(record: dict[str, Any], factor: float = 1.1) -> float:
    """The NFE at which a model's sweep first comes within `factor` of its own FD at its largest NFE."""
    nfes, fds = [r[1] for r in record["heun_sweep"]], [r[2] for r in record["heun_sweep"]]
    return first_reach(nfes, fds, factor * fds[-1]) or float(nfes[-1])


def section(process: ProcessName, recs: list[dict[str, Any]]) -> tuple[str, str]:
    """The Markdown of one process (sweep table, NFE to targets) and its one-line reading."""
    name = process.upper()
    seeds = sorted({r["seed"] for r in recs if r["fdm"]} & {r["seed"] for r in recs if not r["fdm"]})
    if not seeds:
        return f"## {name} vs {name}-FDM\n\nNo finished pair yet.\n", f"{name}: no finished pair yet"
    by = {(r["seed"], r["fdm"]): r for r in recs}
    base, fdm = [by[(s, False)] for s in seeds], [by[(s, True)] for s in seeds]
    steps = [r[0] for r in base[0]["heun_sweep"]]
    rows = [
        f"| {n} | {nfe('heun', n)} | {mean([b['heun_sweep'][i][2] for b in base]):.3f} | "
        f"{mean([f['heun_sweep'][i][2] for f in fdm]):.3f} |"
        for i, n in enumerate(steps)
    ]
    targets, readings = [], []
    for factor in TARGETS:
        pairs = [pair_nfe(b, f, factor) for b, f in zip(base, fdm)]
        ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
        never = len(pairs) - len(ratios)
        ratio = f"{mean(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})" if ratios else "—"
        fdm_nfe = fmt(mean([p["fdm"] for p in pairs if p["fdm"] is not None]), 1) if ratios else "not reached"
        never_text = f"; FDM never reaches it for {never} seed(s)" if never else ""
        targets.append(
            f"| {factor:g} x baseline @{nfe('heun', steps[-1])} NFE | "
            f"{mean([p['target'] for p in pairs]):.3f} | {mean([p['base'] for p in pairs]):.1f} | "
            f"{fdm_nfe} | {ratio}{never_text} |"
        )
        readings.append(f"within {factor - 1:.0%} of the baseline's best: NFE ratio baseline ÷ FDM {ratio}")
    own = {fdm_: [converged_nfe(r) for r in (fdm if fdm_ else base)] for fdm_ in (False, True)}
    own_ratio = [b / f for b, f in zip(own[False], own[True])]
    readings.append(
        f"NFE to come within 10% of the model's own FD at {nfe('heun', steps[-1])} NFE: baseline "
        f"{mean(own[False]):.1f}, FDM {mean(own[True]):.1f} (ratio {mean(own_ratio):.2f}, "
        f"{min(own_ratio):.2f}–{max(own_ratio):.2f})"
    )
    top = nfe("heun", steps[-1])
    paper = [pair_nfe(b, f, 1.0) for b, f in zip(base, fdm)]
    paper_nfe = [p["fdm"] for p in paper if p["fdm"] is not None]
    paper_style = (
        f"Paper-style reading (FDM's NFE to reach the baseline's FD at its largest NFE, {top}): FDM "
        f"{mean(paper_nfe):.1f} NFE, i.e. {top / mean(paper_nfe):.1f}x fewer; but the baseline itself gets "
        f"there at {mean([p['base'] for p in paper]):.1f} NFE, so the like-for-like ratio is "
        f"{mean([p['base'] / p['fdm'] for p in paper if p['fdm']]):.2f}."
        if paper_nfe
        else f"FDM never reaches the baseline's FD at {top} NFE."
    )
    text = f"""## {name} vs {name}-FDM (Heun, seeds {", ".join(map(str, seeds))})

Paper anchor: 25 NFE FDM ≈ 79 NFE baseline (~3x fewer).

| steps | NFE | baseline FD (mean) | FDM FD (mean) |
|---:|---:|---:|---:|
{chr(10).join(rows)}

| target FD | value (mean) | baseline NFE | FDM NFE | NFE ratio baseline ÷ FDM (min–max) |
|---|---:|---:|---:|---|
{chr(10).join(targets)}

{paper_style}

Sampling speed of each model on its own (a comparison within one model, so the same start noise makes it
nearly free of sampling noise): {readings[-1]}.
"""
    return text, f"{name}: " + "; ".join(readings)


def run(mode: Mode) -> tuple[str, dict[str, bytes]]:
    """Collect the swept models (record or fresh), then build the report and its plot."""
    t0 = time.perf_counter()
    recs, missing, metric, trained_by = records(mode)
    sections, readings, panels = [], [], {}
    for p in mode.seeds:
        mine = [r for r in recs if r["process"] == p]
        text, reading = section(p, mine)
        sections.append(text)
        readings.append(reading)
        for fdm in (False, True):
            rs = [r for r in mine if r["fdm"] == fdm]
            if rs:
                xs = [row[1] for row in rs[0]["heun_sweep"]]
                ys = [mean([r["heun_sweep"][i][2] for r in rs]) for i in range(len(xs))]
                panels.setdefault(p.upper(), {})["FDM" if fdm else "baseline"] = (xs, ys)
    suffix = "" if mode.name == "full" else f"_{mode.name}"
    png = f"fdm_sampling{suffix}.png"
    cmd = "python -m benchmarks.fdm_sampling" + ("" if mode.name == "full" else f" --{mode.name}")
    source = (
        "the final models of fdm_training's main cells (read from benchmarks/results/fdm_training.json)"
        if mode.from_record
        else f"models trained here: {describe(mode.run).split('; evaluation')[0]}"
    )
    report = f"""# FDM sampling speed: Heun NFE to reach a given quality ({mode.name})

Machine: {machine()}. Command: `{cmd}`. Wall time {time.perf_counter() - t0:.0f} s.
Models: {source}. Sampling: {mode.run.num_samples} samples from fixed noise per point, Heun on the process's
default grid (EDM Karras ρ = 7, VP uniform t, VE geometric); NFE = 2n − 1 (no correction on the last step).
Quality: {metric}. Targets: the baseline's FD at its largest NFE times {", ".join(f"{f:g}" for f in TARGETS)};
NFEs are interpolated on each model's sweep and paired by seed.
{trained_by}
{("Cells still missing: " + ", ".join(missing) + ".") if missing else ""}

![quality vs NFE]({png})

{chr(10).join(sections)}
## Summary

{chr(10).join(f"- {r}." for r in readings)}
"""
    files = {png: plot(panels, "NFE (Heun)", "Fréchet distance (classifier features)")} if panels else {}
    # the headline: the first process's nearest target (its first reading), against the paper's ~3x
    headline = readings[0].split("; ")[0] + "; paper: about 3x fewer NFE"
    return report, files | summary(f"fdm_sampling{suffix}", headline)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="EDM only, 1 seed, 400 steps (<= 5 min on 2 cores)")
    args = ap.parse_args(argv)
    report, files = run(MODES["quick" if args.quick else "full"])
    print(report)
    path = write_report("fdm_sampling" + ("_quick" if args.quick else ""), report, files)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
