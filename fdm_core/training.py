"""Training: the denoising loss of a process (with FDM's warm-up), EMA of weights, and one optimizer step
that both the base-training and the distillation stages use."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fdm_core.precond import Denoiser
from fdm_core.tensors import append_dims


@dataclass
class TrainState:
    """Counters that must survive a resume: optimizer steps taken and the FDM warm-up counter."""

    step: int = 0
    warmup_step: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"step": self.step, "warmup_step": self.warmup_step}


def denoising_loss(
    denoiser: Denoiser, x0: Tensor, warmup_step: int = 0, generator: torch.Generator | None = None
) -> Tensor:
    """lambda(sigma) |D(x0 + sigma n, sigma) - x0|^2, averaged; lambda capped by FDM's warm-up when on."""
    process = denoiser.process
    sigma = process.sample_sigma(x0.shape[0], generator=generator).to(x0.device)
    n = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    weight = process.training_weight(sigma, warmup_step)
    err = (denoiser(x0 + append_dims(sigma, x0) * n, sigma) - x0) ** 2
    return (append_dims(weight, x0) * err).mean()


class EMA:
    """Exponential moving average of a module's weights (float32 shadow copy).

    With `rampup` (EDM's ema_rampup_ratio) the average's mean weight age 1/(1 - decay) is capped at
    `rampup` x the optimizer steps taken, so early weights fade as the run grows instead of after a fixed
    number of steps; None keeps `decay` constant."""

    def __init__(self, model: nn.Module, decay: float = 0.999, rampup: float | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1) (got {decay})")
        if rampup is not None and rampup <= 0:
            raise ValueError(f"ema_rampup: must be > 0 (got {rampup})")
        self.decay = decay
        self.rampup = rampup
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay applied on optimizer step `step` (1-based)."""
        if self.rampup is None:
            return self.decay
        return min(self.decay, max(0.0, 1 - 1 / (self.rampup * step)))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Average in `model`'s weights after optimizer step `step` (None: the constant decay)."""
        decay = self.decay if step is None else self.decay_at(step)
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[], Tensor],
    state: TrainState,
    ema: EMA | None = None,
    grad_clip: float | None = 1.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One optimizer step on `loss_fn()`: refuses a non-finite loss (naming the step), clips, updates EMA."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at step {state.step}")
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if ema is not None:
        ema.update(model, state.step + 1)
    state.step += 1
    state.warmup_step += 1
    return float(loss.detach())
