"""Progressive distillation on digits: which levers bring students close to their teacher, at what cost.

The teacher is the shipped digits model (`pipelines/configs/digits.yaml`): an EDM-FDM U-Net (16 channels)
trained by tasks.train_base, judged with Heun-18 (35 NFE). A recipe (first teacher's step count, round
settings) distils it round by round with tasks.distill_round down to 1 step; tasks.evaluate scores the
teacher and every student on its own grid by the Fréchet distance of 1000 samples in the features of the
tasks.train_classifier CNN. The headline of a student is its FD ÷ the teacher's Heun-18 FD (same seed).

The study is greedy, lever by lever (issue 16's candidates): each lever's variants change one thing of the
best recipe so far; the variant with the lowest mean log FD ratio over the 4-, 2- and 1-step students,
over 2 seeds (base model, distillation and evaluation noise all seeded), carries on to the next lever.
Cost: optimizer updates and wall time of the rounds, to 4 steps and to 1 step, ÷ the base training's.

    python -m benchmarks.distillation [--jobs 2]   # the lever study, resumable cell by cell
    python -m benchmarks.distillation --report-only
    python -m benchmarks.distillation --quick      # one lever, short runs (minutes)

Every finished (recipe, seed) cell is recorded in benchmarks/results/distillation.json (commit it; a later
run skips what is there); every stage runs through the product's stage functions into the benchmarks' cache
(benchmarks/.cache), a store laid out as `fdm run` lays it out (benchmarks.stage_cache), so recipes that
share rounds train them once and an interrupted round resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from benchmarks.common import CACHE, DIGITS_DATA, RESULTS, command, machine, png, summary, write_report
from benchmarks.stage_cache import Stages
from tasks.distillation.schedule import DistillSchedule
from tasks.stage import StageResult
from tasks.stages.distill_round import DistillConfig, DistillRoundConfig
from tasks.stages.evaluate import EvalConfig, SamplerSpec
from tasks.stages.train_base import ModelConfig, TrainBaseConfig, TrainConfig
from tasks.stages.train_classifier import ClassifierConfig

BENCH_VERSION = "distill-levers-2"  # 2: students of FDM teachers see their input (see_input)
TEACHER_SAMPLER = SamplerSpec(method="heun", steps=18)
SCORED = (4, 2, 1)  # the student step counts a recipe is judged on
GOALS = {4: 1.25, 2: 1.5, 1: 2.0}  # issue 16's goals: student FD ÷ teacher (Heun-18) FD

# Today's digits.yaml rounds: 32 -> ... steps, 250 updates each, DDIM teacher targets, no EMA.
REFERENCE: dict[str, Any] = {
    "start_steps": 32,
    "updates": 250,
    "final_updates": 250,
    "lr": 5e-4,
    "batch_size": 128,
    "teacher_solver": "euler",
    "ema_decay": None,
    "parameterisation": "x",
    "weighting": "truncated_snr",
}


@dataclass(frozen=True)
class Lever:
    name: str
    question: str
    variants: dict[str, dict[str, Any]]  # label -> the change to the best recipe so far


LEVERS = [
    Lever(
        "teacher targets",
        "Do targets from two teacher Heun steps (4 NFE) instead of DDIM (2 NFE) help?",
        {"DDIM targets": {"teacher_solver": "euler"}, "Heun targets": {"teacher_solver": "heun"}},
    ),
    Lever(
        "student EMA",
        "Does an EMA of the student's weights help (the round outputs it, so it is also the next round's "
        "teacher and its student's initial weights)",
        {"no EMA": {"ema_decay": None}, "EMA 0.99": {"ema_decay": 0.99}},
    ),
    Lever(
        "learning rate, batch",
        "Which learning rate (annealed linearly to 0 in each round) and batch size",
        {
            "lr 5e-4, batch 128": {"lr": 5e-4, "batch_size": 128},
            "lr 1e-3, batch 128": {"lr": 1e-3, "batch_size": 128},
            "lr 2e-4, batch 128": {"lr": 2e-4, "batch_size": 128},
            "lr 1e-4, batch 128": {"lr": 1e-4, "batch_size": 128},
            "lr 5e-4, batch 256": {"lr": 5e-4, "batch_size": 256},
        },
    ),
    Lever(
        "start steps",
        "How many steps should the first teacher take",
        {"start 32": {"start_steps": 32}, "start 16": {"start_steps": 16}, "start 8": {"start_steps": 8}},
    ),
    Lever(
        "updates",
        "How many updates per round, and does doubling them for the rounds to 2 and 1 steps pay",
        {
            "250 / 250": {"updates": 250, "final_updates": 250},
            "250 / 500": {"updates": 250, "final_updates": 500},
            "250 / 1000": {"updates": 250, "final_updates": 1000},
            "500 / 500": {"updates": 500, "final_updates": 500},
        },
    ),
    Lever(
        "parameterisation, weighting",
        "Which output head for the student, and which loss weight",
        {
            "x, truncated SNR": {"parameterisation": "x", "weighting": "truncated_snr"},
            "v, truncated SNR": {"parameterisation": "v", "weighting": "truncated_snr"},
            "x, SNR + 1": {"parameterisation": "x", "weighting": "snr_plus_one"},
        },
    ),
]


@dataclass(frozen=True)
class Mode:
    """Sizes of one benchmark mode."""

    name: str
    base_steps: int
    num_samples: int
    seeds: tuple[int, ...]
    levers: list[Lever]
    reference: dict[str, Any] = field(default_factory=lambda: dict(REFERENCE))
    classifier_steps: int = 300
    cache: Path | None = CACHE
    record: Path | None = None


MODES = {
    "full": Mode("full", 1500, 1000, (0, 1), LEVERS, record=RESULTS / "distillation.json"),
    "quick": Mode(
        "quick",
        600,
        500,
        (0, 1),
        LEVERS[:1],
        {**REFERENCE, "start_steps": 8, "updates": 100, "final_updates": 100},
        record=None,
    ),
    # The CI smoke test's: a few steps of everything, to check the machinery and the report, not the claim.
    "tiny": Mode(
        "tiny",
        4,
        32,
        (0,),
        LEVERS[:1],
        {**REFERENCE, "start_steps": 4, "updates": 2, "final_updates": 2},
        classifier_steps=5,
        cache=None,
    ),
}


# --- one cell: a recipe distilled on one seed -----------------------------------------------------------
def judged(stages: Stages, mode: Mode) -> dict[str, StageResult]:
    """The dataset and the evaluation classifier, shared by every cell."""
    data = stages("prepare_data", DIGITS_DATA)
    clf = stages("train_classifier", ClassifierConfig(steps=mode.classifier_steps, seed=0), dataset=data)
    return {"dataset": data, "classifier": clf}


def halvings(start: int) -> list[int]:
    """The students' step counts of a recipe distilled from `start` steps down to 1, as the pipeline's."""
    return DistillSchedule(start_steps=start, end_steps=1).student_steps


def distill_settings(recipe: dict[str, Any], seed: int) -> dict[str, Any]:
    """The DistillConfig fields of a recipe (every field but start_steps), with the cell's seed."""
    fields = {k: v for k, v in recipe.items() if k != "start_steps"}
    return DistillConfig(**fields, checkpoint_every=10**6, seed=seed).model_dump()


