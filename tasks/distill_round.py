"""Stage: one progressive-distillation round, a 2N-step teacher -> an N-step student (Salimans & Ho).

The student starts from the teacher's (EMA) weights with a fresh Adam, its learning rate annealed linearly
to 0 within the round, gradients clipped, no EMA (the reference settings, DESIGN.md §4). The round is
resumable: it checkpoints under ``checkpoints/distill_round/<key>`` and continues from the newest one.
Its output is a model artifact whose ``model.json`` carries the student's grid (``sigmas``, ``steps``,
``sampler: euler``): a distilled model is only valid on the grid it was distilled for.
"""

from __future__ import annotations

import math
import posixpath
import time

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fdm_core.distill import check_one_step, check_stable, distill_loss, make_student, student_grid
from fdm_core.networks import count_parameters
from fdm_core.targets import Parameterisation, Weighting
from fdm_core.training import train_step
from infra.manifest import clear_output
from infra.store import open_store
from tasks.checkpoints import (
    load_model,
    model_spec,
    resume_training,
    save_model,
    save_training_checkpoint,
)
from tasks.dataset import ParquetBatches, dataset_meta
from tasks.stage import StageContext, StageResult

STAGE = "distill_round"


class DistillConfig(BaseModel):
    """One halving round: optimisation, loss weighting and the student's parameterisation."""

    model_config = ConfigDict(extra="forbid")
    updates: int = Field(2000, ge=1, description="optimizer updates of a round (paper: 50k)")
    final_updates: int | None = Field(
        None, ge=1, description="updates of the rounds to 2 and 1 steps; default 2 x updates (paper: 100k)"
    )
    batch_size: int = Field(128, ge=1)
    lr: float = Field(5e-4, gt=0, description="initial learning rate, annealed linearly to 0 in the round")
    grad_clip: float | None = Field(1.0, gt=0)
    weighting: Weighting = "truncated_snr"
    parameterisation: Parameterisation = Field(
        "x",
        description="x keeps the teacher's preconditioned head: x0-like for EDM, but eps-like (c_skip = 1, "
        "c_out = +-sigma) for VP and VE, whose teachers distil better with v",
    )
    allow_unstable: bool = Field(False, description="permit eps + truncated_snr, which diverges")
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _stable(self) -> DistillConfig:
        check_stable(self.parameterisation, self.weighting, self.allow_unstable)
        return self

    def updates_for(self, student_steps: int) -> int:
        """Updates of the round producing a `student_steps`-step student (2x for 2 and 1, as the paper)."""
        if student_steps <= 2:
            return self.final_updates or 2 * self.updates
        return self.updates


def passes_quality_gate(student_metric: float, teacher_metric: float, max_ratio: float) -> bool:
    """Whether a student may be halved again: its lower-is-better metric (e.g. FID) is at most
    `max_ratio` x its teacher's. A non-finite student metric fails; the pipeline stops halving on False."""
    if max_ratio <= 0:
        raise ValueError(f"max_ratio: must be > 0 (got {max_ratio})")
    if not math.isfinite(student_metric):
        return False
    return student_metric <= max_ratio * teacher_metric


