"""The one training loop of the stages (base model, classifier, distillation rounds).

It owns what they share: resuming from the newest checkpoint under `ctx.checkpoints`, the optimizer step
with its non-finite-loss refusal (`fdm_core.training.train_step`), mean-loss logging at real steps, and
periodic checkpoints. A stage supplies its model, optimizer, batches and loss; a caller that watches the run
(a study's learning curve) passes a `callback`, as k-diffusion's samplers take one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fdm_core.training import EMA, TrainState, train_step
from infra.store import open_store
from tasks.checkpoints import resume_training, save_training_checkpoint
from tasks.stage import StageContext

LossFn = Callable[[Any, TrainState, torch.Generator], Tensor]


@dataclass(frozen=True)
class StepDone:
    """What `fit`'s callback sees after an optimizer step: the counters, that step's loss, the model
    being trained (unwrapped) and its EMA, if any."""

    state: TrainState
    loss: float
    model: nn.Module
    ema: EMA | None


Callback = Callable[[StepDone], None]


@dataclass(frozen=True)
class LoopSettings:
    """How long to train and how often to log and checkpoint; `name` prefixes the logged metrics."""

    name: str
    steps: int
    log_every: int = 50
    checkpoint_every: int | None = None
    grad_clip: float | None = None
    seed: int = 0


@dataclass
class FitResult:
    state: TrainState
    resumed_from: int
    loss: float
    seconds: float


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    batches: Callable[[int], Iterator[Any]],
    ctx: StageContext,
    loop: LoopSettings,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: EMA | None = None,
    saved: nn.Module | None = None,
    rank: int = 0,
    callback: Callback | None = None,
) -> FitResult:
    """Train `model` for `loop.steps` optimizer steps, resuming where a checkpoint left off.

    `batches(step)` starts the data stream of a run that begins at `step`, and the training noise comes
    from a generator seeded by `loop.seed` and that step: a resumed run is reproducible, though after its
    checkpoint it draws other batches and noise than an uninterrupted run (the stages seed both afresh).
    `saved` is the module checkpointed (the unwrapped model under DDP); rank 0 alone logs and checkpoints.
    `callback` (rank 0) runs after every step, before that step's checkpoint, so what it records at a step
    is never older than the checkpoint a resumed run starts from.
    """
    saved = saved if saved is not None else model
    store = open_store(ctx.store_uri, ctx.s3)
    checkpointing = bool(loop.checkpoint_every and ctx.checkpoints)
    state = TrainState()
    if checkpointing:
        state = resume_training(store, ctx.checkpoints, saved, ema, optimizer, scheduler)
    resumed_from = state.step
    stream = batches(state.step)
    gen = torch.Generator().manual_seed(loop.seed * 1_000_003 + state.step)
    t0, loss_sum, n_loss, last_loss = time.perf_counter(), 0.0, 0, float("nan")
    while state.step < loop.steps:
        batch = next(stream)
        lr = optimizer.param_groups[0]["lr"]
        loss = train_step(
            model,
            optimizer,
            lambda batch=batch: loss_fn(batch, state, gen),
            state,
            ema,
            loop.grad_clip,
            scheduler,
        )
        loss_sum, n_loss = loss_sum + loss, n_loss + 1
        if state.step % loop.log_every == 0 or state.step == loop.steps:
            last_loss = loss_sum / n_loss
            if rank == 0:
                ctx.log_metrics({f"{loop.name}/loss": last_loss, f"{loop.name}/lr": lr}, state.step)
            loss_sum, n_loss = 0.0, 0
        if callback is not None and rank == 0:
            callback(StepDone(state, loss, saved, ema))
        due = checkpointing and state.step % loop.checkpoint_every == 0 and state.step < loop.steps
        if due and rank == 0:
            save_training_checkpoint(store, ctx.checkpoints, saved, ema, optimizer, state)
    return FitResult(state, resumed_from, last_loss, time.perf_counter() - t0)
