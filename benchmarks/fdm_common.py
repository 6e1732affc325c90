"""What the FDM benchmarks share: the digits data and its classifier-feature metric, the study's cells and
the committed record of the finished ones, and the pool that runs them.

A *cell* is one training run: (process, fdm, seed, setting). It trains through the product's code
(benchmarks.fdm_cell: `tasks.train_base`, `tasks.training_loop.fit`, TrainConfig and its checkpoints);
baseline and FDM cells of one seed use the same U-Net, initial weights, optimiser, batches and training
noise; only the process's `fdm` flag differs (c_in = gamma(sigma) and the loss-weight warm-up,
docs/design.md: The math). A finished cell is kept twice:
- its curve (and Heun NFE sweep of the final model) as a record in a committed JSON file
  (benchmarks/results/fdm_training.json), so a later session treats it as done;
- its final EMA model, with the curve in its manifest, in the gitignored model cache (benchmarks/.cache), a
  store laid out as `fdm run` lays it out (benchmarks.stage_cache), for this session.
While a cell trains it checkpoints as the product does, at every evaluation, so an interrupted run resumes
that cell from its last evaluation.

A cell's record identity is its settings plus `BENCH_VERSION` (bumped when the benchmark's training or
evaluation semantics change), deliberately not a hash of the project's code, so unrelated refactors keep the
recorded cells. Records made before the study trained through the product's loop carry no `trained_by`.
"""

from __future__ import annotations

import atexit
import io
import json
import math
import multiprocessing
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from matplotlib.figure import Figure
from torch import Tensor

from benchmarks.common import DIGITS_DATA
from benchmarks.fdm_cell import CELL, CellConfig, Curve, FeatureFrechet
from benchmarks.stage_cache import Stages
from fdm_core.precond import Denoiser
from fdm_core.processes import DEFAULT_WARMUP, ProcessName, make_process
from fdm_core.samplers import nfe
from infra.store import open_store
from tasks.checkpoints import load_model
from tasks.dataset import load_split
from tasks.stage import StageResult
from tasks.stages.train_base import TrainConfig
from tasks.stages.train_classifier import ClassifierConfig
from tasks.train_classifier import load_classifier

# Bump when what a cell's numbers mean changes (training loop, evaluation, metric); committed cells
# recorded under another version are then re-run instead of mixed in. The switch to the product's training
# loop kept it: a check cell trained both ways measured the same (fdm_training.md says how close).
BENCH_VERSION = "fdm-study-1"
TRAINED_BY = "tasks.training_loop.fit"  # what a record made by this code trained with


def warmup(train: TrainConfig) -> int:
    """FDM's warm-up W of a training config: its own, else the reference's for its process."""
    return train.warmup_iters or DEFAULT_WARMUP[train.process]


def identity(cfg: CellConfig, classifier_steps: int) -> dict[str, Any]:
    """Everything that fixes a cell's curve (as JSON-normal data, in the record's format); a baseline has
    no warm-up W."""
    t, m = cfg.train, cfg.model
    unet = {"img_resolution": 8, "in_channels": 1, "model_channels": m.model_channels}
    unet |= {
        "channel_mult": m.channel_mult,
        "num_blocks": m.num_blocks,
        "attn_resolutions": m.attn_resolutions,
    }
    ident = {"bench": BENCH_VERSION, "process": t.process, "fdm": t.fdm, "seed": t.seed, "unet": unet}
    ident |= {"classifier_steps": classifier_steps, "steps": t.steps, "eval_every": cfg.eval_every}
    ident |= {"num_samples": cfg.num_samples, "sample_steps": cfg.sample_steps, "batch_size": t.batch_size}
    ident |= {"lr": t.lr, "lr_rampup": t.lr_rampup, "ema_decay": t.ema_decay, "ema_rampup": t.ema_rampup}
    ident |= {"grad_clip": t.grad_clip, "model_channels": m.model_channels}
    ident["warmup_iters"] = warmup(t) if t.fdm else None
    if t.multiplier is not None:
        ident["multiplier"] = t.multiplier
    return json.loads(json.dumps(ident))


def describe(cfg: CellConfig) -> str:
    """A setting in words (the report's "Main setting")."""
    t = cfg.train
    ema = (
        f"EMA decay {t.ema_decay}"
        if t.ema_rampup is None
        else f"EMA decay {t.ema_decay} with its mean age capped at {t.ema_rampup:g} x steps so far"
    )
    clip = "no grad clip" if t.grad_clip is None else f"grad clip {t.grad_clip}"
    warmup = (
        "W = 200 (EDM) / 400 (VP, VE) optimizer steps as the reference"
        if t.warmup_iters is None
        else f"W = {t.warmup_iters} steps"
    )
    return (
        f"U-Net {cfg.model.model_channels} channels (mult (1, 2), 1 block, attention at 4x4), "
        f"Adam lr {t.lr} (linear ramp-up {t.lr_rampup} steps), batch {t.batch_size}, "
        f"{t.steps} steps, {ema}, "
        f"{clip}; FDM m = 2 (VE 1), {warmup}; evaluation every {cfg.eval_every} steps: "
        f"{cfg.num_samples} samples from fixed noise, Heun {cfg.sample_steps} steps "
        f"({nfe('heun', cfg.sample_steps)} NFE) on the process's default grid"
    )


