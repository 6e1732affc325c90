"""What the FDM benchmarks share: the digits data, a classifier-feature Fréchet distance, and a training
loop that evaluates its EMA model at regular step intervals, so baseline and FDM runs are compared alike.

A baseline/FDM pair uses the same U-Net, initial weights, optimiser, batches and training noise (one seed);
only the process's `fdm` flag differs (c_in = gamma(sigma) and the loss-weight warm-up, DESIGN.md §3).
Independent runs go to a pool of single-threaded processes (one per core), and every trained EMA model is
kept in a model cache keyed by what determines its training, so fdm_sampling reuses fdm_training's models.
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
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
from matplotlib.figure import Figure
from torch import Tensor

from benchmarks.common import DIGITS_UNET
from fdm_core.metrics import frechet_distance
from fdm_core.networks import UNet
from fdm_core.precond import Denoiser
from fdm_core.processes import ProcessName, make_process
from fdm_core.samplers import Method, process_grid, sample
from fdm_core.training import EMA, TrainState, denoising_loss, train_step
from infra.manifest import is_complete
from infra.store import open_store
from pipelines.plan import code_version
from tasks.checkpoints import load_model, model_spec, write_model
from tasks.dataset import load_split
from tasks.registry import STAGES
from tasks.stage import StageContext, run_stage
from tasks.stages.prepare_data import DataConfig
from tasks.stages.train_classifier import ClassifierConfig
from tasks.train_classifier import Classifier, load_classifier

# Trained models, keyed by training config (FDM_BENCH_CACHE overrides; delete it to retrain from scratch).
CACHE = Path(os.environ.get("FDM_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))


@dataclass(frozen=True)
class RunConfig:
    """One training run: Adam on `batch_size` batches for `steps`, EMA model evaluated every `eval_every`.

    The FDM warm-up W is `warmup_fraction` of the run for EDM and twice that for VP/VE (the paper's
    200 vs 400 iterations ratio), because the paper's W = 200 is fixed for ~400k-iteration runs."""

    steps: int
    eval_every: int
    num_samples: int
    sample_steps: int = 18
    batch_size: int = 128
    lr: float = 2e-3
    ema_decay: float = 0.995
    warmup_fraction: float = 0.05

    def warmup(self, process: ProcessName) -> int:
        scale = 1 if process == "edm" else 2
        return max(1, round(scale * self.warmup_fraction * self.steps))

    def training_key(self, process: ProcessName, fdm: bool, seed: int) -> str:
        """A digest of everything that fixes a trained model (not the evaluation settings), code included."""
        fields = asdict(self)
        for k in ("eval_every", "num_samples", "sample_steps"):
            fields.pop(k)
        ident = {
            "process": process,
            "fdm": fdm,
            "seed": seed,
            "unet": DIGITS_UNET,
            "code": code_version("benchmarks.fdm_common"),
            **fields,
        }
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
        return f"{process}{'-fdm' if fdm else ''}-s{seed}-{digest}"

    def curve_key(self, process: ProcessName, fdm: bool, seed: int, classifier_steps: int) -> str:
        """The cache name of a run's quality curve: its training key plus the evaluation settings."""
        evals = f"e{self.eval_every}-n{self.num_samples}-h{self.sample_steps}-c{classifier_steps}"
        return f"curves/{self.training_key(process, fdm, seed)}-{evals}.json"

    def describe(self) -> str:
        return (
            f"U-Net {DIGITS_UNET}, Adam lr {self.lr}, batch {self.batch_size}, {self.steps} steps, EMA decay "
            f"{self.ema_decay}, grad clip 1.0; FDM m = 2 (VE 1), W = {self.warmup('edm')} (EDM) / "
            f"{self.warmup('vp')} (VP, VE) steps; evaluation: {self.num_samples} samples, Heun "
            f"{self.sample_steps} steps on the process's default grid"
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
    """The digits training split and the metric built on it."""

    x_train: Tensor
    metric: FeatureFrechet
    classifier_accuracy: float
    classifier_steps: int


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
    metric = FeatureFrechet(load_classifier(clf.outputs["classifier"]), x_train)
    return Digits(x_train, metric, clf.metrics["val_accuracy"], classifier_steps)


def make_denoiser(process: ProcessName, fdm: bool, cfg: RunConfig, seed: int) -> Denoiser:
    """A fresh U-Net (initialised from `seed`, so a baseline/FDM pair starts from the same weights)."""
    torch.manual_seed(seed)
    proc = make_process(process, fdm=fdm, warmup_iters=cfg.warmup(process))
    return Denoiser(UNet(**DIGITS_UNET), proc)


def generate(denoiser: Denoiser, n: int, steps: int, method: Method = "heun", seed: int = 1234) -> Tensor:
    """`n` samples on the process's default grid of `steps` steps; one seed gives one start noise."""
    sigmas = process_grid(denoiser.process, steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) * float(sigmas[0])
    return sample(denoiser.eval(), x.float(), sigmas, method)


@dataclass
class Curve:
    """Quality (Fréchet distance) of the EMA model at the evaluated training steps."""

    process: ProcessName
    fdm: bool
    seed: int
    steps: list[int] = field(default_factory=list)
    quality: list[float] = field(default_factory=list)
    train_seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.process.upper()}{'-FDM' if self.fdm else ''}"


