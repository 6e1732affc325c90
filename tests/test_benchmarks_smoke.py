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
from benchmarks.fdm_cell import CELL, CURVE, study_setting
from benchmarks.fdm_common import first_reach, load_digits, trained, trained_curve
from benchmarks.stage_cache import Stages
from infra.manifest import CURRENT, MANIFEST_NAME, read_manifest
from infra.store import open_store
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
    data = load_digits(tmp_path, mode.classifier_steps)
    capsys.readouterr()
    cfg = mode.run.for_cell("edm", True, 0)
    curve = trained_curve(cfg, data)
    model = trained(cfg, data)
    assert capsys.readouterr().out.count("reusing the cached") == 2
    assert f"{curve.quality[-1]:.3f} |" in first
    fresh = trained(cfg, load_digits(tmp_path / "fresh", mode.classifier_steps))
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    sampling = dataclasses.replace(fdm_sampling.MODES["tiny"], run=mode.run, cache=tmp_path)
    fdm_sampling.run(sampling)
    assert "reusing the cached model" in capsys.readouterr().out


def test_fdm_cell_is_the_product_training_in_the_store_layout(tmp_path: Path) -> None:
    """A study cell trains through tasks.train_base (its metrics) into the layout `fdm run` writes:
    stages/<kind>/<key>/<version>/ with the model artifact and a manifest holding the curve, CURRENT naming
    the version, and the product's checkpoints gone once the cell is complete."""
    data = load_digits(tmp_path, 5)
    cfg = study_setting(steps=3, eval_every=2, num_samples=20, sample_steps=2).for_cell("edm", True, 0)
    result = Stages(str(tmp_path))(CELL, cfg, dataset=data.dataset, classifier=data.classifier)
    store = open_store(str(tmp_path))
    key_dir = f"stages/{CELL.name}/{result.key}"
    version = store.read_bytes(f"{key_dir}/{CURRENT}").decode()
    manifest = read_manifest(store, f"{key_dir}/{version}")
    assert set(manifest.files) == {"model.json", "weights.safetensors"}
    assert manifest.result["info"]["curve"]["steps"] == [2, 3]
    assert {"resumed_from", "images_seen", "train/loss"} <= set(result.metrics)  # train_denoiser's metrics
    assert not store.list(f"checkpoints/{CELL.name}")
    assert current_versions(tmp_path, "prepare_data") and current_versions(tmp_path, "train_classifier")


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


def current_versions(root: Path, kind: str) -> list[str]:
    """The complete versions that the CURRENT files of a stage kind's keys name in the store at `root`."""
    store = open_store(str(root))
    found = []
    for path in store.list(f"stages/{kind}"):
        if path.endswith(f"/{CURRENT}"):
            version = f"{path.rsplit('/', 1)[0]}/{store.read_bytes(path).decode()}"
            found += [version] if store.exists(f"{version}/{MANIFEST_NAME}") else []
    return found


def test_distillation_tiny_builds_report_and_plot(tmp_path: Path) -> None:
    report, files = distillation.run(dataclasses.replace(distillation.MODES["tiny"], cache=tmp_path))
    for kind in ("prepare_data", "train_classifier", "train_base", "distill_round", "evaluate"):
        assert current_versions(tmp_path, kind)  # the store layout `fdm run` writes
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


def test_fdm_interrupted_cell_resumes_from_the_product_checkpoint(tmp_path: Path, capsys) -> None:
    """A cell stopped at an evaluation left the product's checkpoint of the evaluation before and its curve
    so far; run again, it resumes there, redoes the lost steps and keeps the earlier point. (The product's
    resume restarts the data stream and training noise from (seed, step), so the redone steps draw other
    batches than an uninterrupted run: only the points before the checkpoint are the uninterrupted run's.)"""
    data = load_digits(tmp_path, 5)
    cfg = study_setting(steps=6, eval_every=2, num_samples=20, sample_steps=2).for_cell("edm", True, 0)

    def stop_at_step_4(metrics: dict[str, float], step: int) -> None:
        if "fd" in metrics and step == 4:
            raise KeyboardInterrupt

    stages = Stages(str(tmp_path), log_metrics=stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        stages(CELL, cfg, dataset=data.dataset, classifier=data.classifier)
    store = open_store(str(tmp_path))
    inputs = {"dataset": data.dataset, "classifier": data.classifier}
    key = stages.key(CELL, cfg, inputs)
    checkpoints = f"checkpoints/{CELL.name}/{key}"
    assert read_manifest(store, f"{checkpoints}/step-000000002").producer["kind"] == "training_checkpoint"
    assert json.loads(store.read_bytes(f"{checkpoints}/{CURVE}"))["steps"] == [2, 4]
    assert stages.served(CELL, key, inputs) is None  # nothing complete-looking
    capsys.readouterr()
    curve = trained_curve(cfg, data)
    assert "resuming at step 2" in capsys.readouterr().out and curve.steps == [2, 4, 6]
    fresh = trained_curve(cfg, load_digits(tmp_path / "fresh", 5))
    assert curve.quality[0] == fresh.quality[0] and len(curve.final) == 5


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
    assert all(c["trained_by"] == fdm_common.TRAINED_BY and len(c["train_loss"]) for c in doc["cells"])
    results = fdm_common.Results(record, mode.classifier_steps)
    data = fdm_common.Digits(torch.zeros(1), None, 0.0, mode.classifier_steps, "", None, None)  # type: ignore[arg-type]
    cells = mode.cells()
    fdm_common.run_cells(cells, results, data, 1)  # would fail on the dummy data if it trained
    assert "Every recorded cell was trained by the product's" in fdm_training.provenance(results)
    del results.doc["cells"][0]["trained_by"]  # as the cells recorded before the switch
    assert "1 of the 4 recorded cells predate that switch" in fdm_training.provenance(results)
    other_w = mode.run.changed(warmup_iters=7)
    assert results.find(fdm_common.Cell("edm", False, 0, "W7", other_w)) is not None
    assert results.find(fdm_common.Cell("edm", True, 0, "W7", other_w)) is None