def run_cell(recipe: dict[str, Any], seed: int, mode: Mode, root: str) -> dict[str, Any]:
    """Distil `recipe` on seed `seed`: the teacher's Heun-18 FD, and per student its FD, updates, seconds."""
    torch.set_num_threads(1)
    stages = Stages(root)
    j = judged(stages, mode)
    model = ModelConfig(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    train = TrainConfig(
        process="edm", fdm=True, steps=mode.base_steps, batch_size=128, lr=2e-3, ema_decay=0.995, seed=seed
    )
    base = stages("train_base", TrainBaseConfig(model=model, train=train), dataset=j["dataset"])

    def evaluate(model_result: StageResult, sampler: SamplerSpec) -> float:
        cfg = EvalConfig(num_samples=mode.num_samples, batch_size=250, samplers=[sampler], seed=seed)
        return stages("evaluate", cfg, model=model_result, **j).info["by_sampler"][sampler.tag]["fd"]

    teacher_fd = evaluate(base, TEACHER_SAMPLER)
    uri, teacher_steps, students = base, recipe["start_steps"], []
    settings = distill_settings(recipe, seed)
    for k, steps in enumerate(halvings(recipe["start_steps"]), start=1):
        cfg = DistillRoundConfig(**settings, teacher_steps=teacher_steps, round_index=k)
        res = stages("distill_round", cfg, teacher=uri, dataset=j["dataset"])
        fd = evaluate(res, SamplerSpec(method="euler", steps=steps))
        students.append(
            {
                "steps": steps,
                "fd": fd,
                "updates": int(res.metrics["updates"]),
                "seconds": res.metrics["distill_seconds"],
            }
        )
        uri, teacher_steps = res, steps
    return {
        "teacher_fd": teacher_fd,
        "base_steps": int(base.metrics["steps"]),
        "base_seconds": base.metrics["train_seconds"],
        "students": students,
    }


# --- the record and the greedy study -------------------------------------------------------------------
def cell_id(recipe: dict[str, Any], seed: int, mode: Mode, version: str = BENCH_VERSION) -> str:
    return json.dumps([version, mode.base_steps, mode.num_samples, recipe, seed], sort_keys=True)


BLIND_VERSION = "distill-levers-1"  # the cells run before students of FDM teachers saw their input


class Record:
    """The finished cells by id, saved to `path` (if any) as each is added."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.cells: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            self.cells = {c["id"]: c for c in json.loads(path.read_text())["cells"]}

    def add(self, cid: str, recipe: dict[str, Any], seed: int, result: dict[str, Any]) -> None:
        self.cells[cid] = {"id": cid, "recipe": recipe, "seed": seed, **result}
        if self.path is not None:
            self.path.write_text(json.dumps({"cells": list(self.cells.values())}, indent=1) + "\n")


def ratios(cell: dict[str, Any]) -> dict[int, float]:
    """Student FD ÷ teacher Heun-18 FD, by student step count."""
    return {s["steps"]: s["fd"] / cell["teacher_fd"] for s in cell["students"]}


def score(cells: list[dict[str, Any]]) -> float:
    """Mean over seeds and the 4-, 2- and 1-step students of log(FD ratio): lower is better."""
    logs = [math.log(ratios(c)[n]) for c in cells for n in SCORED if n in ratios(c)]
    return sum(logs) / len(logs)


def within_budget(cells: list[dict[str, Any]]) -> bool:
    """Issue 16's cost goal: distilling to 4 steps takes at most the base training's updates and wall time
    (means over the seeds)."""
    return all(_mean([cost(c, 4)[k] for c in cells]) <= 1.0 for k in (0, 1))


def cost(cell: dict[str, Any], down_to: int) -> tuple[float, float]:
    """Updates and wall time of the rounds down to `down_to` steps, each ÷ the base training's."""
    rounds = [s for s in cell["students"] if s["steps"] >= down_to]
    return (
        sum(s["updates"] for s in rounds) / cell["base_steps"],
        sum(s["seconds"] for s in rounds) / cell["base_seconds"],
    )


def run_all(todo: list[tuple[dict[str, Any], int]], mode: Mode, record: Record, root: str, jobs: int) -> None:
    """Run the cells `todo` lacks in `record`, one process per seed at a time (cells of one seed share its
    base model, so they run in order), recording each as it finishes."""
    todo = [(r, s) for r, s in todo if cell_id(r, s, mode) not in record.cells]
    if not todo:
        return
    judged(Stages(root), mode)  # shared by every seed: made once, before the workers start
    if jobs <= 1:
        for recipe, seed in todo:
            record.add(cell_id(recipe, seed, mode), recipe, seed, run_cell(recipe, seed, mode, root))
            print(f"done {recipe} seed {seed}", flush=True)
        return
    by_seed: dict[int, Iterator[dict[str, Any]]] = {}
    for seed in dict.fromkeys(s for _, s in todo):
        by_seed[seed] = iter([r for r, s in todo if s == seed])
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(by_seed)), spawn) as pool:
        running: dict[Future, tuple[dict[str, Any], int]] = {}

        def submit(seed: int) -> None:
            recipe = next(by_seed[seed], None)
            if recipe is not None:
                running[pool.submit(run_cell, recipe, seed, mode, root)] = (recipe, seed)

        for seed in by_seed:
            submit(seed)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                recipe, seed = running.pop(fut)
                record.add(cell_id(recipe, seed, mode), recipe, seed, fut.result())
                print(f"done {recipe} seed {seed}", flush=True)
                submit(seed)