def train(
    process: ProcessName,
    fdm: bool,
    cfg: RunConfig,
    seed: int,
    data: Digits,
    log: Callable[[str], None] = print,
    cache: Path | None = CACHE,
) -> tuple[Denoiser, Curve]:
    """Train one model; every `eval_every` steps (and at the end) score its EMA with Heun samples.

    Batches and training noise come from a generator seeded by `seed`, so the pair sees the same draws.
    The final EMA model goes to `cache` (None: not kept)."""
    denoiser = make_denoiser(process, fdm, cfg, seed)
    ema = EMA(denoiser.net, cfg.ema_decay)
    ema_denoiser = Denoiser(ema.model, denoiser.process)
    opt = torch.optim.Adam(denoiser.net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    state, curve = TrainState(), Curve(process, fdm, seed)
    x_train = data.x_train
    while state.step < cfg.steps:
        t0 = time.perf_counter()
        idx = torch.randint(len(x_train), (cfg.batch_size,), generator=gen)
        loss_fn = partial(denoising_loss, denoiser, x_train[idx], state.warmup_step, gen)
        train_step(denoiser.net, opt, loss_fn, state, ema)
        curve.train_seconds += time.perf_counter() - t0
        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            q = data.metric(generate(ema_denoiser, cfg.num_samples, cfg.sample_steps))
            curve.steps.append(state.step)
            curve.quality.append(q)
            log(f"  {curve.label} seed {seed} step {state.step}: FD {q:.3f}")
    if cache is not None:
        store = open_store(str(cache))
        write_model(
            store, cfg.training_key(process, fdm, seed), ema_denoiser, model_spec(denoiser), {"seed": seed}
        )
        store.write_bytes(
            cfg.curve_key(process, fdm, seed, data.classifier_steps), json.dumps(asdict(curve)).encode()
        )
    return ema_denoiser, curve


def trained_curve(
    process: ProcessName, fdm: bool, cfg: RunConfig, seed: int, data: Digits, cache: Path | None = CACHE
) -> Curve:
    """The cached quality curve of this run (when its model is complete too), else a fresh run's."""
    path = cfg.curve_key(process, fdm, seed, data.classifier_steps)
    store = None if cache is None else open_store(str(cache))
    if store is not None and store.exists(path) and is_complete(store, cfg.training_key(process, fdm, seed)):
        print(f"  {path}: reusing the cached curve")
        return Curve(**json.loads(store.read_bytes(path)))
    return train(process, fdm, cfg, seed, data, cache=cache)[1]


def input_scale(process: ProcessName, fdm: bool, data_std: float, n: int = 100_000) -> tuple[float, float]:
    """Median and 90th percentile, over the training sigma law, of the network input's standard deviation
    c_in(σ)·sqrt(s² + σ²) for data of std s: the baseline keeps it near 1, FDM's c_in = γ(σ) need not."""
    proc = make_process(process, fdm=fdm)
    sigma = proc.sample_sigma(n, torch.Generator().manual_seed(0))
    std = proc.c_in(sigma) * (data_std**2 + sigma**2).sqrt()
    return float(std.median()), float(std.quantile(0.9))


def trained(
    process: ProcessName, fdm: bool, cfg: RunConfig, seed: int, data: Digits, cache: Path | None = CACHE
) -> Denoiser:
    """The cached final EMA model of this training config if there is a complete one, else a fresh run."""
    key = cfg.training_key(process, fdm, seed)
    if cache is not None and is_complete(store := open_store(str(cache)), key):
        print(f"  {key}: reusing the cached model")
        return load_model(store, key)[0]
    return train(process, fdm, cfg, seed, data, cache=cache)[0]


class PairMode(Protocol):
    """What both FDM benchmarks' modes say about their runs."""

    seeds: dict[ProcessName, tuple[int, ...]]
    classifier_steps: int
    workers: int


def run_pairs(fn: Callable[..., object], mode: PairMode) -> tuple[Digits, list]:
    """Load the digits data and its metric once, then `fn(process, fdm, mode, seed, data)` for the baseline
    then the FDM run of every process and seed, over `mode.workers` processes; (data, results in order)."""
    torch.set_num_threads(1)  # more threads than free cores thrashes on the shared 2-core machine
    with tempfile.TemporaryDirectory() as tmp:
        data = load_digits(Path(tmp), mode.classifier_steps)
    jobs = [
        (p, fdm, mode, seed, data) for p, ss in mode.seeds.items() for seed in ss for fdm in (False, True)
    ]
    return data, parallel_map(fn, jobs, mode.workers)


def parallel_map(fn: Callable[..., object], jobs: Sequence[tuple], workers: int) -> list:
    """`fn(*job)` for every job, in order: inline for one worker, else in a pool of `workers` processes.

    Each pool process runs torch on one thread, so the workers do not thrash the cores they share."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    spawn = multiprocessing.get_context("spawn")  # fork after OpenMP has started can hang the children
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


def mean_curve(curves: Sequence[Curve]) -> list[float]:
    """Quality averaged over seeds, step by step (the curves share their evaluation steps)."""
    return [sum(c.quality[i] for c in curves) / len(curves) for i in range(len(curves[0].steps))]


def seed_list(seeds: dict[ProcessName, tuple[int, ...]]) -> str:
    """E.g. "EDM 0, 1; VE 0": the seeds run per process."""
    return "; ".join(f"{p.upper()} {', '.join(map(str, s))}" for p, s in seeds.items())


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
