"""Stage: train the FDM (or baseline) base model on a prepared dataset; resumable from checkpoints."""

from __future__ import annotations

import posixpath
import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.nn.parallel import DistributedDataParallel

from fdm_core.networks import MLP, UNet, count_parameters, model_summary
from fdm_core.precond import Denoiser
from fdm_core.processes import Process, make_process
from fdm_core.training import EMA, denoising_loss, train_step
from infra.store import open_store
from tasks.checkpoints import (
    model_spec,
    resume_training,
    save_model,
    save_training_checkpoint,
)
from tasks.dataset import ParquetBatches, dataset_meta
from tasks.stage import StageContext, StageResult


class ModelConfig(BaseModel):
    """The network: `mlp` for vector data, `unet` for images (resolution and channels come from the data)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["mlp", "unet"] = "unet"
    hidden: int = Field(128, ge=8)
    depth: int = Field(3, ge=1)
    model_channels: int = Field(32, ge=4)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2])
    num_blocks: int = Field(1, ge=1)
    attn_resolutions: list[int] = Field(default_factory=lambda: [4])
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    embedding: Literal["positional", "fourier"] = "positional"

    def build(self, shape: tuple[int, ...]) -> torch.nn.Module:
        """The network for samples of `shape` ((D,) for vectors, (C, H, W) for images)."""
        if self.kind == "mlp":
            if len(shape) != 1:
                raise ValueError(f"model.kind: mlp needs vector data, the dataset has shape {list(shape)}")
            return MLP(shape[0], self.hidden, self.depth, embedding=self.embedding)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"model.kind: unet needs square images (C, H, W), the dataset has {list(shape)}")
        return UNet(
            img_resolution=shape[1],
            in_channels=shape[0],
            model_channels=self.model_channels,
            channel_mult=self.channel_mult,
            num_blocks=self.num_blocks,
            attn_resolutions=self.attn_resolutions,
            dropout=self.dropout,
            embedding=self.embedding,
        )


class TrainConfig(BaseModel):
    """Base training: process, FDM on/off with its multiplier and warm-up, optimisation and EMA."""

    model_config = ConfigDict(extra="forbid")
    process: Literal["vp", "ve", "edm"] = "edm"
    fdm: bool = Field(True, description="EDM-FDM beat EDM by 16% FD late in 4k-step digits runs (3 seeds)")
    multiplier: float | None = Field(None, gt=0, description="FDM m; default 2 (VE: 1)")
    warmup_iters: int | None = Field(None, ge=1, description="FDM warm-up W; reference's 200 (EDM) or 400")
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    lr_rampup: int = Field(100, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    seed: int = 0
    workers: int = Field(1, ge=1, description="data-parallel replicas (Ray Train DDP); batch_size is global")

    def build_process(self) -> Process:
        """The noise process (and FDM variant) this config trains."""
        return make_process(
            self.process, fdm=self.fdm, multiplier=self.multiplier, warmup_iters=self.warmup_iters
        )

    @model_validator(mode="after")
    def _ve_multiplier(self) -> TrainConfig:
        if self.process == "ve" and self.fdm and self.multiplier not in (None, 1.0):
            raise ValueError(f"multiplier: VE-FDM uses m = 1 (got {self.multiplier})")
        return self


def train_base(model_cfg: ModelConfig, cfg: TrainConfig, dataset_uri: str, ctx: StageContext) -> StageResult:
    """Train a denoiser on `dataset_uri`; resume from the newest checkpoint of this stage key if any.

    With `cfg.workers > 1` the steps run data-parallel on Ray Train workers (each `ctx.num_threads` CPUs and
    a GPU when `ctx.device` is cuda); rank 0 logs and writes the same checkpoints and model artifact."""
    if cfg.workers > 1:
        from infra.ray_train import run_data_parallel

        config = {"model_cfg": model_cfg, "cfg": cfg, "dataset_uri": dataset_uri, "ctx": ctx}
        cuda = ctx.device.startswith("cuda")
        metrics = run_data_parallel(_train_worker, config, cfg.workers, max(1, ctx.num_threads), cuda)
    else:
        torch.set_num_threads(max(1, ctx.num_threads))
        metrics = _train(model_cfg, cfg, dataset_uri, ctx, torch.device(ctx.device))
    net = model_cfg.build(dataset_meta(dataset_uri, ctx.endpoint_url).shape)
    return StageResult(
        stage="train_base",
        key=ctx.key,
        outputs={"model": open_store(ctx.store_uri, ctx.endpoint_url).uri(ctx.out_prefix)},
        metrics=metrics,
        info={"summary": model_summary(net), "parameters": count_parameters(net)},
    )


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its DDP rank of the training loop."""
    from infra.ray_train import report, worker_rank

    rank, world, device = worker_rank()
    torch.set_num_threads(max(1, config["ctx"].num_threads))
    report(
        _train(config["model_cfg"], config["cfg"], config["dataset_uri"], config["ctx"], device, rank, world)
    )


def _train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    dataset_uri: str,
    ctx: StageContext,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> dict[str, float]:
    """The training loop, or one DDP rank of it: every rank draws its own batches of batch_size/world and
    noise; gradients are averaged, so all ranks hold the same weights and rank 0 alone writes them."""
    store = open_store(ctx.store_uri, ctx.endpoint_url)
    meta = dataset_meta(dataset_uri, ctx.endpoint_url)
    torch.manual_seed(cfg.seed)
    process = cfg.build_process()
    model = Denoiser(model_cfg.build(meta.shape), process).to(device)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(1, cfg.lr_rampup)))
    ckpt_root = posixpath.join("checkpoints", "train_base", ctx.key)
    state = resume_training(store, ckpt_root, model, ema, opt, sched)
    resumed_from = state.step
    trained: torch.nn.Module = model
    if world > 1:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        trained.process = process  # denoising_loss reads the process off the denoiser it is given

    batches = iter(
        ParquetBatches(
            dataset_uri,
            -(-cfg.batch_size // world),
            seed=cfg.seed + state.step + 7919 * rank,
            epochs=None,
            endpoint_url=ctx.endpoint_url,
        )
    )
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.step + 999_983 * rank)
    t0, loss_sum, n_loss, last_loss = time.perf_counter(), 0.0, 0, float("nan")
    while state.step < cfg.steps:
        x0 = next(batches)[0].to(device)
        loss = train_step(
            trained,
            opt,
            lambda x0=x0: denoising_loss(trained, x0, state.warmup_step, gen),
            state,
            ema,
            cfg.grad_clip,
            sched,
        )
        loss_sum, n_loss = loss_sum + loss, n_loss + 1
        if state.step % cfg.log_every == 0 or state.step == cfg.steps:
            last_loss = loss_sum / n_loss
            if rank == 0:
                ctx.log_metrics({"loss": last_loss, "lr": opt.param_groups[0]["lr"]}, state.step)
            loss_sum, n_loss = 0.0, 0
        if rank == 0 and state.step % cfg.checkpoint_every == 0 and state.step < cfg.steps:
            save_training_checkpoint(store, ckpt_root, model, ema, opt, state)
    train_seconds = time.perf_counter() - t0

    if rank == 0:
        spec = model_spec(ema.model, parameters=count_parameters(model), data_shape=list(meta.shape))
        save_model(
            store,
            ctx.out_prefix,
            ema.model,
            spec,
            {"stage": "train_base", "key": ctx.key, "steps": state.step},
        )
    return {
        "train_seconds": train_seconds,
        "steps": float(state.step),
        "resumed_from": float(resumed_from),
        "images_seen": float(state.step * cfg.batch_size),
        "workers": float(world),
    }
