"""Smoke test of the FDM benchmarks: their tiny modes (a few steps) build a full report and a PNG plot."""

from __future__ import annotations

import pytest

from benchmarks import fdm_sampling, fdm_training
from benchmarks.fdm_common import first_reach


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
