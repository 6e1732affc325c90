"""Smoke tests of the benchmarks: their tiny modes (a few steps) build a full report and its PNG plots
without writing into benchmarks/results/, and `fdm bench NAME` runs each benchmark's main(argv)."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch

from benchmarks import (
    distillation,
    fdm_common,
    fdm_sampling,
    fdm_training,
    loader_throughput,
    picard,
    pipeline,
    prepare,
)
from benchmarks.common import machine, stated_command
from benchmarks.fdm_common import first_reach, load_digits, train, trained, trained_curve
from pipelines import cli


def test_first_reach_interpolates_and_says_when_never() -> None:
    assert first_reach([100, 200, 300], [3.0, 2.0, 1.0], 1.5) == pytest.approx(250.0)
    assert first_reach([100, 200], [3.0, 2.0], 3.5) == 100.0
    assert first_reach([100, 200], [3.0, 2.0], 1.0) is None


@pytest.mark.parametrize("bench", [fdm_training, fdm_sampling], ids=["training", "sampling"])
def test_tiny_mode_builds_report_and_plot(bench) -> None:
    report, files = bench.run(bench.MODES["tiny"])
    assert "Paper anchor" in report and "## Summary" in report and "Machine:" in report
    assert "| baseline" in report
    (name, png), *_ = files.items()
    assert name in report and png.startswith(b"\x89PNG")
    if bench is fdm_sampling:  # fdm_training's headline is the summary in its record
        assert json.loads(files["fdm_sampling_tiny.summary.json"])["headline"].startswith("EDM: ")


def test_fdm_cache_serves_fdm_training_runs_to_both_benchmarks(tmp_path: Path, capsys) -> None:
    """A cached run gives back the same curve and the same EMA weights, and sampling reuses the model."""
    mode = dataclasses.replace(fdm_training.MODES["tiny"], cache=tmp_path)
    first, _ = fdm_training.run(mode)
    assert "## EDM: 6 steps (seeds 0): the pair trained past 4 steps" in first  # the long pair, read as such
    assert "Step ratio baseline ÷ FDM on the log-log fits" in first
    data = load_digits(tmp_path / "data", mode.classifier_steps)
    capsys.readouterr()
    curve = trained_curve("edm", True, mode.run, 0, data, tmp_path)
    model = trained("edm", True, mode.run, 0, data, tmp_path)
    assert capsys.readouterr().out.count("reusing the cached") == 2
    assert f"{curve.quality[-1]:.3f} |" in first
    fresh, _ = train("edm", True, mode.run, 0, data, print, cache=None)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    sampling = dataclasses.replace(fdm_sampling.MODES["tiny"], run=mode.run, cache=tmp_path)
    fdm_sampling.run(sampling)
    assert "reusing the cached model" in capsys.readouterr().out


def check_report(report: str, files: dict[str, bytes], tables: list[str], anchors: list[str]) -> None:
    """The report has the shared machine line, the command MLflow logs, each table header and anchor; plots
    are PNGs that the report links."""
    assert f"Machine: {machine()}" in report and stated_command(report).startswith("python -m benchmarks.")
    for text in tables + anchors:
        assert text in report
    for name, data in files.items():
        if name.endswith(".summary.json"):  # the headline the README's results table shows
            doc = json.loads(data)
            assert doc["headline"] and doc["report"] == name.replace(".summary.json", ".md")
        else:
            assert f"({name})" in report and data.startswith(b"\x89PNG")


def test_distillation_tiny_builds_report_and_plot() -> None:
    report, files = distillation.run(distillation.MODES["tiny"])
    table = "| variant | 2 steps | 1 steps | score | updates to 4 | wall to 4 | updates to 1 | wall to 1 |"
    check_report(report, files, [table], ["## Lever 1: teacher targets", "## The chosen recipe", "Reading: "])
    assert list(files) == ["distillation_tiny.png", "distillation_tiny.summary.json"]
    assert report.count("**(chosen)**") == 1
    assert "| 1 | " in report  # rounds 4 -> 2 -> 1 steps


def test_loader_throughput_tiny_builds_report() -> None:
    report, files = loader_throughput.run(loader_throughput.MODES["tiny"])
    table = "| data | source | loader images/s | ms per batch of 128 | loading / digits training step |"
    check_report(report, files, [table], ["Goal: loading a batch costs under 5%"])
    assert list(files) == ["loader_throughput_tiny.summary.json"]
    assert "| digits [1, 8, 8] | S3 (moto) |" in report


def test_prepare_summary_says_which_goals_were_missed() -> None:
    """prepare's headline (the benchmark has no tiny mode) names each goal's verdict, a loss in words."""
    won = prepare.headline(
        "prepare", 100_000, 1.51, {"today": 4016, "ray": 6043}, {"today": 1207, "ray": 1557}, 3085
    )
    doc = json.loads(won["prepare.summary.json"])
    assert doc["report"] == "prepare.md" and doc["numbers"]["met"] is False
    assert "1.51x the in-memory stage's throughput (goal >= it: met)" in doc["headline"]
    assert "(goal flat <= 1 GB: not met)" in doc["headline"]
    lost = prepare.headline("p", 2_000, 0.33, {"today": 2356, "ray": 768}, {"today": 276, "ray": 1050}, 3092)
    assert "the method lost: 3.03x slower" in json.loads(lost["p.summary.json"])["headline"]


def test_fdm_bench_help_lists_every_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert exit_.value.code == 0 and all(name in out for name in cli.BENCHMARKS)


def test_fdm_bench_names_a_bad_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "nosuch", "--quick"])
    assert exit_.value.code == 2 and "'nosuch'" in capsys.readouterr().err


@pytest.mark.parametrize("name", cli.BENCHMARKS)
def test_every_benchmark_main_parses_argv(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"benchmarks.{name}").main(["--help"])
    assert exit_.value.code == 0 and "--quick" in capsys.readouterr().out


def test_fdm_bench_passes_options_and_exit_codes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(loader_throughput, "main", seen.append)
    assert cli.main(["bench", "loader_throughput", "--quick", "--threads", "2"]) == cli.EXIT_OK
    assert seen == [["--quick", "--threads", "2"]]

    def fail(argv: list[str]) -> None:
        raise RuntimeError("no space left")

    monkeypatch.setattr(loader_throughput, "main", fail)
    assert cli.main(["bench", "loader_throughput"]) == cli.EXIT_FAILED
    assert "fdm bench loader_throughput: failed: no space left" in capsys.readouterr().err


# Ray last: the module's Ray cluster (ray_local) starts at its first user and stops after the module.


def test_picard_tiny_builds_report_and_plot(ray_local: None) -> None:
    report, files = picard.run(picard.MODES["tiny"])
    table = "| sampler | evaluator | solver | window | tol | sequential ms | Picard ms | speed-up | min-max "
    anchors = ["Published figures: ParaDiGMS", "## Goals of issue 26"]
    check_report(report, files, [table], anchors)
    assert list(files) == ["picard_tiny.png", "picard_tiny.summary.json"]
    assert "| DDPM-20 | Ray x1 | anderson |" in report


def test_busy_seconds_is_the_union_of_intervals() -> None:
    assert pipeline.busy_seconds([[0, 2], [1, 3], [5, 6]]) == 4.0
    assert pipeline.busy_seconds([[0, 10], [2, 3]]) == 10.0
    assert pipeline.busy_seconds([]) == 0.0


def test_pipeline_tiny_builds_report() -> None:
    """`fdm run` twice and `fdm stages` as subprocesses: the second run is all cache hits without Ray."""
    report, files = pipeline.run(pipeline.MODES["tiny"])
    tables = ["| measure | value | goal |", "| stage | status | compute seconds |"]
    check_report(report, files, tables, ["| <= 5% |", "| digits <= 3 s |", "| <= 1.5 s |"])
    assert list(files) == ["pipeline_tiny.png", "pipeline_tiny.summary.json"]
    assert "| every stage cached in every re-run | True |" in report
    assert "| no re-run started Ray | True |" in report
    assert "| distill_4to2 | done |" in report and "of which start-up" in report


def test_fdm_interrupted_cell_resumes_bit_exactly(tmp_path: Path) -> None:
    """A cell stopped after an evaluation resumes from its checkpoint and ends with the same EMA weights
    and curve as an uninterrupted run."""
    cfg = fdm_common.RunConfig(steps=4, eval_every=2, num_samples=20, sample_steps=2)
    data = load_digits(tmp_path / "data", 5)

    def stop_at_step_2(message: str) -> None:
        if "step 2:" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("edm", True, cfg, 0, data, stop_at_step_2, cache=tmp_path)
    lines: list[str] = []
    resumed, curve = train("edm", True, cfg, 0, data, lines.append, cache=tmp_path)
    assert "resuming at step 2" in lines[0] and curve.steps == [2, 4]
    fresh, fresh_curve = train("edm", True, cfg, 0, data, print, cache=None)
    assert curve.quality == fresh_curve.quality
    for a, b in zip(resumed.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fdm_recorded_cells_are_not_rerun(tmp_path: Path) -> None:
    """A cell whose identity is in the committed record is skipped (no model cache needed); a changed
    setting is a different cell; a baseline does not depend on the FDM warm-up."""
    record = tmp_path / "fdm_training.json"
    mode = dataclasses.replace(fdm_training.MODES["tiny"], cache=None, record=record)
    fdm_training.run(mode)
    doc = json.loads(record.read_text())
    assert {(c["process"], c["fdm"], c["seed"], c["setting"]) for c in doc["cells"]} == {
        ("edm", False, 0, "main"),
        ("edm", True, 0, "main"),
        ("edm", False, 0, "long6"),
        ("edm", True, 0, "long6"),
    }
    assert set(doc["summary"]["edm"]) >= {
        "step_ratio_mean",
        "step_ratio_min",
        "step_ratio_max",
        "seeds",
        "steps",
    }
    results = fdm_common.Results(record, mode.classifier_steps)
    data = fdm_common.Digits(torch.zeros(1), None, 0.0, mode.classifier_steps)  # type: ignore[arg-type]
    cells = mode.cells()
    fdm_common.run_cells(cells, results, data, 1, None)  # would fail on the dummy data if it trained
    other_w = dataclasses.replace(mode.run, warmup_iters=7)
    assert results.find(fdm_common.Cell("edm", False, 0, "W7", other_w)) is not None
    assert results.find(fdm_common.Cell("edm", True, 0, "W7", other_w)) is None