@dataclass
class Digits:
    """The digits training split and the metric built on it; `floor` is the FD of the held-out real
    images (a noise floor for the metric, and a fingerprint that the metric is the same across sessions).
    `root` is the store holding the prepared data, the classifier (`dataset`, `classifier`) and the cells."""

    x_train: Tensor
    metric: FeatureFrechet
    classifier_accuracy: float
    classifier_steps: int
    root: str
    dataset: StageResult
    classifier: StageResult
    floor: float = float("nan")


def load_digits(root: Path, classifier_steps: int = 300) -> Digits:
    """Prepare sklearn's 8x8 digits (val 10%) in the store at `root` and train the evaluation classifier
    on them (both served from there when present)."""
    stages = Stages(str(root))
    data = stages("prepare_data", DIGITS_DATA)
    clf = stages("train_classifier", ClassifierConfig(steps=classifier_steps), dataset=data)
    x_train, _, _ = load_split(data.output_uri, "train")
    x_val, _, _ = load_split(data.output_uri, "val")
    metric = FeatureFrechet(load_classifier(clf.output_uri), x_train)
    accuracy = clf.metrics["val_accuracy"]
    return Digits(x_train, metric, accuracy, classifier_steps, str(root), data, clf, metric(x_val))


def cell_result(cfg: CellConfig, data: Digits) -> StageResult:
    """A cell's stage result: served from the store at `data.root`, else trained there (resuming)."""
    return Stages(data.root)(CELL, cfg, dataset=data.dataset, classifier=data.classifier)


def trained_curve(cfg: CellConfig, data: Digits) -> Curve:
    """The cell's quality curve: the cached one when its model is complete, else a fresh run's."""
    result = cell_result(cfg, data)
    if result.cached:
        print(f"  {result.key}: reusing the cached curve", flush=True)
    return Curve(**result.info["curve"])


def cached_model(cfg: CellConfig, data: Digits) -> Denoiser | None:
    """The cached final EMA model of this cell, or None."""
    stages = Stages(data.root)
    inputs = {"dataset": data.dataset, "classifier": data.classifier}
    key = stages.key(CELL, cfg, inputs)
    result = stages.served(CELL, key, inputs)
    if result is None:
        return None
    print(f"  {key}: reusing the cached model", flush=True)
    return load_model(open_store(result.output_uri), "")[0]


def trained(cfg: CellConfig, data: Digits) -> Denoiser:
    """The final EMA model of this cell, from the cache if it is there, else a fresh run's."""
    model = cached_model(cfg, data)
    return model if model is not None else load_model(open_store(cell_result(cfg, data).output_uri), "")[0]


def input_scale(process: ProcessName, fdm: bool, data_std: float, n: int = 100_000) -> tuple[float, float]:
    """Median and 90th percentile, over the training sigma law, of the network input's standard deviation
    c_in(σ)·sqrt(s² + σ²) for data of std s: the baseline keeps it near 1, FDM's c_in = γ(σ) need not."""
    proc = make_process(process, fdm=fdm)
    sigma = proc.sample_sigma(n, torch.Generator().manual_seed(0))
    std = proc.c_in(sigma) * (data_std**2 + sigma**2).sqrt()
    return float(std.median()), float(std.quantile(0.9))


# --- cells: what a study runs, and the committed record of what it has run --------------------------
@dataclass(frozen=True)
class Cell:
    """One training run of a study: (process, fdm, seed) under the named setting's config."""

    process: ProcessName
    fdm: bool
    seed: int
    setting: str
    run: CellConfig

    def config(self) -> CellConfig:
        return self.run.for_cell(self.process, self.fdm, self.seed)

    @property
    def label(self) -> str:
        return f"{self.setting}/{self.process}{'-fdm' if self.fdm else ''}/s{self.seed}"


class Results:
    """The committed record of finished cells (`{"meta": ..., "cells": [...], "summary": ...}`); a cell
    counts as done when a record with the same identity is present. `path` None: kept in memory only."""

    def __init__(self, path: Path | None, classifier_steps: int) -> None:
        self.path = path
        self.classifier_steps = classifier_steps
        self.doc: dict[str, Any] = {"meta": {}, "cells": [], "summary": {}}
        if path is not None and path.exists():
            self.doc = json.loads(path.read_text())

    def identity(self, cell: Cell) -> dict[str, Any]:
        return identity(cell.config(), self.classifier_steps)

    def find(self, cell: Cell) -> dict[str, Any] | None:
        ident = self.identity(cell)
        return next((r for r in self.doc["cells"] if r.get("config") == ident), None)

    def add(self, cell: Cell, curve: Curve, floor: float) -> None:
        record = {
            "process": cell.process,
            "fdm": cell.fdm,
            "seed": cell.seed,
            "setting": cell.setting,
            "curve": [[s, round(q, 4)] for s, q in zip(curve.steps, curve.quality)],
            "heun_sweep": [[int(n), int(e), round(q, 4)] for n, e, q in curve.sweep],
            "final_fds": [round(q, 4) for q in curve.final],
            "train_seconds": round(curve.train_seconds, 1),
            "eval_seconds": round(curve.eval_seconds, 1),
            "metric_floor": round(floor, 4),
            "config": self.identity(cell),
            "trained_by": TRAINED_BY,
            "train_loss": [[s, round(loss, 5)] for s, loss in zip(curve.steps, curve.losses)],
        }
        self.doc["cells"] = [r for r in self.doc["cells"] if r.get("config") != record["config"]] + [record]

    def save(self) -> None:
        if self.path is not None:
            store = open_store(str(self.path.parent))
            store.write_bytes(self.path.name, (json.dumps(self.doc, indent=1) + "\n").encode())


