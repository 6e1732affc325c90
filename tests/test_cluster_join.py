"""Joining a Ray cluster fails fast and clearly: an unreachable `--address` ends `fdm run` and `fdm rerun`
within seconds with one line naming the address (exit 2), not after Ray's minutes of retries. The token-auth
case needs a live head: tests/test_submit.py::test_joining_with_a_wrong_token_fails_fast_naming_the_setting.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from test_submit import CONFIG, TINY, _sets, free_ports

from infra.tracking import Tracking
from pipelines.cli import main
from pipelines.config import load_config
from pipelines.submit import REPO_ROOT


@pytest.fixture
def dead_address() -> str:
    (port,) = free_ports(1)  # free: nothing listens there
    return f"127.0.0.1:{port}"


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return [*TINY, f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def _fails_fast(argv: list[str], address: str, capsys: pytest.CaptureFixture) -> str:
    t0 = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - t0 < 20
    out = capsys.readouterr().out
    assert address in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out
    return out


def test_run_with_an_unreachable_address_exits_2_at_once(
    dead_address: str, local: list[str], capsys: pytest.CaptureFixture
) -> None:
    argv = ["run", CONFIG, *_sets(local), "--address", dead_address]
    assert "cannot reach the Ray cluster" in _fails_fast(argv, dead_address, capsys)


def test_run_with_ray_address_set_to_a_dead_cluster_exits_2(
    dead_address: str, local: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", dead_address)  # as `ray job submit -- fdm run CONFIG` would
    _fails_fast(["run", CONFIG, *_sets(local)], dead_address, capsys)


def test_run_with_a_job_api_url_as_address_says_what_to_give(
    local: list[str], capsys: pytest.CaptureFixture
) -> None:
    url = "http://127.0.0.1:8265"
    assert "GCS host:port" in _fails_fast(["run", CONFIG, *_sets(local), "--address", url], url, capsys)


def test_rerun_with_an_unreachable_address_exits_2_at_once(
    dead_address: str, local: list[str], capsys: pytest.CaptureFixture
) -> None:
    cfg = load_config(REPO_ROOT / CONFIG, local)
    tracking = Tracking.setup(cfg.tracking.uri, cfg.tracking.experiment)
    run_id = tracking.start_parent(cfg.name, {}, {})
    tracking.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json")), "config.yaml")
    argv = ["rerun", run_id, "--stage", "prepare_data", "--tracking-uri", cfg.tracking.uri]
    _fails_fast([*argv, "--address", dead_address], dead_address, capsys)
