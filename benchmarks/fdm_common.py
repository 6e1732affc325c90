"""What the FDM benchmarks share: the digits data, a classifier-feature Fréchet distance, a training loop
that scores its EMA model at regular step intervals, and the cell store that makes a long study resumable.

A *cell* is one training run: (process, fdm, seed, setting). Baseline and FDM cells of one seed use the
same U-Net, initial weights, optimiser, batches and training noise; only the process's `fdm` flag differs
(c_in = gamma(sigma) and the loss-weight warm-up, docs/design.md: The math). A finished cell is kept twice:
- its curve (and Heun NFE sweep of the final model) as a record in a committed JSON file
  (benchmarks/results/fdm_training.json), so a later session treats it as done;
- its final EMA model and curve in the gitignored model cache (benchmarks/.cache), for this session.
While a cell trains it checkpoints its full state (weights, EMA, Adam, random generator, curve) into the
model cache at every evaluation, so an interrupted run resumes that cell bit-exactly at its last evaluation.

A cell's identity is its settings plus `BENCH_VERSION` (bumped when the benchmark's training or evaluation
semantics change), deliberately not a hash of the project's code, so unrelated refactors keep the cells.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from matplotlib.figure import Figure
from torch import Tensor

from benchmarks.common import DIGITS_UNET
from fdm_core.metrics import frechet_distance
from fdm_core.networks import UNet
from fdm_core.precond import Denoiser
from fdm_core.processes import DEFAULT_WARMUP, ProcessName, make_process
from fdm_core.samplers import Method, nfe, process_grid, sample
from fdm_core.training import EMA, TrainState, denoising_loss, train_step
from tasks.dataset import load_split
from tasks.registry import STAGES
from tasks.stage import StageContext, run_stage
from tasks.stages.prepare_data import DataConfig
from tasks.stages.train_classifier import ClassifierConfig
from tasks.train_classifier import Classifier, load_classifier

# Trained models and partial runs (FDM_BENCH_CACHE overrides; delete it to retrain from scratch).
CACHE = Path(os.environ.get("FDM_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))

# The final model is scored from these sampling seeds (the first is the curve's own), so the quality it
# ends at is known to ~1/sqrt(5) of one evaluation's sampling noise.
FINAL_NOISE_SEEDS = (1234, 1235, 1236, 1237, 1238)

# Bump when what a cell's numbers mean changes (training loop, evaluation, metric); committed cells
# recorded under another version are then re-run instead of mixed in.
BENCH_VERSION = "fdm-study-1"


@dataclass(frozen=True)
class RunConfig:
    """One training run: Adam on `batch_size` batches for `steps`, EMA model scored every `eval_every`.

    lr ramps up linearly over `lr_rampup` steps (as TrainConfig). The EMA's mean weight age
    1/(1 - decay) is capped at `ema_rampup` x the steps taken (EDM's ema_rampup_ratio), so its lag grows
    with the run instead of being a fixed number of steps, which would bias a step ratio towards 1;
    `ema_rampup=None` keeps `ema_decay` constant. `warmup_iters` None: the reference W (EDM 200, VP/VE 400
    optimizer steps). `sweep`: Heun step counts at which the final model is also scored (fdm_sampling)."""

    steps: int
    eval_every: int
    num_samples: int
    sample_steps: int = 18
    batch_size: int = 128
    lr: float = 2e-3
    lr_rampup: int = 100
    ema_decay: float = 0.999
    ema_rampup: float | None = 0.1
    grad_clip: float | None = 1.0
    model_channels: int = 16
    warmup_iters: int | None = None
    sweep: tuple[int, ...] = ()

    def warmup(self, process: ProcessName) -> int:
        return self.warmup_iters or DEFAULT_WARMUP[process]

    def unet(self) -> dict[str, Any]:
        return {**DIGITS_UNET, "model_channels": self.model_channels}

    def identity(self, process: ProcessName, fdm: bool, seed: int, classifier_steps: int) -> dict[str, Any]:
        """Everything that fixes a cell's curve (as JSON-normal data); a baseline has no warm-up W."""
        fields = asdict(self)
        fields.pop("sweep")
        fields["warmup_iters"] = self.warmup(process) if fdm else None
        ident = {"bench": BENCH_VERSION, "process": process, "fdm": fdm, "seed": seed, "unet": self.unet()}
        ident |= {"classifier_steps": classifier_steps, **fields}
        return json.loads(json.dumps(ident))

    def training_key(self, process: ProcessName, fdm: bool, seed: int, classifier_steps: int = 300) -> str:
        ident = self.identity(process, fdm, seed, classifier_steps)
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
        return f"{process}{'-fdm' if fdm else ''}-s{seed}-{digest}"

    def describe(self) -> str:
        ema = (
            f"EMA decay {self.ema_decay}"
            if self.ema_rampup is None
            else f"EMA decay {self.ema_decay} with its mean age capped at {self.ema_rampup:g} x steps so far"
        )
        clip = "no grad clip" if self.grad_clip is None else f"grad clip {self.grad_clip}"
        warmup = (
            "W = 200 (EDM) / 400 (VP, VE) optimizer steps as the reference"
            if self.warmup_iters is None
            else f"W = {self.warmup_iters} steps"
        )
        return (
            f"U-Net {self.model_channels} channels (mult (1, 2), 1 block, attention at 4x4), "
            f"Adam lr {self.lr} (linear ramp-up {self.lr_rampup} steps), batch {self.batch_size}, "
            f"{self.steps} steps, {ema}, "
            f"{clip}; FDM m = 2 (VE 1), {warmup}; evaluation every {self.eval_every} steps: "
            f"{self.num_samples} samples from fixed noise, Heun {self.sample_steps} steps "
            f"({nfe('heun', self.sample_steps)} NFE) on the process's default grid"
        )


class FeatureFrechet:
    """Fréchet distance between samples and the training split in the features of a small classifier
    trained once on that split (lower is better); samples are clamped to the data range [-1, 1]."""

    def __init__(self, classifier: Classifier, reference: Tensor) -> None:
        self.classifier = classifier.eval()
        self.reference = self.features(reference)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        return self.classifier.features(x.clamp(-1, 1))

    def __call__(self, x: Tensor) -> float:
        return frechet_distance(self.features(x), self.reference)


@dataclass
class Digits:
    """The digits training split and the metric built on it; `floor` is the FD of the held-out real
    images (a noise floor for the metric, and a fingerprint that the metric is the same across sessions)."""

    x_train: Tensor
    metric: FeatureFrechet
    classifier_accuracy: float
    classifier_steps: int
    floor: float = float("nan")


def load_digits(root: Path, classifier_steps: int = 300) -> Digits:
    """Prepare sklearn's 8x8 digits (val 10%) under `root` and train the evaluation classifier on them."""
    cfg = DataConfig.model_validate({"source": {"kind": "digits"}, "val_fraction": 0.1})
    uri = run_stage(
        STAGES["prepare_data"], cfg, StageContext(str(root), "stages/prepare_data/x", "x")
    ).output_uri
    clf_cfg = ClassifierConfig(steps=classifier_steps)
    ctx = StageContext(str(root), "stages/train_classifier/x", "x")
    clf = run_stage(STAGES["train_classifier"], clf_cfg, ctx, dataset=uri)
    x_train, _, _ = load_split(uri, "train")
    x_val, _, _ = load_split(uri, "val")
    metric = FeatureFrechet(load_classifier(clf.outputs["classifier"]), x_train)
    return Digits(x_train, metric, clf.metrics["val_accuracy"], classifier_steps, metric(x_val))


def make_denoiser(process: ProcessName, fdm: bool, cfg: RunConfig, seed: int) -> Denoiser:
    """A fresh U-Net (initialised from `seed`, so a baseline/FDM pair starts from the same weights)."""
    torch.manual_seed(seed)
    proc = make_process(process, fdm=fdm, warmup_iters=cfg.warmup(process))
    return Denoiser(UNet(**cfg.unet()), proc)


def generate(denoiser: Denoiser, n: int, steps: int, method: Method = "heun", seed: int = 1234) -> Tensor:
    """`n` samples on the process's default grid of `steps` steps; one seed gives one start noise."""
    sigmas = process_grid(denoiser.process, steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) * float(sigmas[0])
    return sample(denoiser.eval(), x.float(), sigmas, method)


@dataclass
class Curve:
    """Quality (Fréchet distance) of the EMA model at the evaluated training steps, of the final model at
    the Heun step counts of the sweep ([steps, NFE, FD] rows), and of the final model from each of
    `FINAL_NOISE_SEEDS` (`final`: one model's FD varies by ~0.3-0.5 at FD ~2 between sample sets)."""

    process: ProcessName
    fdm: bool
    seed: int
    steps: list[int] = field(default_factory=list)
    quality: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    sweep: list[list[float]] = field(default_factory=list)
    final: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.process.upper()}{'-FDM' if self.fdm else ''}"