def study(mode: Mode, record: Record, root: str, jobs: int, run: bool = True) -> list[dict[str, Any]]:
    """The greedy lever study: per lever, its variants on the best recipe so far (run where `run` and
    missing), and the one carried on. Returns one entry per lever; stops at the first lever not fully
    recorded when not running."""
    best, levers = dict(mode.reference), []
    for lever in mode.levers:
        variants = {label: {**best, **change} for label, change in lever.variants.items()}
        cells = [(r, s) for r in variants.values() for s in mode.seeds]
        if run:
            run_all(cells, mode, record, root, jobs)
        found = {
            label: [record.cells.get(cell_id(r, s, mode)) for s in mode.seeds]
            for label, r in variants.items()
        }
        if any(c is None for cs in found.values() for c in cs):
            break
        affordable = [label for label in found if within_budget(found[label])] or list(found)
        chosen = min(affordable, key=lambda label: score(found[label]))
        levers.append({"lever": lever, "variants": variants, "cells": found, "chosen": chosen})
        best = variants[chosen]
    return levers


# --- the report ----------------------------------------------------------------------------------------
def fmt_ratio(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({'/'.join(f'{v:.2f}' for v in values)})"


def lever_table(entry: dict[str, Any]) -> list[str]:
    """One row per variant: FD ratio by student steps, score, and cost to 4 and to 1 steps."""
    cells = entry["cells"]
    shown = sorted({n for cs in cells.values() for c in cs for n in ratios(c)}, reverse=True)
    costs = "score | updates to 4 | wall to 4 | updates to 1 | wall to 1 |"
    head = "| variant | " + " | ".join(f"{n} steps" for n in shown) + " | " + costs
    rows = [head, "|---|" + "---:|" * (len(shown) + 5)]
    for label, cs in cells.items():
        by_n = [
            fmt_ratio([ratios(c)[n] for c in cs]) if all(n in ratios(c) for c in cs) else "" for n in shown
        ]
        c4 = [cost(c, 4) for c in cs]
        c1 = [cost(c, 1) for c in cs]
        mark = " **(chosen)**" if label == entry["chosen"] else "" if within_budget(cs) else " (over budget)"
        rows.append(
            f"| {label}{mark} | "
            + " | ".join(by_n)
            + f" | {score(cs):.3f} | {_mean([u for u, _ in c4]):.2f}x | {_mean([w for _, w in c4]):.2f}x"
            + f" | {_mean([u for u, _ in c1]):.2f}x | {_mean([w for _, w in c1]):.2f}x |"
        )
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def final_table(cells: list[dict[str, Any]]) -> list[str]:
    """The chosen recipe, per student: FD and ratio per seed, against issue 16's goals."""
    rows = [
        "| student steps | FD (per seed) | FD ÷ teacher Heun-18 (mean, per seed) | goal |",
        "|---:|---:|---:|---:|",
    ]
    teacher = "/".join(f"{c['teacher_fd']:.3f}" for c in cells)
    rows.append(f"| teacher, Heun-18 (35 NFE) | {teacher} | 1 | |")
    for i, s in enumerate(cells[0]["students"]):
        n = s["steps"]
        fds = "/".join(f"{c['students'][i]['fd']:.3f}" for c in cells)
        goal = f"≤ {GOALS[n]}" if n in GOALS else ""
        rows.append(f"| {n} | {fds} | {fmt_ratio([ratios(c)[n] for c in cells])} | {goal} |")
    return rows


def plot(levers: list[dict[str, Any]], mode: Mode) -> bytes:
    """FD ÷ teacher against student steps: the reference recipe and the chosen one, each seed."""
    fig = Figure(figsize=(6.5, 4.0), dpi=120)
    ax = fig.subplots()
    first, last = levers[0], levers[-1]
    shown = [
        ("today's rounds (reference)", first["cells"][next(iter(first["cells"]))], "o--"),
        ("chosen recipe", last["cells"][last["chosen"]], "s-"),
    ]
    for label, cells, style in shown:
        for c in cells:
            r = ratios(c)
            ax.plot(list(r), list(r.values()), style, label=f"{label}, seed {c['seed']}", alpha=0.8)
    for n, g in GOALS.items():
        ax.plot([n], [g], "k_", markersize=14)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    steps = sorted({n for _, cs, _ in shown for c in cs for n in ratios(c)})
    ax.set_xticks(steps, [str(n) for n in steps])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("student sampling steps (NFE)")
    ax.set_ylabel("student FD ÷ teacher's Heun-18 FD")
    ax.set_title(f"Progressive distillation on digits, EDM-FDM base (black: goals){_suffix(mode)}")
    ax.legend(fontsize=7)
    return png(fig, dpi=120)


def _suffix(mode: Mode) -> str:
    return "" if mode.name == "full" else f" ({mode.name} mode)"


def blind_table(levers: list[dict[str, Any]], mode: Mode, record: Record) -> list[str]:
    """Lever 1's variants with the first grid point hidden from the student (the record's cells of
    BLIND_VERSION, where a student kept FDM's c_in = gamma(80) ~ 4e-8) and seen (`see_input`)."""
    entry, rows = levers[0], []
    shown = sorted({n for cs in entry["cells"].values() for c in cs for n in ratios(c)}, reverse=True)
    for label, recipe in entry["variants"].items():
        blind = [record.cells.get(cell_id(recipe, s, mode, BLIND_VERSION)) for s in mode.seeds]
        for how, cells in (("hidden (gamma)", blind), ("seen (baseline c_in)", entry["cells"][label])):
            if all(c is not None for c in cells):
                by_n = [fmt_ratio([ratios(c)[n] for c in cells]) for n in shown]
                rows.append(f"| {label} | {how} | " + " | ".join(by_n) + " |")
    if not rows:
        return []
    head = "| variant | x at sigma_max | " + " | ".join(f"{n} steps" for n in shown) + " |"
    return [head, "|---|---|" + "---:|" * len(shown), *rows]


def report(
    levers: list[dict[str, Any]], mode: Mode, cmd: str, png_name: str, pending: int, record: Record
) -> str:
    """The Markdown report: set-up, one table per lever, the chosen recipe against the goals, reading."""
    out = [
        f"# Progressive distillation on digits: levers and the shipped recipe{_suffix(mode)}",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {machine()}, shared with other work (wall times are ratios within one cell).  ",
        f"Teacher: EDM-FDM U-Net (16 channels), {mode.base_steps} steps at batch 128, lr 2e-3, EMA 0.995 "
        "(digits.yaml's base model), judged with Heun-18 (35 NFE).  ",
        f"Seeds {', '.join(map(str, mode.seeds))}: each seeds the base training, the distillation and the "
        "evaluation noise (data split and classifier: seed 0).  ",
        f"Quality: Fréchet distance of {mode.num_samples} samples in the features of the "
        "tasks.train_classifier CNN, against the train split; each student is sampled with DDIM on its "
        "own grid. A cell shows FD ÷ "
        "the same seed's teacher Heun-18 FD, as mean (seed 0/seed 1); lower is better.  ",
        "Score: mean log FD ratio of the 4-, 2- and 1-step students over the seeds; the lowest among the "
        "variants within the cost goal (to 4 steps: at most the base training's updates and wall time) is "
        "carried on to the next lever (greedy, one lever at a time); over-budget variants are shown, "
        "marked.  ",
        "Cost: optimizer updates and wall time of the rounds down to 4 (to 1) steps ÷ the base training's.",
        "",
        f"![ratio vs steps]({png_name})",
        "",
    ]
    for i, entry in enumerate(levers, start=1):
        lever = entry["lever"]
        out += [
            f"## Lever {i}: {lever.name}",
            "",
            lever.question.rstrip("?") + "?",
            "",
            *lever_table(entry),
            "",
        ]
    blind = blind_table(levers, mode, record) if levers else []
    if blind:
        out += [
            "## What a student sees at sigma_max",
            "",
            "FDM scales the network's input by gamma(80) ~ 4e-8 at the first grid point. A student that kept "
            "it (an earlier version of this benchmark, same recipes and seeds) could not see the x it steps "
            "from there: harmless while later steps still carry x, but the 2-step student's first jump "
            "(80 -> 2.6) and the 1-step student's only step were blind. Students now take the baseline's "
            "c_in where gamma hides x (`fdm_core.distill.student_process`):",
            "",
            *blind,
            "",
        ]
    if levers:
        chosen = levers[-1]["variants"][levers[-1]["chosen"]]
        cells = levers[-1]["cells"][levers[-1]["chosen"]]
        ref = levers[0]["cells"][next(iter(levers[0]["cells"]))]
        u4, w4 = (_mean([cost(c, 4)[k] for c in cells]) for k in (0, 1))
        out += [
            "## The chosen recipe",
            "",
            "Recipe: " + ", ".join(f"{k} {v}" for k, v in chosen.items()) + ".",
            "",
            *final_table(cells),
            "",
            f"Cost to 4 steps: {u4:.2f}x the base training's updates, {w4:.2f}x its wall time.",
            "",
            "Reading: "
            + reading(ref, cells)
            + ("" if not pending else f" ({pending} lever(s) still to run.)"),
            "",
        ]
    return "\n".join(out)


def reading(ref: list[dict[str, Any]], best: list[dict[str, Any]]) -> str:
    parts = []
    for n in SCORED:
        if all(n in ratios(c) for c in ref + best):
            before, after = (_mean([ratios(c)[n] for c in cs]) for cs in (ref, best))
            met = "meets" if after <= GOALS[n] else "misses"
            parts.append(
                f"{n}-step student {before:.2f}x -> {after:.2f}x the teacher ({met} the goal {GOALS[n]}x)"
            )
    return "; ".join(parts) + "."


def headline(levers: list[dict[str, Any]], name: str) -> dict[str, bytes]:
    """The summary file: the chosen recipe's students against their goals, and its cost to 4 steps."""
    cells = levers[-1]["cells"][levers[-1]["chosen"]]
    after = {n: _mean([ratios(c)[n] for c in cells]) for n in SCORED if all(n in ratios(c) for c in cells)}
    wall4 = _mean([cost(c, 4)[1] for c in cells])
    students = ", ".join(f"{n}-step {r:.2f}x" for n, r in after.items())
    met = all(r <= GOALS[n] for n, r in after.items())
    return summary(
        name,
        f"students at {students} the teacher's Heun-18 FD (goals "
        f"{', '.join(f'{GOALS[n]:g}x' for n in after)}: {'all met' if met else 'not all met'}); distilling "
        f"to 4 steps costs {wall4:.2f}x the base training's wall time",
        **{f"ratio_{n}_steps": round(r, 3) for n, r in after.items()},
        wall_to_4_over_base=round(wall4, 3),
        met=met,
    )


def report_name(mode: Mode) -> str:
    return "distillation" + ("" if mode.name == "full" else f"_{mode.name}")


def run(mode: Mode, jobs: int = 1, report_only: bool = False) -> tuple[str, dict[str, bytes]]:
    """Run (or, `report_only`, read) the study; the Markdown report and its plot as {file name: PNG}."""
    record = Record(mode.record)
    with tempfile.TemporaryDirectory() as tmp:
        root = str(mode.cache) if mode.cache is not None else tmp
        levers = study(mode, record, root, jobs, run=not report_only)
    if not levers:
        raise SystemExit("distillation: no lever is fully recorded yet")
    name = report_name(mode)
    cmd = command("distillation", mode.name, *([f"--jobs {jobs}"] if jobs != 1 else []))
    text = report(levers, mode, cmd, f"{name}.png", len(mode.levers) - len(levers), record)
    return text, {f"{name}.png": plot(levers, mode), **headline(levers, name)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one lever, short runs (a few minutes)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds distilled at once, one core each")
    parser.add_argument("--report-only", action="store_true", help="re-render from the recorded cells")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    torch.set_num_threads(1)  # as every cell's process; the report's machine line says so
    t0 = time.perf_counter()
    text, files = run(mode, args.jobs, args.report_only)
    print(text)
    print(f"report: {write_report(report_name(mode), text, files)} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