def distill_round(
    cfg: DistillConfig,
    teacher_uri: str,
    teacher_sigmas: list[float],
    dataset_uri: str,
    round_index: int,
    ctx: StageContext,
) -> StageResult:
    """Distil the model at `teacher_uri` (sampled on `teacher_sigmas`, 2N steps) into an N-step student."""
    torch.set_num_threads(max(1, ctx.num_threads))
    grid = student_grid(torch.tensor(teacher_sigmas, dtype=torch.float64))
    steps = len(grid) - 1
    updates = cfg.updates_for(steps)
    store = open_store(ctx.store_uri, ctx.endpoint_url)
    teacher, teacher_spec = load_model(open_store(teacher_uri, ctx.endpoint_url), "", ctx.device)
    _check_teacher(teacher_spec, teacher_sigmas, teacher_uri)
    shape = dataset_meta(dataset_uri, ctx.endpoint_url).shape
    if list(teacher_spec.get("data_shape", shape)) != list(shape):
        raise ValueError(
            f"dataset_uri: {dataset_uri} holds samples of shape {list(shape)}, "
            f"the teacher {teacher_uri} was trained on {teacher_spec['data_shape']}"
        )
    if steps == 1:
        check_one_step(teacher.process, float(grid[0]))
    for p in teacher.parameters():
        p.requires_grad_(False)

    student = make_student(teacher, cfg.parameterisation)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, 1 - k / updates))
    ckpt_root = posixpath.join("checkpoints", STAGE, ctx.key)
    state = resume_training(store, ckpt_root, student, None, opt, sched)
    resumed_from = state.step

    seed = cfg.seed + 7919 * round_index
    batches = iter(
        ParquetBatches(
            dataset_uri, cfg.batch_size, seed=seed + state.step, epochs=None, endpoint_url=ctx.endpoint_url
        )
    )
    gen = torch.Generator().manual_seed(seed * 1_000_003 + state.step)
    sigmas = torch.tensor(teacher_sigmas, dtype=torch.float64)

    def loss_fn(x0: torch.Tensor) -> torch.Tensor:
        return distill_loss(
            student, teacher, x0, sigmas, cfg.weighting, cfg.parameterisation, gen, cfg.allow_unstable
        )

    t0, loss_sum, n_loss, last_loss = time.perf_counter(), 0.0, 0, float("nan")
    while state.step < updates:
        x0 = next(batches)[0].to(ctx.device)
        lr = opt.param_groups[0]["lr"]
        loss = train_step(student, opt, lambda x0=x0: loss_fn(x0), state, None, cfg.grad_clip, sched)
        loss_sum, n_loss = loss_sum + loss, n_loss + 1
        if state.step % cfg.log_every == 0 or state.step == updates:
            last_loss = loss_sum / n_loss
            ctx.log_metrics({"loss": last_loss, "lr": lr}, state.step)
            loss_sum, n_loss = 0.0, 0
        if state.step % cfg.checkpoint_every == 0 and state.step < updates:
            save_training_checkpoint(store, ckpt_root, student, None, opt, state)
    seconds = time.perf_counter() - t0

    spec = model_spec(
        student,
        parameters=count_parameters(student),
        data_shape=list(shape),
        sigmas=grid.tolist(),
        steps=steps,
        sampler="euler",
        parameterisation=cfg.parameterisation,
        distilled_from=teacher_uri,
        round_index=round_index,
    )
    producer = {"stage": STAGE, "key": ctx.key, "updates": state.step, "config": cfg.model_dump()}
    clear_output(store, ctx.out_prefix)
    save_model(store, ctx.out_prefix, student, spec, producer)
    return StageResult(
        stage=STAGE,
        key=ctx.key,
        outputs={"model": store.uri(ctx.out_prefix)},
        metrics={
            "loss": last_loss,
            "updates": float(state.step),
            "resumed_from": float(resumed_from),
            "distill_seconds": seconds,
            "images_seen": float(state.step * cfg.batch_size),
        },
        info={"sigmas": grid.tolist(), "steps": steps, "round_index": round_index},
    )


def _check_teacher(spec: dict, teacher_sigmas: list[float], teacher_uri: str) -> None:
    """A distilled teacher is only valid on its own grid: refuse distilling it on another one."""
    own = spec.get("sigmas")
    if own is None:
        return
    if len(own) != len(teacher_sigmas) or any(
        not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(own, teacher_sigmas)
    ):
        raise ValueError(
            f"teacher_sigmas: {teacher_uri} was distilled for a {len(own) - 1}-step grid {own}, "
            f"not the {len(teacher_sigmas) - 1}-step grid given"
        )
