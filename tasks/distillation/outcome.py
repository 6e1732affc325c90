"""What a distillation run delivered: each student's quality and gate verdict, the final model (the last
student within the quality gate, else the base model), its numbers beside the base model's on the parent
run, and its registration as `<experiment>-student@candidate`.

The parent is what users compare across runs, so its plain metric names (`fd`, `sw`, `nfe`) are the final
model's; the base model's are `base/<name>`; the distillation chain's quality by sampling steps (the base
model's starting point included) is `<metric>_by_sampling_steps`, drawn by MLflow as a curve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infra.tracking import Tracking
from tasks.distillation.gate import QualityGate
from tasks.distillation.plot import QualityCurves
from tasks.graph import PipelineRun, StageOutcome, StageSpec
from tasks.headlines import CURVE, units_note

BASE_EVAL = "evaluate_base"


def round_stages(stages: list[StageSpec], k: int) -> tuple[StageSpec | None, StageSpec | None]:
    """Round `k`'s distillation and evaluation stages (None where the plan has none)."""
    found = {s.kind: s for s in stages if s.round == k and s.kind in ("distill_round", "evaluate")}
    return found.get("distill_round"), found.get("evaluate")


@dataclass
class Halving:
    """What distillation delivered: each student's steps, quality and gate verdict, the final student (the
    last one within the quality gate; None: the base model is final) and why halving stopped."""

    students: list[dict[str, Any]] = field(default_factory=list)
    final: StageOutcome | None = None
    stopped: str = ""

    def record(self) -> dict[str, Any]:
        final = self.final
        return {
            "students": self.students,
            "final_model": {"stage": final.spec.name, "steps": final.spec.steps} if final else None,
            "halving_stopped": self.stopped,
        }


def halving(run: PipelineRun, cfg: Any) -> Halving:
    """Walk the rounds in order: a student counts while its round produced it and, with a quality gate, its
    evaluation is within `quality_gate` x the base model's headline; the first that is not ends halving."""
    out, factor = Halving(), cfg.distill.quality_gate
    if not cfg.distill.student_steps:
        out.stopped = "distillation disabled"
        return out
    base = run.outcomes.get(BASE_EVAL)
    specs = [o.spec for o in run.outcomes.values()]
    for k, steps in enumerate(cfg.distill.student_steps, start=1):
        dist_spec, ev_spec = round_stages(specs, k)
        dist = run.outcomes[dist_spec.name] if dist_spec else None
        ev = run.outcomes[ev_spec.name] if ev_spec else None
        if dist is None or dist.result is None:
            out.stopped = f"{dist.spec.name} {dist.status}" if dist else f"round {k} not planned"
            return out
        if dist.result.info.get("skipped"):
            out.stopped = dist.result.info["skipped"]
            return out
        quality = ev.result.metrics.get("quality") if ev and ev.result else None
        out.students.append({"stage": dist.spec.name, "steps": steps, "quality": quality})
        if factor is not None:
            if quality is None or base is None or base.result is None:
                what = f"{ev.spec.name} {ev.status}" if ev else f"round {k}'s evaluation missing"
                out.stopped = f"{what}: no quality to gate on"
                return out
            failure = QualityGate(ev.spec.name, base.spec.name, factor).judge(ev.result, base.result)
            out.students[-1]["passed_gate"] = failure is None
            if failure:
                out.stopped = f"{failure}; the {steps}-step student is not kept"
                return out
        out.final = dist
    out.stopped = f"reached end_steps {cfg.distill.end_steps}"
    return out


def register_final_student(run: PipelineRun, cfg: Any, tracking: Tracking, h: Halving) -> str | None:
    """Register the run's final student (`h.final`) as a version of `<experiment>-student` with alias
    `candidate`: the model logged when it was computed; a cached student's earlier version (same key) gets
    the alias again, and a cached student never registered (e.g. the last one within a quality gate) its
    logged model. The version's description names this pipeline run, the steps and the headline metric
    with its ratio to the base model's."""
    from infra.mlflow_models import logged_model_uri, register

    final = h.final
    if final is None:
        return None
    name, key = f"{cfg.tracking.experiment}-student", final.spec.key
    tags = {"fdm.key": key, "fdm.steps": str(final.spec.steps), "fdm.pipeline_run": run.run_id}
    versions = [
        v for v in tracking.client.search_model_versions(f"name = '{name}'") if v.tags.get("fdm.key") == key
    ]
    uri = final.result.info.get("model_uri") or (None if versions else logged_model_uri(tracking, key))
    if uri is not None:
        version = register(tracking, uri, name, "candidate", tags)
    elif versions:
        version = max(versions, key=lambda v: int(v.version)).version
        tracking.client.set_registered_model_alias(name, "candidate", version)
    else:
        return None
    tracking.client.update_model_version(name, str(version), description=version_note(run, h))
    tracking.set_tags(run.run_id, {"fdm.registered_model": f"models:/{name}/{version}"})
    return f"models:/{name}@candidate"


