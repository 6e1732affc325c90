"""The train_base stage's declaration and config: the network and the (FDM or baseline) training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, model_validator

from fdm_core.options import ProcessName
from tasks.stage import STRICT, StageKind

if TYPE_CHECKING:
    import torch

    from fdm_core.processes import Process


class ModelConfig(BaseModel):
    """The network: `mlp` for vector data, `unet` for images (resolution and channels come from the data)."""

    model_config = STRICT
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
        from fdm_core.networks import MLP, UNet

        if self.kind == "mlp":
            if len(shape) != 1:
                raise ValueError(f"model.kind: mlp needs vector data, the dataset has shape {list(shape)}")
            return MLP(shape[0], hidden=self.hidden, depth=self.depth, embedding=self.embedding)
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

    model_config = STRICT
    process: ProcessName = Field("edm", description="EDM: where FDM trains faster on digits (VP-FDM lags)")
    fdm: bool = Field(
        True, description="digits: EDM-FDM needs 1/1.42 of EDM's steps (1/1.07 of unclipped EDM's)"
    )
    multiplier: float | None = Field(
        None, gt=0, description="FDM m; None: the reference's 2 (VE: 1), not ablated"
    )
    warmup_iters: int | None = Field(
        None, ge=1, description="FDM warm-up W; None: 200 (EDM) / 400; EDM W=200 beat 50 and 800 on digits"
    )
    steps: int = Field(2000, ge=1, description="digits: EDM-FDM leads EDM from about 1250 steps on")
    batch_size: int = Field(128, ge=1, description="the FDM study's batch (fdm_training.md); not tuned")
    lr: float = Field(2e-3, gt=0, description="Adam; the FDM study's rate (fdm_training.md); not tuned")
    lr_rampup: int = Field(100, ge=0, description="linear lr ramp-up steps, as the reference; the study's")
    ema_decay: float = Field(
        0.999, ge=0, lt=1, description="with ema_rampup, beat a constant 0.995 on digits"
    )
    ema_rampup: float | None = Field(
        0.1, gt=0, description="EMA mean age capped at this x steps so far (EDM's); None: constant decay"
    )
    grad_clip: float | None = Field(
        1.0, gt=0, description="helps FDM on digits; with fdm: false, null (no clipping) trained better"
    )
    checkpoint_every: int = Field(500, ge=1, description="a killed worker loses at most this many steps")
    log_every: int = Field(50, ge=1, description="train/loss points in MLflow: real steps, this often")
    seed: int = 0
    workers: int = Field(1, ge=1, description="data-parallel replicas (Ray Train DDP); batch_size is global")

    def build_process(self) -> Process:
        """The noise process (and FDM variant) this config trains."""
        from fdm_core.processes import make_process

        return make_process(
            self.process, fdm=self.fdm, multiplier=self.multiplier, warmup_iters=self.warmup_iters
        )

    @model_validator(mode="after")
    def _ve_multiplier(self) -> TrainConfig:
        if self.process == "ve" and self.fdm and self.multiplier not in (None, 1.0):
            raise ValueError(f"multiplier: VE-FDM uses m = 1 (got {self.multiplier})")
        return self


class TrainBaseConfig(BaseModel):
    """The train_base stage's config: the pipeline's `model` and `train` sections."""

    model_config = STRICT
    model: ModelConfig
    train: TrainConfig


STAGE = StageKind(
    name="train_base",
    config=TrainBaseConfig,
    run="tasks.train_base:train_base",
    inputs={"dataset": "dataset"},
    output="model",
    resources="train",
    default_resources=(2.0, 1.0),
    headline="train/loss",
    version="2",
    total_steps=lambda cfg: cfg.train.steps,
    coordinates=lambda cfg: cfg.train.workers > 1,
)
