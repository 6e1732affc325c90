"""Stage: one progressive-distillation round, a 2N-step teacher -> an N-step student (Salimans & Ho).

The student starts from the teacher's (EMA) weights with a fresh Adam, its learning rate annealed linearly to
0 within the round, gradients clipped (the reference settings, docs/design.md: Progressive distillation);
optionally the teacher's two steps use Heun and the round outputs an EMA of the student's weights. The round
is resumable: it checkpoints under ``checkpoints/distill_round/<key>`` and continues from the newest one until
its output is complete. Its output is a model artifact whose ``model.json`` carries the student's grid
(``sigmas``, ``steps``, ``sampler: euler``): a distilled model is only valid on the grid it was distilled for.
"""

from __future__ import annotations

import torch

from fdm_core.distill import distill_loss, make_student, student_grid
from fdm_core.networks import count_parameters
from fdm_core.samplers import process_grid
from fdm_core.training import EMA
from infra.manifest import read_manifest
from infra.store import open_store
from tasks.checkpoints import load_model, model_spec, save_model
from tasks.dataset import ParquetBatches, dataset_meta
from tasks.stage import StageContext, StageResult
from tasks.stages.distill_round import DistillRoundConfig
from tasks.training_loop import LoopSettings, fit


def distill_round(cfg: DistillRoundConfig, ctx: StageContext, teacher: str, dataset: str) -> StageResult:
    """Distil the model at `teacher` (sampled on its `cfg.teacher_steps`-step grid) into a student of half
    the steps, which samples with one DDIM step per pair of teacher steps."""
    torch.set_num_threads(max(1, ctx.num_threads))
    teacher_store = open_store(teacher, ctx.s3)
    teacher_model, teacher_spec = load_model(teacher_store, "", ctx.device)
    sigmas = _teacher_grid(teacher_spec, teacher_model, cfg.teacher_steps, teacher)
    grid = student_grid(sigmas)
    steps = len(grid) - 1
    updates = cfg.updates_for(steps)
    shape = dataset_meta(dataset, ctx.s3).shape
    if list(teacher_spec.get("data_shape", shape)) != list(shape):
        raise ValueError(
            f"dataset: {dataset} holds samples of shape {list(shape)}, "
            f"the teacher {teacher} was trained on {teacher_spec['data_shape']}"
        )
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    # A distilled teacher is valid only with DDIM on its own grid; the base model can take Heun steps.
    solver = cfg.teacher_solver if teacher_spec.get("sigmas") is None else "euler"

    student = make_student(teacher_model, cfg.parameterisation)
    ema = EMA(student, cfg.ema_decay) if cfg.ema_decay is not None else None
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, 1 - k / updates))
    seed = cfg.seed + 7919 * cfg.round_index

    def batches(step: int):
        loader = ParquetBatches(dataset, cfg.batch_size, seed=seed + step, epochs=None, s3=ctx.s3)
        return (x0.to(ctx.device) for x0, _ in loader)

    def loss_fn(x0: torch.Tensor, state, gen: torch.Generator) -> torch.Tensor:
        return distill_loss(
            student,
            teacher_model,
            x0,
            sigmas,
            cfg.weighting,
            cfg.parameterisation,
            gen,
            cfg.allow_unstable,
            solver,
        )

    loop = LoopSettings("distill", updates, cfg.log_every, cfg.checkpoint_every, cfg.grad_clip, seed=seed)
    run = fit(student, opt, loss_fn, batches, ctx, loop, scheduler=sched, ema=ema)
    out = ema.model if ema is not None else student
    spec = model_spec(
        out,
        parameters=count_parameters(student),
        data_shape=list(shape),
        sigmas=grid.tolist(),
        steps=steps,
        sampler="euler",
        parameterisation=cfg.parameterisation,
        distilled_from=read_manifest(teacher_store, "").digest,
        teacher_steps=cfg.teacher_steps,
        teacher_solver=solver,
        round_index=cfg.round_index,
    )
    save_model(ctx.out_dir, out, spec)
    return StageResult(
        stage="distill_round",
        key=ctx.key,
        metrics={
            "distill/loss": run.loss,
            "updates": float(run.state.step),
            "resumed_from": float(run.resumed_from),
            "distill_seconds": run.seconds,
            "images_seen": float(run.state.step * cfg.batch_size),
        },
        info={
            "sigmas": grid.tolist(),
            "steps": steps,
            "round_index": cfg.round_index,
            "teacher_solver": solver,
        },
    )


def _teacher_grid(spec: dict, model: torch.nn.Module, steps: int, teacher: str) -> torch.Tensor:
    """The teacher's sampling grid: its own if it is a distilled student (valid only there), else the
    process's default grid of `steps` steps."""
    own = spec.get("sigmas")
    if own is None:
        return process_grid(model.process, steps).to(torch.float64)
    if len(own) - 1 != steps:
        raise ValueError(
            f"teacher_steps: {teacher} was distilled for a {len(own) - 1}-step grid {own}, "
            f"not the {steps}-step grid asked for"
        )
    return torch.tensor(own, dtype=torch.float64)
