"""What the MLflow UI shows, without a browser: links open the runs in model-training mode, a headline that
says the method lost says so, and the quality plot's data (each point once, in its model's colour).
The browser check of the same facts is `make ui-check` (tests/ui/)."""

from __future__ import annotations

from matplotlib.colors import to_hex

from infra.tracking import run_link
from tasks.distillation.plot import BASE_COLOUR, STUDENT_COLOUR, QualityCurves, quality_figure
from tasks.headlines import format_headline, stage_note, unit
from tasks.stage import StageResult


def test_links_open_the_runs_in_model_training_mode() -> None:
    """MLflow 3.17 reads the mode from the URL's workflowType (before the browser's stored choice)."""
    served = run_link("http://10.0.0.1:5000/", "3", "abc")
    assert served == "http://10.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    local = run_link("sqlite:////tmp/m.db", "1", "abc")
    assert "mlflow ui --backend-store-uri sqlite:////tmp/m.db" in local
    assert local.endswith("http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning")


def test_a_speedup_below_one_says_the_method_lost() -> None:
    assert format_headline("speedup", 0.4228) == (
        "speedup=0.4228 (the method lost, 2.37x slower than the sequential baseline)"
    )
    assert format_headline("speedup", 1.8) == "speedup=1.8"
    assert format_headline("sw", 0.3) == "sw=0.3"  # a distance below 1 is no verdict
    result = StageResult("picard_sample", "k", metrics={"speedup": 0.5, "wall_seconds": 2.0})
    note = stage_note("picard_sample", "speedup", result)
    assert "Headline: speedup = 0.5: below 1, the method lost, 2.00x slower" in note
    assert (
        "- `speedup`: x: sequential seconds / parallel seconds" in note
        and "- `wall_seconds`: seconds" in note
    )
    assert unit("base/fd_by_sampling_steps") == unit("fd") and unit("train/lr") == "learning rate"


def test_the_quality_plot_draws_each_point_once_in_its_models_colour() -> None:
    """The base model's 8-step point (where round 1 starts) is a base-model marker labelled once; the
    students' line starts at their own first point, joined to it by a dashed segment without markers."""
    curves = QualityCurves(
        base={"heun": [(8, 3.0, 15), (18, 2.5, 35)]},
        students=[(1, 4.1, 1), (2, 3.6, 2), (4, 3.2, 4)],
        teacher=(8, 3.0, 15),
        teacher_method="heun",
    )
    ax = quality_figure(curves, "FD", "t").axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert sorted(labels) == sorted(["NFE 15", "NFE 35", "NFE 1", "NFE 2", "NFE 4"])  # "NFE 15" once
    marked = {}
    for line in ax.lines:
        if line.get_marker() not in (None, "None", ""):
            for x, y in zip(line.get_xdata(), line.get_ydata()):
                marked.setdefault((x, y), []).append(to_hex(line.get_color()))
    assert marked[(8, 3.0)] == [to_hex(BASE_COLOUR)]  # drawn once, as the base model's
    assert all(marked[(s, q)] == [to_hex(STUDENT_COLOUR)] for s, q, _ in curves.students)
    (join,) = [line for line in ax.lines if line.get_marker() in (None, "None", "")]
    assert list(join.get_xdata()) == [8, 4] and join.get_linestyle() == "--"
    assert to_hex(join.get_color()) == to_hex(STUDENT_COLOUR)
    assert curves.chain() == [(1, 4.1, 1), (2, 3.6, 2), (4, 3.2, 4), (8, 3.0, 15)]
