"""The picard_sample stage's declaration and config: ParaDiGMS sampling of a pipeline model on a pool of
Ray actors that each hold the model, against the sequential sampler with the same noise, timed in
alternating pairs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fdm_core.options import SingleStepMethod
from tasks.sample_options import SamplingOptions
from tasks.stage import AutoNode, StageKind


class PicardSampleConfig(SamplingOptions):
    """Which model to sample, with which sampler and Picard settings, on how many actors, timed how often."""

    enabled: bool = Field(True, description="add the stage to the pipeline")
    model: Literal["base", "final"] = Field(
        "base", description="the base model, or the last distilled student (on its own grid)"
    )
    sampler: SingleStepMethod = Field(
        "ddpm", description="Picard is exact for these single-step samplers (not dpmpp_2m)"
    )
    pairs: int = Field(
        3, ge=3, description="timed (sequential, Picard) pairs, alternating; the headline is their median"
    )
    steps: int = Field(200, ge=1, description="sequential steps; ignored for a student, which keeps its grid")


STAGE = StageKind(
    name="picard_sample",
    config=PicardSampleConfig,
    run="tasks.picard_sample:picard_sample",
    inputs={"model": "model"},
    output="samples",
    resources="sample",
    auto=AutoNode(
        "picard",
        description="ParaDiGMS sampling on Ray actors, against sequential (off unless enabled)",
        default=lambda: PicardSampleConfig(enabled=False),
        when=lambda cfg: cfg.picard.enabled,
        bind=lambda picard: {"model": "base_model" if picard.model == "base" else "model"},
    ),
    headline="speedup",
    version="2",
)
