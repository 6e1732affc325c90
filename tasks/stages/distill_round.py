"""The distill_round stage's declaration and config: one progressive-distillation halving round."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from fdm_core.options import Parameterisation, TeacherSolver, Weighting, check_stable
from tasks.stage import STRICT, StageKind


class DistillConfig(BaseModel):
    """One halving round: optimisation, loss weighting and the student's parameterisation."""

    model_config = STRICT
    updates: int = Field(2000, ge=1, description="optimizer updates of a round (paper: 50k)")
    final_updates: int | None = Field(
        None, ge=1, description="updates of the rounds to 2 and 1 steps; default 2 x updates (paper: 100k)"
    )
    batch_size: int = Field(128, ge=1)
    lr: float = Field(5e-4, gt=0, description="initial learning rate, annealed linearly to 0 in the round")
    grad_clip: float | None = Field(1.0, gt=0)
    teacher_solver: TeacherSolver = Field(
        "euler",
        description="solver of the base model's two steps in a target; heun lets round 1 start from the "
        "teacher's Heun quality (a distilled teacher always steps with DDIM on its own grid)",
    )
    ema_decay: float | None = Field(
        None, ge=0, lt=1, description="EMA of the student's weights, which the round outputs; None: none"
    )
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


class DistillRoundConfig(DistillConfig):
    """One round as the pipeline plans it: the shared round settings plus the teacher it halves."""

    teacher_steps: int = Field(ge=2, description="steps of the teacher's grid; the student takes half")
    round_index: int = Field(1, ge=0, description="1 for the first round; offsets the round's seed")

    @property
    def student_steps(self) -> int:
        return self.teacher_steps // 2


STAGE = StageKind(
    name="distill_round",
    config=DistillRoundConfig,
    run="tasks.distill_round:distill_round",
    inputs={"teacher": "model", "dataset": "dataset"},
    output="model",
    resources="train",
    default_resources=(2.0, 1.0),
    headline="distill/loss",
    version="2",
    total_steps=lambda cfg: cfg.updates_for(cfg.student_steps),
)
