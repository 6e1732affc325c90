"""The options of sampling a model, torch-free, each defined once: ParaDiGMS's settings (used by the evaluate
stage, the picard_sample stage and `fdm sample`), the Ray actors that evaluate its windows, the number of
samples and their seed, and `fdm sample`'s whole config, from which its command-line flags are generated."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from fdm_core.options import PICARD_TOL, PICARD_WINDOW, Method, Solver, Strategy
from tasks.stage import STRICT


class PicardOptions(BaseModel):
    """ParaDiGMS (Picard iteration over sliding windows of sampler steps): window, tolerance, solver."""

    model_config = STRICT
    window: int = Field(PICARD_WINDOW, ge=1, description="Picard window p: steps evaluated in parallel")
    tol: float = Field(PICARD_TOL, gt=0, description="Picard tolerance tau on the per-step error")
    solver: Solver = Field(
        "picard",
        description="the fixed-point solver: plain Picard (ParaDiGMS) or ParaTAA's triangular Anderson "
        "acceleration (same fixed point, error test and window; fewer iterations)",
    )


class PicardPoolOptions(PicardOptions):
    """Picard's settings and the pool of Ray actors, each holding the model, that evaluates its windows."""

    actors: int = Field(0, ge=0, description="Ray actors holding the model; 0 = one local batched call")
    actor_cpus: float = Field(
        0.5,
        gt=0,
        description="logical CPUs per actor (each also takes a GPU if any); with resources.sample.num_cpus "
        "they should add up to the machine's CPUs, so that no other stage computes while the stage times",
    )
    strategy: Strategy = Field(
        "PACK", description="placement of the actors; STRICT_SPREAD puts one per node on a cluster"
    )


class SamplingOptions(PicardPoolOptions):
    """How many samples, from which seed, and with which Picard settings: what `fdm sample` and the
    picard_sample stage share."""

    num: int = Field(16, ge=1, description="samples drawn, as one batch")
    seed: int = Field(0, description="seed of the initial and the sampler's noise")


class SampleConfig(SamplingOptions):
    """`fdm sample`: method and grid (default: the artifact's own, if it has one), count, seed, Picard."""

    sampler: Method | None = Field(None, description="default: the artifact's own, else heun")
    steps: int | None = Field(None, ge=1, description="default: the artifact's own grid, else 18")
    picard: bool = Field(False, description="ParaDiGMS: Picard iteration over sliding windows")
    compare: bool = Field(False, description="also run the sequential sampler and report the deviation")
    pairs: int = Field(1, ge=1, description="with compare: timed (sequential, Picard) pairs, alternating")

    @model_validator(mode="after")
    def _picard_options(self) -> SampleConfig:
        if not self.picard and (self.actors or self.compare):
            raise ValueError("actors, compare: only apply to Picard sampling (set picard)")
        return self
