"""Stage: train the FDM (or baseline) base model on a prepared dataset; resumable from checkpoints."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from fdm_core.networks import count_parameters, model_summary
from fdm_core.precond import Denoiser
from fdm_core.training import EMA, denoising_loss
from tasks.checkpoints import model_spec, save_model
from tasks.dataset import ParquetBatches, dataset_meta
from tasks.stage import StageContext, StageResult
from tasks.stages.train_base import ModelConfig, TrainBaseConfig, TrainConfig
from tasks.training_loop import Callback, LoopSettings, fit


def train_base(cfg: TrainBaseConfig, ctx: StageContext, dataset: str) -> StageResult:
    """Train a denoiser on `dataset`; resume from the newest checkpoint of this stage key if any.

    With `train.workers > 1` the steps run data-parallel on Ray Train workers (each `ctx.num_threads` CPUs
    and a GPU when `ctx.device` is cuda); rank 0 logs, checkpoints and stages the model artifact."""
    if cfg.train.workers > 1:
        from infra.ray_train import run_data_parallel

        config = {"cfg": cfg, "dataset": dataset, "ctx": ctx}
        cuda = ctx.device.startswith("cuda")
        metrics = run_data_parallel(
            _train_worker, config, cfg.train.workers, max(1, ctx.num_threads), cuda, files_into=ctx.out_dir
        )
    else:
        torch.set_num_threads(max(1, ctx.num_threads))
        metrics = train_denoiser(cfg.model, cfg.train, dataset, ctx, torch.device(ctx.device), ctx.out_dir)
    net = cfg.model.build(dataset_meta(dataset, ctx.s3).shape)
    return StageResult(
        stage="train_base",
        key=ctx.key,
        metrics=metrics,
        info={"summary": model_summary(net), "parameters": count_parameters(net)},
    )


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its DDP rank of the training loop; rank 0 reports the model files it wrote."""
    from infra.ray_train import report_outputs, worker_rank

    rank, world, device = worker_rank()
    cfg, ctx = config["cfg"], config["ctx"]
    torch.set_num_threads(max(1, ctx.num_threads))
    with tempfile.TemporaryDirectory(prefix="fdm-rank-") as files:
        report_outputs(
            train_denoiser(cfg.model, cfg.train, config["dataset"], ctx, device, Path(files), rank, world),
            files,
        )


def train_denoiser(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    dataset: str,
    ctx: StageContext,
    device: torch.device,
    out_dir: Path,
    rank: int = 0,
    world: int = 1,
    callback: Callback | None = None,
) -> dict[str, float]:
    """The training run, or one DDP rank of it: every rank draws its own batches of batch_size/world and
    noise; gradients are averaged, so all ranks hold the same weights and rank 0 alone writes them to
    `out_dir`. `callback` watches rank 0's steps (the FDM study scores its learning curve there)."""
    meta = dataset_meta(dataset, ctx.s3)
    torch.manual_seed(cfg.seed)
    process = cfg.build_process()
    model = Denoiser(model_cfg.build(meta.shape), process).to(device)
    ema = EMA(model, cfg.ema_decay, cfg.ema_rampup)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(1, cfg.lr_rampup)))
    trained: torch.nn.Module = model
    if world > 1:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        trained.process = process  # denoising_loss reads the process off the denoiser it is given

    def batches(step: int):
        seed = cfg.seed + step + 7919 * rank
        per_rank = -(-cfg.batch_size // world)
        loader = ParquetBatches(dataset, per_rank, seed=seed, epochs=None, s3=ctx.s3)
        return (x0.to(device) for x0, _ in loader)

    loop = LoopSettings(
        "train", cfg.steps, cfg.log_every, cfg.checkpoint_every, cfg.grad_clip, seed=cfg.seed + 999_983 * rank
    )
    run = fit(
        trained,
        opt,
        lambda x0, state, gen: denoising_loss(trained, x0, state.warmup_step, gen),
        batches,
        ctx,
        loop,
        scheduler=sched,
        ema=ema,
        saved=model,
        rank=rank,
        callback=callback,
    )
    if rank == 0:
        spec = model_spec(ema.model, parameters=count_parameters(model), data_shape=list(meta.shape))
        save_model(out_dir, ema.model, spec)
    return {
        "train/loss": run.loss,
        "train_seconds": run.seconds,
        "steps": float(run.state.step),
        "resumed_from": float(run.resumed_from),
        "images_seen": float(run.state.step * cfg.batch_size),
        "workers": float(world),
    }
