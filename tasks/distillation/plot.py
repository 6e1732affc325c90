"""The run's sample quality against sampling steps: the points (base model's samplers, the distilled
students, and the base model's point the students start from) and the plot of them.

Each point is drawn and labelled once, in the colour of the model it belongs to: the students' line is
joined to the base model's point they were distilled from by a dashed segment, not by a student marker.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from infra.store import ArtifactStore, NotFoundError
from tasks.stages.evaluate import SamplerSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tasks.graph import PipelineRun

PLOT_VERSION = 4  # bump when quality_figure draws differently
Point = tuple[int, float, int]  # (sampling steps, quality, NFE)
BASE_COLOUR, STUDENT_COLOUR = "C0", "C1"


@dataclass
class QualityCurves:
    """`base`: the base model's points by sampler method; `students`: each student on its own grid;
    `teacher`: the base model's point (its sampler at the start steps) that round 1 distilled."""

    base: dict[str, list[Point]] = field(default_factory=dict)
    students: list[Point] = field(default_factory=list)
    teacher: Point | None = None
    teacher_method: str = ""

    def chain(self) -> list[Point]:
        """The distillation chain, by steps: the base model's starting point, then every student."""
        return sorted(([self.teacher] if self.teacher else []) + self.students)


def quality_curves(run: PipelineRun, teacher: SamplerSpec) -> QualityCurves | None:
    """The run's quality points, or None without a base model evaluation."""
    base = run.outcomes.get("evaluate_base")
    if base is None or base.result is None:
        return None
    curves = QualityCurves(teacher_method=teacher.method)
    by_sampler = base.result.info.get("by_sampler", {})
    for tag, m in by_sampler.items():
        method = tag.rstrip("0123456789")
        curves.base.setdefault(method, []).append((int(tag[len(method) :]), m["quality"], int(m["nfe"])))
    curves.base = {method: sorted(pts) for method, pts in curves.base.items()}
    curves.students = sorted(
        (o.spec.steps, o.result.metrics["quality"], int(o.result.metrics.get("nfe", o.spec.steps)))
        for o in run.outcomes.values()
        if o.spec.round and o.result and "quality" in o.result.metrics
    )
    first = by_sampler.get(teacher.tag)
    if first and curves.students:
        curves.teacher = (teacher.steps, first["quality"], int(first["nfe"]))
    return curves


def quality_figure(curves: QualityCurves, metric: str, title: str) -> Figure:
    """The quality-vs-steps figure, about 800 px wide (matplotlib is imported only when one is drawn)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.subplots()
    labelled: set[tuple[int, float]] = set()

    def label_points(pts: list[Point]) -> None:
        for steps, quality, nfe in pts:
            if (steps, quality) not in labelled:
                labelled.add((steps, quality))
                ax.annotate(
                    f"NFE {nfe}", (steps, quality), textcoords="offset points", xytext=(4, 4), fontsize=7
                )

    styles = ["-", "--", ":", "-."]
    for i, (method, pts) in enumerate(curves.base.items()):
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            color=BASE_COLOUR,
            linestyle=styles[i % len(styles)],
            label=f"base model, {method}",
        )
        label_points(pts)
    if curves.students:
        if curves.teacher:
            first = max(curves.students)  # the most steps: round 1's student
            join = [curves.teacher, first]
            ax.plot([p[0] for p in join], [p[1] for p in join], color=STUDENT_COLOUR, linestyle="--")
        ax.plot(
            [p[0] for p in curves.students],
            [p[1] for p in curves.students],
            marker="s",
            color=STUDENT_COLOUR,
            label=f"distilled students (from the base model's {curves.teacher_method})",
        )
        label_points(curves.students)
    steps = sorted({p[0] for pts in [*curves.base.values(), curves.students] for p in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(n) for n in steps])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def summary_png(curves: QualityCurves | None, metric: str, title: str, store: ArtifactStore) -> bytes | None:
    """The quality-vs-steps plot as PNG, kept in the store by a hash of what it shows: a re-run with the
    same results (every fully cached run) reuses it instead of drawing it again."""
    if curves is None:
        return None
    blob = json.dumps([asdict(curves), metric, title, PLOT_VERSION])
    path = f"plots/quality_vs_steps-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.png"
    try:
        return store.read_bytes(path)
    except NotFoundError:
        buf = io.BytesIO()
        quality_figure(curves, metric, title).savefig(buf, format="png", bbox_inches="tight")
        store.write_bytes(path, buf.getvalue())
        return buf.getvalue()