def final_numbers(run: PipelineRun, h: Halving) -> str:
    """The final model's headline metric against the base model's, in words ('' without both)."""
    base, final = run.outcomes.get(BASE_EVAL), final_evaluation(run, h)
    if base is None or base.result is None or final is None or final.result is None:
        return ""
    metric = base.result.info.get("metric_name", "quality")
    value, ref = final.result.metrics.get("quality"), base.result.metrics.get("quality")
    if value is None or not ref:
        return ""
    tag = base.result.info.get("headline", {}).get("tag", "")
    return f"{metric} = {value:.4g} (lower is better), {value / ref:.2f}x the base model's {ref:.4g}" + (
        f" with {tag}" if tag else ""
    )


def version_note(run: PipelineRun, h: Halving) -> str:
    """The registered version's description: which pipeline run, stage and steps, and its numbers."""
    final = h.final
    numbers = final_numbers(run, h)
    return (
        f"Final student of pipeline run {run.run_id}: stage `{final.spec.name}`, "
        f"{final.spec.steps} sampling steps" + (f"; {numbers}." if numbers else ".")
    )


def distillation_note(run: PipelineRun, cfg: Any, h: Halving) -> str:
    """The distillation's part of the parent run's description: the data, the students, the final model
    with its numbers against the base model's, and the units of the parent's metrics."""
    text = f"Base model trained on `{cfg.data.source.kind}` data."
    if h.students:
        steps = ", ".join(
            f"{st['steps']}" + ("" if st.get("passed_gate", True) else " (outside the quality gate)")
            for st in h.students
        )
        final = h.final
        text += (
            f"\n\nStudents' sampling steps: {steps}. "
            + (
                f"Final student: {final.spec.name}, {final.spec.steps} sampling steps "
                f"(logged model `{final.spec.node.model_name}`)."
                if final
                else "No student is kept: the base model is final."
            )
            + f" Halving stopped: {h.stopped}."
        )
    numbers = final_numbers(run, h)
    if numbers:
        text += (
            f"\n\nFinal model: {numbers}. The plain metrics (e.g. `fd`, `sw`, `nfe`) are the final model's, "
            f"`base/...` the base model's, `..._by_sampling_steps` the quality curve from the base model's "
            f"starting point through every student."
        )
    final = final_evaluation(run, h)
    if final is not None and final.result is not None:
        metric = final.result.info.get("metric_name", "quality")
        shown = [*final.result.metrics, f"{metric}_ratio_to_base", "final_sampling_steps", "wall_seconds"]
        text += units_note(dict.fromkeys(shown, 0.0))
    return text


def final_evaluation(run: PipelineRun, h: Halving) -> StageOutcome | None:
    """The evaluation of the run's final model: the final student's, else the base model's headline."""
    if h.final is not None:
        _, ev = round_stages([o.spec for o in run.outcomes.values()], h.final.spec.round)
        return run.outcomes[ev.name] if ev else None
    return run.outcomes.get(BASE_EVAL)


def model_ids(run: PipelineRun, tracking: Tracking) -> dict[str, str]:
    """The logged model id of each model stage, by stage name: logged in this run, or by its key's earlier
    computation (a cached stage)."""
    from infra.mlflow_models import logged_model_uri

    ids = {}
    for o in run.outcomes.values():
        if o.spec.decl.output != "model" or o.result is None or o.result.info.get("skipped"):
            continue
        uri = o.result.info.get("model_uri") or logged_model_uri(tracking, o.spec.key)
        if uri:
            ids[o.spec.name] = uri.removeprefix("models:/")
    return ids


def log_numbers(
    run: PipelineRun, tracking: Tracking, h: Halving, curves: QualityCurves | None, ids: dict[str, str]
) -> None:
    """The parent's metrics: the final model's evaluation under plain names, the base model's as
    `base/<name>`, the final/base ratio of the headline metric, each student's ratio linked to its logged
    model, and the quality curve (one value per sampling-step count). One-value metrics are logged once."""
    base, final = run.outcomes.get(BASE_EVAL), final_evaluation(run, h)
    numbers: dict[str, float] = {"wall_seconds": run.wall_seconds}
    if final is not None and final.result is not None:
        numbers |= final.result.metrics
        numbers["final_sampling_steps"] = float(final.spec.steps or 0)
    if base is None or base.result is None:
        tracking.log_metrics(run.run_id, numbers)
        return
    metric = base.result.info.get("metric_name", "quality")
    numbers |= {f"base/{k}": v for k, v in base.result.metrics.items()}
    base_quality = base.result.metrics.get("quality")
    if final is not None and final.result is not None and base_quality:
        numbers[f"{metric}_ratio_to_base"] = final.result.metrics["quality"] / base_quality
    tracking.log_metrics(run.run_id, numbers)
    for st in h.students:  # each student's ratio, on its logged model: search_logged_models ranks by it
        if st.get("quality") is not None and base_quality and st["stage"] in ids:
            ratio = {f"{metric}_ratio_to_base": st["quality"] / base_quality}
            tracking.log_metrics(run.run_id, ratio, model_id=ids[st["stage"]])
    if curves is None:
        return
    chain = curves.chain() if curves.students else next(iter(curves.base.values()), [])
    for steps, quality, _ in chain:
        tracking.log_metrics(run.run_id, {f"{metric}{CURVE}": quality}, steps)
