"""One cell of the FDM study as a stage: the product's base-model training with a learning curve.

A cell trains exactly as `fdm run`'s train_base stage does (`tasks.train_base.train_denoiser`: the product's
TrainConfig, data stream, EMA, lr ramp, `tasks.training_loop.fit` and its checkpoints), and a callback of
`fit` scores the EMA model every `eval_every` steps by the Fréchet distance of Heun samples from fixed
noise in the features of the digits classifier. The curve so far is kept beside the checkpoints, so an
interrupted cell resumes from its last checkpoint with its earlier points; the finished cell is a model
artifact whose manifest holds the curve. This module holds only what a cell computes (its source enters
the cell's key).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from benchmarks.common import DIGITS_MODEL
from fdm_core.metrics import frechet_distance
from fdm_core.options import ProcessName
from fdm_core.precond import Denoiser
from fdm_core.samplers import Method, nfe, process_grid, sample
from infra.store import open_store
from tasks.dataset import load_split
from tasks.registry import STAGES
from tasks.stage import STRICT, StageContext, StageResult
from tasks.stages.train_base import ModelConfig, TrainConfig
from tasks.train_base import train_denoiser
from tasks.train_classifier import Classifier, load_classifier
from tasks.training_loop import StepDone

# The final model is scored from these sampling seeds (the first is the curve's own), so the quality it
# ends at is known to ~1/sqrt(5) of one evaluation's sampling noise.
FINAL_NOISE_SEEDS = (1234, 1235, 1236, 1237, 1238)
CURVE = "curve.json"  # the curve so far, beside the cell's training checkpoints


class CellConfig(BaseModel):
    """A cell (or, with the process, fdm and seed left at their defaults, a study setting): the product's
    model and training configs, and how the learning curve is scored. `sweep`: Heun step counts at which
    the final model is also scored (fdm_sampling renders them)."""

    model_config = STRICT
    model: ModelConfig
    train: TrainConfig
    eval_every: int = Field(ge=1)
    num_samples: int = Field(ge=2)
    sample_steps: int = Field(18, ge=1)
    sweep: list[int] = Field(default_factory=list)

    def changed(self, **changes: Any) -> CellConfig:
        """A copy with some fields changed: the cell's own, `model_channels`, or the training config's."""
        own = {k: changes.pop(k) for k in list(changes) if k in type(self).model_fields}
        model = self.model.model_dump()
        if "model_channels" in changes:
            model["model_channels"] = changes.pop("model_channels")
        train = {**self.train.model_dump(), **changes}
        return CellConfig.model_validate({**self.model_dump(), "model": model, "train": train, **own})

    def for_cell(self, process: ProcessName, fdm: bool, seed: int) -> CellConfig:
        """The cell's config: this setting's, for one process, FDM flag and seed, checkpointed at every
        evaluation."""
        return self.changed(process=process, fdm=fdm, seed=seed, checkpoint_every=self.eval_every)


def study_setting(
    steps: int, eval_every: int, num_samples: int, sample_steps: int = 18, sweep: tuple[int, ...] = ()
) -> CellConfig:
    """A setting of the study: the digits U-Net and the product's TrainConfig defaults (the study's own)."""
    return CellConfig(
        model=DIGITS_MODEL,
        train=TrainConfig(steps=steps),
        eval_every=eval_every,
        num_samples=num_samples,
        sample_steps=sample_steps,
        sweep=list(sweep),
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


def generate(denoiser: Denoiser, n: int, steps: int, method: Method = "heun", seed: int = 1234) -> Tensor:
    """`n` samples on the process's default grid of `steps` steps; one seed gives one start noise."""
    sigmas = process_grid(denoiser.process, steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) * float(sigmas[0])
    return sample(denoiser.eval(), x.float(), sigmas, method)


@dataclass
class Curve:
    """Quality (Fréchet distance) of the EMA model at the evaluated training steps, with the mean training
    loss since the previous evaluation; of the final model at the Heun step counts of the sweep ([steps,
    NFE, FD] rows), and from each of `FINAL_NOISE_SEEDS` (`final`: one model's FD varies by ~0.3-0.5 at
    FD ~2 between sample sets)."""

    process: ProcessName
    fdm: bool
    seed: int
    steps: list[int] = field(default_factory=list)
    quality: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    sweep: list[list[float]] = field(default_factory=list)
    final: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.process.upper()}{'-FDM' if self.fdm else ''}"