def print_now(message: str) -> None:
    print(message, flush=True)  # pool workers write to a file: unflushed lines would arrive late


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _paths(cache: Path, key: str) -> tuple[Path, Path, Path]:
    """(final model, final curve, in-progress checkpoint) of a cell in the model cache."""
    return cache / "models" / f"{key}.pt", cache / "curves" / f"{key}.json", cache / "partial" / f"{key}.pt"


def train(
    process: ProcessName,
    fdm: bool,
    cfg: RunConfig,
    seed: int,
    data: Digits,
    log: Callable[[str], None] = print_now,
    cache: Path | None = CACHE,
) -> tuple[Denoiser, Curve]:
    """Train one cell; every `eval_every` steps (and at the end) score its EMA with Heun samples.

    Batches and training noise come from a generator seeded by `seed`, so the pair sees the same draws.
    With a `cache`, the run checkpoints at every evaluation and resumes from there, and its final EMA model
    and curve are kept (None: nothing is written)."""
    key = cfg.training_key(process, fdm, seed, data.classifier_steps)
    denoiser = make_denoiser(process, fdm, cfg, seed)
    ema = EMA(denoiser.net, cfg.ema_decay, cfg.ema_rampup)
    ema_denoiser = Denoiser(ema.model, denoiser.process)
    opt = torch.optim.Adam(denoiser.net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    state, curve = TrainState(), Curve(process, fdm, seed)
    partial_path = None if cache is None else _paths(cache, key)[2]
    if partial_path is not None and partial_path.exists():
        ckpt = torch.load(partial_path, weights_only=False)
        denoiser.net.load_state_dict(ckpt["net"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        state, curve = TrainState(**ckpt["state"]), Curve(**ckpt["curve"])
        log(f"  {curve.label} seed {seed}: resuming at step {state.step}")
    x_train = data.x_train
    while state.step < cfg.steps:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (state.step + 1) / max(1, cfg.lr_rampup))
        idx = torch.randint(len(x_train), (cfg.batch_size,), generator=gen)
        loss_fn = partial(denoising_loss, denoiser, x_train[idx], state.warmup_step, gen)
        train_step(denoiser.net, opt, loss_fn, state, ema, cfg.grad_clip)
        t1 = time.perf_counter()
        curve.train_seconds += t1 - t0
        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            q = data.metric(generate(ema_denoiser, cfg.num_samples, cfg.sample_steps))
            curve.steps.append(state.step)
            curve.quality.append(q)
            curve.eval_seconds += time.perf_counter() - t1
            if partial_path is not None and state.step < cfg.steps:
                buf = io.BytesIO()
                torch.save(
                    {
                        "net": denoiser.net.state_dict(),
                        "ema": ema.state_dict(),
                        "opt": opt.state_dict(),
                        "gen": gen.get_state(),
                        "state": state.as_dict(),
                        "curve": asdict(curve),
                    },
                    buf,
                )
                _atomic_write(partial_path, buf.getvalue())
            log(f"  {curve.label} seed {seed} step {state.step}: FD {q:.3f}")
    if not curve.final:
        t1 = time.perf_counter()
        curve.final = final_quality(ema_denoiser, cfg, data, curve.quality[-1])
        curve.eval_seconds += time.perf_counter() - t1
    if not curve.sweep:
        t1 = time.perf_counter()
        for n in cfg.sweep:
            q = (
                curve.quality[-1]
                if n == cfg.sample_steps
                else data.metric(generate(ema_denoiser, cfg.num_samples, n))
            )
            curve.sweep.append([n, nfe("heun", n), q])
        curve.eval_seconds += time.perf_counter() - t1
    if cache is not None:
        model_path, curve_path, _ = _paths(cache, key)
        buf = io.BytesIO()
        torch.save({"net": ema.model.state_dict(), "unet": cfg.unet(), "seed": seed}, buf)
        _atomic_write(model_path, buf.getvalue())
        _atomic_write(curve_path, json.dumps(asdict(curve)).encode())
        if partial_path is not None:
            partial_path.unlink(missing_ok=True)
    return ema_denoiser, curve


def final_quality(model: Denoiser, cfg: RunConfig, data: Digits, first: float | None = None) -> list[float]:
    """FD of `model` from each sampling seed of `FINAL_NOISE_SEEDS` (`first`: the known value of the
    first, the curve's own fixed noise)."""
    return [
        first
        if i == 0 and first is not None
        else data.metric(generate(model, cfg.num_samples, cfg.sample_steps, seed=s))
        for i, s in enumerate(FINAL_NOISE_SEEDS)
    ]


def trained_curve(
    process: ProcessName, fdm: bool, cfg: RunConfig, seed: int, data: Digits, cache: Path | None = CACHE
) -> Curve:
    """The cached quality curve of this run (when its model is complete too), else a fresh run's."""
    if cache is not None:
        model_path, curve_path, _ = _paths(cache, cfg.training_key(process, fdm, seed, data.classifier_steps))
        if model_path.exists() and curve_path.exists():
            print(f"  {curve_path.name}: reusing the cached curve")
            return Curve(**json.loads(curve_path.read_text()))
    return train(process, fdm, cfg, seed, data, cache=cache)[1]


def cached_model(
    process: ProcessName, fdm: bool, cfg: RunConfig, seed: int, data: Digits, cache: Path | None = CACHE
) -> Denoiser | None:
    """The cached final EMA model of this training config, or None."""
    if cache is None:
        return None
    model_path = _paths(cache, cfg.training_key(process, fdm, seed, data.classifier_steps))[0]
    if not model_path.exists():
        return None
    print(f"  {model_path.name}: reusing the cached model")
    denoiser = make_denoiser(process, fdm, cfg, seed)
    denoiser.net.load_state_dict(torch.load(model_path, weights_only=False)["net"])
    return denoiser.eval()


def trained(
    process: ProcessName, fdm: bool, cfg: RunConfig, seed: int, data: Digits, cache: Path | None = CACHE
) -> Denoiser:
    """The cached final EMA model of this training config if there is one, else a fresh run's."""
    model = cached_model(process, fdm, cfg, seed, data, cache)
    return model if model is not None else train(process, fdm, cfg, seed, data, cache=cache)[0]


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
    """One training run of a study: (process, fdm, seed) under the named setting's RunConfig."""

    process: ProcessName
    fdm: bool
    seed: int
    setting: str
    run: RunConfig

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
        return cell.run.identity(cell.process, cell.fdm, cell.seed, self.classifier_steps)

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
        }
        self.doc["cells"] = [r for r in self.doc["cells"] if r.get("config") != record["config"]] + [record]

    def save(self) -> None:
        if self.path is not None:
            _atomic_write(self.path, (json.dumps(self.doc, indent=1) + "\n").encode())


def unique_cells(cells: Sequence[Cell], results: Results) -> dict[str, Cell]:
    """The distinct cells in order of first occurrence (an ablation's baseline is often main's)."""
    unique: dict[str, Cell] = {}
    for cell in cells:
        unique.setdefault(json.dumps(results.identity(cell), sort_keys=True), cell)
    return unique


def run_cell(cell: Cell, data: Digits, cache: Path | None) -> Curve:
    """One cell's curve, from the model cache when it finished there before (a pool job)."""
    return trained_curve(cell.process, cell.fdm, cell.run, cell.seed, data, cache)


def run_cells(
    cells: Sequence[Cell],
    results: Results,
    data: Digits,
    workers: int,
    cache: Path | None,
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
            finish(cell, run_cell(cell, data, cache))
        return
    spawn = multiprocessing.get_context("spawn")  # fork after OpenMP has started can hang the children
    with ProcessPoolExecutor(min(workers, len(todo)), spawn, torch.set_num_threads, (1,)) as pool:
        queue: Iterator[Cell] = iter(todo)
        running = {}
        for cell in queue:  # submit only `workers` at a time so cells start in order
            running[pool.submit(run_cell, cell, data, cache)] = cell
            if len(running) >= workers:
                break
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                finish(running.pop(fut), fut.result())
                nxt = next(queue, None)
                if nxt is not None:
                    running[pool.submit(run_cell, nxt, data, cache)] = nxt


class PairMode(Protocol):
    """What the quick and tiny modes of both FDM benchmarks say about their runs."""

    seeds: dict[ProcessName, tuple[int, ...]]
    classifier_steps: int
    workers: int


def digits_data(classifier_steps: int) -> Digits:
    """The digits data and its metric, built with one torch thread (more than free cores thrashes)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        return load_digits(Path(tmp), classifier_steps)


def run_pairs(fn: Callable[..., object], mode: PairMode) -> tuple[Digits, list]:
    """Load the digits data and its metric once, then `fn(process, fdm, mode, seed, data)` for the baseline
    then the FDM run of every process and seed, over `mode.workers` processes; (data, results in order)."""
    data = digits_data(mode.classifier_steps)
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
