"""The quality gate that stops halving: a student may be halved again only while its quality stays within a
factor of the base model's."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from tasks.stage import StageResult


def passes_quality_gate(student_metric: float, teacher_metric: float, max_ratio: float) -> bool:
    """Whether a student may be halved again: its lower-is-better metric (e.g. FID) is at most
    `max_ratio` x its teacher's. A non-finite student metric fails; the pipeline stops halving on False."""
    if max_ratio <= 0:
        raise ValueError(f"max_ratio: must be > 0 (got {max_ratio})")
    if not math.isfinite(student_metric):
        return False
    return student_metric <= max_ratio * teacher_metric


@dataclass(frozen=True)
class QualityGate:
    """Run a round only if evaluation `student`'s quality is at most `factor` x evaluation `reference`'s
    headline (lower is better). The pipeline's gates all judge against the base model's evaluation, so the
    allowed loss does not compound over rounds. A node `condition` (tasks/graph.py)."""

    student: str
    reference: str
    factor: float

    def judge(self, student: StageResult, reference: StageResult) -> str | None:
        """Why evaluation `student` fails the gate against evaluation `reference` (None: it passes)."""
        value = student.metrics.get("quality", float("nan"))
        ref = reference.metrics.get("quality", float("nan"))
        if passes_quality_gate(value, ref, self.factor):
            return None
        metric = student.info.get("metric_name", "quality")
        return (
            f"quality gate: {self.student} {metric} {value:.4g} > {self.factor} x {self.reference} {ref:.4g}"
        )

    def failure(self, results: Mapping[str, StageResult]) -> str | None:
        failed = self.judge(results[self.student], results[self.reference])
        return f"{failed}; halving stops" if failed else None
