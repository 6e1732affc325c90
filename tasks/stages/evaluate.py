"""The evaluate stage's declaration and config: how every model of the pipeline is judged."""

from __future__ import annotations

from pydantic import BaseModel, Field

from fdm_core.options import Method
from tasks.sample_options import PicardOptions
from tasks.stage import STRICT, StageKind


class SamplerSpec(BaseModel):
    """One way to sample: a method and a step count (on the model's own grid when it has one)."""

    model_config = STRICT
    method: Method = "heun"
    steps: int = Field(18, ge=1)

    @property
    def tag(self) -> str:
        return f"{self.method}{self.steps}"


class EvalConfig(BaseModel):
    """How every model in the pipeline is judged."""

    model_config = STRICT
    num_samples: int = Field(500, ge=16)
    batch_size: int = Field(250, ge=1)
    samplers: list[SamplerSpec] = Field(default_factory=lambda: [SamplerSpec(method="heun", steps=18)])
    seed: int = 0
    inception: str | None = Field(None, description="local TorchScript Inception (EDM/StyleGAN fid format)")
    grid_size: int = Field(8, ge=1, le=32)
    picard: PicardOptions | None = Field(
        None, description="sample the evaluations with ParaDiGMS (euler, heun, ddpm), not sequentially"
    )


STAGE = StageKind(
    name="evaluate",
    config=EvalConfig,
    run="tasks.evaluate:evaluate",
    inputs={"model": "model", "dataset": "dataset", "classifier": "classifier?"},
    output="evaluation",
    resources="evaluate",
    default_resources=(2.0, 1.0),
    headline="quality",
    version="3",
)
