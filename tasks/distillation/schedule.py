"""The distillation schedule and the graph it asks for: a base model, its evaluation, then one halving round
and one evaluation per student, each round after the first gated on the last student's quality."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tasks.distillation.gate import QualityGate
from tasks.graph import Node
from tasks.stage import STRICT
from tasks.stages.distill_round import DistillConfig
from tasks.stages.evaluate import SamplerSpec


class DistillSchedule(BaseModel):
    """Progressive distillation: halve from `start_steps` down to `end_steps`, optionally gated on quality."""

    model_config = STRICT
    enabled: bool = Field(True, description="run the distillation rounds; false stops after the base model")
    start_steps: int = Field(
        64, ge=2, description="steps of the base model's DDIM sampler, the first teacher"
    )
    end_steps: int = Field(
        4, ge=1, description="steps of the last student; start_steps/end_steps is a power of 2"
    )
    quality_gate: float | None = Field(
        None,
        gt=0,
        description="stop halving at the first student whose metric is worse than this x the base model's "
        "(its first evaluation sampler); the last student within it is the final model",
    )
    round: DistillConfig = Field(default_factory=DistillConfig)
    rounds: dict[int, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-round settings: round index (1 = the first halving) -> some fields of `round`, "
        "applied on top of `round` for that round only, e.g. {3: {updates: 500}} or --set "
        "distill.rounds.3.updates=500; only those rounds (and what depends on them) get new keys",
    )

    @field_validator("rounds", mode="before")
    @classmethod
    def _round_numbers(cls, rounds: Any) -> Any:
        """Round numbers as ints: a `--set distill.rounds.3...` path gives them as text, which strict
        validation would refuse."""
        if not isinstance(rounds, dict):
            return rounds
        return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in rounds.items()}

    @model_validator(mode="after")
    def _per_round(self) -> DistillSchedule:
        known = set(DistillConfig.model_fields)
        count = len(self.student_steps)
        for k, changes in sorted(self.rounds.items()):
            unknown = sorted(set(changes) - known)
            if unknown:
                raise ValueError(
                    f"rounds.{k}.{unknown[0]}: unknown key; a round takes the fields of distill.round "
                    f"({', '.join(sorted(known))})"
                )
            if self.enabled and not 1 <= k <= count:
                raise ValueError(f"rounds.{k}: no such round; this schedule has rounds 1..{count}")
            try:
                settings = self.round_config(k)
            except ValidationError as err:
                e = err.errors()[0]
                msg = e["msg"].removeprefix("Value error, ")
                if not e["loc"]:  # a check across fields, whose message starts with the field it names
                    raise ValueError(f"rounds.{k}.{msg}") from None
                where = ".".join(str(p) for p in e["loc"])
                raise ValueError(f"rounds.{k}.{where}: {msg} (got {e.get('input')!r})") from None
            self.rounds[k] = {
                name: getattr(settings, name) for name in changes
            }  # as validated: "1e30" -> 1e30
        return self

    def round_config(self, k: int) -> DistillConfig:
        """The settings of round `k` (1-based): `round`, with `rounds[k]` applied on top."""
        return DistillConfig.model_validate({**self.round.model_dump(), **self.rounds.get(k, {})})

    @model_validator(mode="after")
    def _halvings(self) -> DistillSchedule:
        if self.end_steps > self.start_steps:
            raise ValueError(f"end_steps: must be <= start_steps ({self.start_steps}), got {self.end_steps}")
        ratio = self.start_steps / self.end_steps
        if ratio != 2 ** round(math.log2(ratio)):
            raise ValueError(
                f"end_steps: start_steps/end_steps must be a power of two "
                f"(got {self.start_steps}/{self.end_steps})"
            )
        return self

    @property
    def student_steps(self) -> list[int]:
        """Step counts of the students, one per round: start/2, start/4, ..., end."""
        if not self.enabled:
            return []
        out, n = [], self.start_steps
        while n > self.end_steps:
            n //= 2
            out.append(n)
        return out


def distill_name(teacher_steps: int, steps: int) -> str:
    """A distillation round's stage name, by its step counts: distill_8to4."""
    return f"distill_{teacher_steps}to{steps}"


def evaluate_name(steps: int) -> str:
    """A student's evaluation stage name, by the student's sampling steps: evaluate_4."""
    return f"evaluate_{steps}"


def first_teacher(cfg: Any) -> SamplerSpec:
    """The base model's sampler that round 1 distils: its teacher solver at `distill.start_steps`."""
    return SamplerSpec(method=cfg.distill.round_config(1).teacher_solver, steps=cfg.distill.start_steps)


def base_samplers(cfg: Any) -> list[SamplerSpec]:
    """The base model's evaluation samplers, plus the first teacher as round 1 distils it (its solver at
    `start_steps`), which the quality plot joins the students to."""
    samplers = list(cfg.evaluate.samplers)
    if cfg.distill.student_steps:
        first = first_teacher(cfg)
        if first not in samplers:
            samplers.append(first)
    return samplers


def nodes(cfg: Any) -> list[Node]:
    """The base model and its evaluation, then each round and its student's evaluation. With a quality gate,
    round k+1 waits for the evaluations of round k's student and of the base model, and runs only if that
    student is within `quality_gate` x the base model's headline (the allowed loss does not compound). The
    last planned model also answers to `model`: what a stage asking for "the final model" is fed."""
    d = cfg.model_dump(mode="json")
    students = cfg.distill.student_steps
    base = Node(
        "train_base",
        "train_base",
        {"model": d["model"], "train": d["train"]},
        aliases=("base_model",) if students else ("base_model", "model"),
        model_name="base",
        model_note="Base model (the distillation's first teacher), trained by {made}.",
    )
    base_eval = Node(
        "evaluate_base",
        "evaluate",
        {**d["evaluate"], "samplers": [s.model_dump() for s in base_samplers(cfg)]},
        section="evaluate",
        bind={"model": base.name},
        round=0,
        steps=cfg.evaluate.samplers[0].steps,  # the headline sampler's: the one the table and plot show
    )
    out, teacher, teacher_steps = [base, base_eval], base, cfg.distill.start_steps
    for k, steps in enumerate(students, start=1):
        gate = None
        if cfg.distill.quality_gate is not None and k >= 2:
            gate = QualityGate(out[-1].name, base_eval.name, cfg.distill.quality_gate)
        settings = cfg.distill.round_config(k).model_dump(mode="json")  # distill.round + distill.rounds[k]
        student = Node(
            distill_name(teacher_steps, steps),
            "distill_round",
            {**settings, "teacher_steps": teacher_steps, "round_index": k},
            section="distill.round",
            bind={"teacher": teacher.name},
            aliases=("model",) if k == len(students) else (),
            after=tuple(dict.fromkeys([gate.student, gate.reference])) if gate else (),
            condition=gate,
            round=k,
            steps=steps,
            model_name=f"student-{steps}",
            model_note=f"Student sampling in {steps} steps, distilled from the {teacher_steps}-step teacher "
            "by {made}.",
        )
        evaluation = Node(
            evaluate_name(steps),
            "evaluate",
            {**d["evaluate"], "samplers": [{"method": "euler", "steps": steps}]},  # its own grid
            section="evaluate",
            bind={"model": student.name},
            round=k,
            steps=steps,
        )
        out += [student, evaluation]
        teacher, teacher_steps = student, steps
    return out