def print_now(message: str) -> None:
    print(message, flush=True)  # pool workers write to a file: unflushed lines would arrive late


class CurveRecorder:
    """`fit`'s callback: times the steps, scores the EMA model at every evaluation step, logs it and saves
    the curve so far; a point of a step redone after a resume replaces the earlier one."""

    def __init__(self, cfg: CellConfig, ctx: StageContext, metric: FeatureFrechet) -> None:
        self.cfg, self.ctx, self.metric = cfg, ctx, metric
        self.store = open_store(ctx.store_uri, ctx.s3)
        self.path = posixpath.join(ctx.checkpoints, CURVE)
        t = cfg.train
        self.curve = Curve(t.process, t.fdm, t.seed)
        if self.store.exists(self.path):
            self.curve = Curve(**json.loads(self.store.read_bytes(self.path)))
        self.model: Denoiser | None = None
        self.losses: list[float] = []
        self.clock, self.first = time.perf_counter(), True

    def __call__(self, done: StepDone) -> None:
        step, curve = done.state.step, self.curve
        if self.first and step > 1:
            print_now(f"  {curve.label} seed {curve.seed}: resuming at step {step - 1}")
        self.first = False
        self.losses.append(done.loss)
        self.model = done.ema.model if done.ema is not None else done.model
        if step % self.cfg.eval_every and step != self.cfg.train.steps:
            return
        t1 = time.perf_counter()
        curve.train_seconds += t1 - self.clock
        q = self.metric(generate(self.model, self.cfg.num_samples, self.cfg.sample_steps))
        keep = [i for i, s in enumerate(curve.steps) if s < step]  # a redone step replaces its point
        curve.steps = [curve.steps[i] for i in keep] + [step]
        curve.quality = [curve.quality[i] for i in keep] + [q]
        curve.losses = [curve.losses[i] for i in keep] + [sum(self.losses) / len(self.losses)]
        self.losses = []
        self.clock = time.perf_counter()
        curve.eval_seconds += self.clock - t1
        self.store.write_bytes(self.path, json.dumps(asdict(curve)).encode())
        self.ctx.log_metrics({"fd": q}, step)
        print_now(f"  {curve.label} seed {curve.seed} step {step}: FD {q:.3f}")


def train_cell(cfg: CellConfig, ctx: StageContext, dataset: str, classifier: str) -> StageResult:
    """Train the cell's model with the product's code, scoring its curve; then score the final model from
    every sampling seed and at every step count of the sweep. The model artifact is the cell's output."""
    torch.set_num_threads(max(1, ctx.num_threads))
    metric = FeatureFrechet(load_classifier(classifier), load_split(dataset, "train")[0])
    recorder = CurveRecorder(cfg, ctx, metric)
    metrics = train_denoiser(
        cfg.model, cfg.train, dataset, ctx, torch.device(ctx.device), ctx.out_dir, callback=recorder
    )
    curve, model = recorder.curve, recorder.model
    assert model is not None  # fit takes at least one step: it never checkpoints the last one
    t1 = time.perf_counter()
    curve.final = [curve.quality[-1]] + [
        metric(generate(model, cfg.num_samples, cfg.sample_steps, seed=s)) for s in FINAL_NOISE_SEEDS[1:]
    ]
    curve.sweep = [
        [
            n,
            nfe("heun", n),
            curve.quality[-1] if n == cfg.sample_steps else metric(generate(model, cfg.num_samples, n)),
        ]
        for n in cfg.sweep
    ]
    curve.eval_seconds += time.perf_counter() - t1
    return StageResult(
        stage=CELL.name,
        key=ctx.key,
        metrics={**metrics, "fd": curve.quality[-1]},
        info={"curve": asdict(curve)},
    )


# The train_base stage's declaration with the cell's config, function and inputs.
CELL = dataclasses.replace(
    STAGES["train_base"],
    name="fdm_study_cell",
    config=CellConfig,
    run="benchmarks.fdm_cell:train_cell",
    inputs={"dataset": "dataset", "classifier": "classifier"},
    headline="fd",
)
