"""The distillation policy: a base model, then halving rounds down to `distill.end_steps`, stopped by a
quality gate; the final model chosen, registered and drawn against sampling steps. It reaches the engine
only through the `Policy` interface (tasks/graph.py): its config sections, its nodes (whose gate is a
node `condition`), and `conclude` on the finished run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from infra.store import ArtifactStore
from infra.tracking import Tracking
from tasks.distillation.outcome import (
    BASE_EVAL,
    distillation_note,
    halving,
    log_numbers,
    model_ids,
    register_final_student,
)
from tasks.distillation.plot import quality_curves, summary_png
from tasks.distillation.schedule import DistillSchedule, first_teacher, nodes
from tasks.graph import Conclusion, Node, PipelineRun
from tasks.stages.evaluate import EvalConfig
from tasks.stages.train_base import ModelConfig, TrainConfig


class DistillationPolicy:
    """Base model, halving rounds, quality gate, final model (see the module's docstring)."""

    name = "distillation"
    sections: ClassVar[Mapping[str, tuple[type, Any]]] = {
        "model": (ModelConfig, ModelConfig),
        "train": (TrainConfig, TrainConfig),
        "distill": (DistillSchedule, DistillSchedule),
        "evaluate": (EvalConfig, EvalConfig),
    }

    def nodes(self, cfg: Any) -> list[Node]:
        return nodes(cfg)

    def conclude(
        self, run: PipelineRun, cfg: Any, tracking: Tracking, store: ArtifactStore, command: str
    ) -> Conclusion:
        """Walk the rounds to the final model; log the quality plot and the parent's numbers; register the
        final student unless a stage failed."""
        h = halving(run, cfg)
        curves = quality_curves(run, first_teacher(cfg))
        if curves is not None:
            metric = run.outcomes[BASE_EVAL].result.info.get("metric_name", "quality").upper()
            title = f"{cfg.name}: sample quality against sampling steps"
            tracking.log_bytes(run.run_id, summary_png(curves, metric, title, store), "quality_vs_steps.png")
        log_numbers(run, tracking, h, curves, model_ids(run, tracking))
        tags = {
            "fdm.final_model": h.final.spec.name if h.final else "train_base",
            "fdm.student_steps": ",".join(str(st["steps"]) for st in h.students),
            "fdm.halving_stopped": h.stopped,
        }
        if h.final:
            tags["fdm.final_steps"] = str(h.final.spec.steps)
        lines = []
        registered = None if run.failed else register_final_student(run, cfg, tracking, h)
        if registered:
            lines.append(f"final student registered: {registered}")
        if h.students or cfg.distill.student_steps:
            n = h.final.spec.steps if h.final else 0
            kept = f"{h.final.spec.name} ({n} step{'s' * (n != 1)})" if h.final else "the base model"
            lines.append(f"final model: {kept}; halving stopped: {h.stopped}")
        return Conclusion(
            record=h.record(), tags=tags, description=distillation_note(run, cfg, h), lines=lines
        )


POLICY = DistillationPolicy()
