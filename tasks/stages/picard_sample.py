"""The picard_sample stage's declaration and config: ParaDiGMS sampling of a pipeline model on a pool of
Ray actors that each hold the model, against the sequential sampler with the same noise, timed in
alternating pairs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from tasks.stage import STRICT, AutoNode, StageKind


class PicardSampleConfig(BaseModel):
    """Which model to sample, with which sampler and Picard settings, on how many actors."""

    model_config = STRICT
    enabled: bool = Field(True, description="add the stage to the pipeline")
    model: Literal["base", "final"] = Field(
        "base", description="the base model, or the last distilled student (on its own grid)"
    )
    sampler: Literal["euler", "heun", "ddpm"] = Field(
        "ddpm", description="Picard is exact for these single-step samplers (not dpmpp_2m)"
    )
    steps: int = Field(200, ge=1, description="sequential steps; ignored for a student, which keeps its grid")
    num: int = Field(16, ge=1, description="samples drawn, as one batch")
    seed: int = 0
    window: int = Field(32, ge=1, description="Picard window p: steps evaluated in parallel")
    tol: float = Field(0.1, gt=0, description="Picard tolerance tau on the per-step error")
    solver: Literal["picard", "anderson"] = Field(
        "picard",
        description="the fixed-point solver: plain Picard (ParaDiGMS) or ParaTAA's triangular Anderson "
        "acceleration (same fixed point, error test and window; fewer iterations)",
    )
    pairs: int = Field(
        3, ge=3, description="timed (sequential, Picard) pairs, alternating; the headline is their median"
    )
    actors: int = Field(2, ge=0, description="Ray actors holding the model; 0 = one local batched call")
    actor_cpus: float = Field(
        0.5,
        gt=0,
        description="logical CPUs per actor (each also takes a GPU if any); with resources.sample.num_cpus "
        "they should add up to the machine's CPUs, so that no other stage computes while the stage times",
    )
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="placement of the actors; STRICT_SPREAD puts one per node on a cluster"
    )


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