def unique_cells(cells: Sequence[Cell], results: Results) -> dict[str, Cell]:
    """The distinct cells in order of first occurrence (an ablation's baseline is often main's)."""
    unique: dict[str, Cell] = {}
    for cell in cells:
        unique.setdefault(json.dumps(results.identity(cell), sort_keys=True), cell)
    return unique


def run_cell(cell: Cell, data: Digits) -> Curve:
    """One cell's curve, from the model cache when it finished there before (a pool job)."""
    return trained_curve(cell.config(), data)


def run_cells(
    cells: Sequence[Cell],
    results: Results,
    data: Digits,
    workers: int,
    on_done: Callable[[], None] = lambda: None,
) -> None:
    """Run every cell that `results` lacks, `workers` at a time in cell order, recording each one (and
    calling `on_done`) as soon as it finishes, so an interrupted study keeps all finished cells."""
    unique = list(unique_cells(cells, results).values())
    todo = [cell for cell in unique if results.find(cell) is None]
    print(f"{len(unique) - len(todo)} of {len(unique)} cells recorded, {len(todo)} to run", flush=True)

    def finish(cell: Cell, curve: Curve) -> None:
        results.add(cell, curve, data.floor)
        results.save()
        on_done()
        print(f"done {cell.label}: final FD {curve.quality[-1]:.3f}", flush=True)

    if workers <= 1 or len(todo) <= 1:
        for cell in todo:
            finish(cell, run_cell(cell, data))
        return
    spawn = multiprocessing.get_context("spawn")  # fork after OpenMP has started can hang the children
    with ProcessPoolExecutor(min(workers, len(todo)), spawn, torch.set_num_threads, (1,)) as pool:
        queue: Iterator[Cell] = iter(todo)
        running = {}
        for cell in queue:  # submit only `workers` at a time so cells start in order
            running[pool.submit(run_cell, cell, data)] = cell
            if len(running) >= workers:
                break
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                finish(running.pop(fut), fut.result())
                nxt = next(queue, None)
                if nxt is not None:
                    running[pool.submit(run_cell, nxt, data)] = nxt


class PairMode(Protocol):
    """What the quick and tiny modes of both FDM benchmarks say about their runs."""

    seeds: dict[ProcessName, tuple[int, ...]]
    classifier_steps: int
    workers: int
    cache: Path | None


def digits_data(classifier_steps: int, cache: Path | None) -> Digits:
    """The digits data and its metric in the store `cache` (None: a temporary one, removed at exit), built
    with one torch thread (more than free cores thrashes)."""
    torch.set_num_threads(1)
    if cache is None:
        cache = Path(tempfile.mkdtemp(prefix="fdm-bench-"))
        atexit.register(shutil.rmtree, cache, True)
    return load_digits(cache, classifier_steps)


def run_pairs(fn: Callable[..., object], mode: PairMode) -> tuple[Digits, list]:
    """Load the digits data and its metric once, then `fn(process, fdm, mode, seed, data)` for the baseline
    then the FDM run of every process and seed, over `mode.workers` processes; (data, results in order)."""
    data = digits_data(mode.classifier_steps, mode.cache)
    jobs = [
        (p, fdm, mode, seed, data) for p, ss in mode.seeds.items() for seed in ss for fdm in (False, True)
    ]
    return data, parallel_map(fn, jobs, mode.workers)


def parallel_map(fn: Callable[..., object], jobs: Sequence[tuple], workers: int) -> list:
    """`fn(*job)` for every job, in order: inline for one worker, else in a pool of `workers` processes.

    Each pool process runs torch on one thread, so the workers do not thrash the cores they share."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), spawn, torch.set_num_threads, (1,)) as pool:
        return list(pool.map(fn, *zip(*jobs)))


def first_reach(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """The x where the curve first gets down to `target`, linearly interpolated; None if it never does."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y <= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return float(x0 + (x - x0) * (y0 - target) / (y0 - y))
    return None


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def fmt(v: float | None, digits: int = 2) -> str:
    return "not reached" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def plot(
    panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], xlabel: str, ylabel: str
) -> bytes:
    """PNG of one panel per key, each with its labelled lines (log y)."""
    fig = Figure(figsize=(4.5 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, lines) in zip(axes, panels.items()):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=label, linestyle="--" if "FDM" in label else "-")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
