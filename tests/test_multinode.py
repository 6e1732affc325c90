"""On a real 3-node Ray cluster (the `multinode` fixture: a CPU-0 head and 2 worker nodes on 127.0.0.1,
S3 store, `fdm tracking-server`): `fdm submit` runs the pipeline as a Ray Job, and a driver joining through
RAY_ADDRESS can create actors. Drivers run as separate processes, as a user's would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MultiNode
from mlflow.tracking import MlflowClient
from test_submit import CONFIG, TINY, TINY_STAGES, _sets

from pipelines.submit import REPO_ROOT, mlflow_run_id

pytestmark = pytest.mark.cluster
FDM = [sys.executable, "-m", "pipelines.cli"]


def fdm(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run the `fdm` command line in a new process (this working copy); its exit code and output."""
    proc = subprocess.run(
        [*FDM, *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


def children(tracking: str, run_id: str) -> list:
    client = MlflowClient(tracking)
    exp = client.get_run(run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")


JOIN_AND_CREATE_AN_ACTOR = """
import ray
from infra.ray_runtime import ProgressBoard, init_ray
init_ray(None)
board = ProgressBoard.remote()
board.report.remote("stage", state="running")
print("snapshot", ray.get(board.snapshot.remote(), timeout=60)["stage"]["state"])
"""


def test_a_driver_joining_through_ray_address_creates_actors(multinode: MultiNode, tmp_path: Path) -> None:
    """As a Ray Job's driver joins: RAY_ADDRESS set, no RAY_AUTH_MODE, and a token file in ~/.ray (which
    once switched the driver to token mode against this token-less cluster: its first actor never ran)."""
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 32)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(RAY_ADDRESS=multinode.gcs, HOME=str(tmp_path), PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", JOIN_AND_CREATE_AN_ACTOR], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "snapshot running" in proc.stdout


def test_submit_runs_the_pipeline_on_the_multinode_cluster(multinode: MultiNode) -> None:
    """`fdm submit` of toy2d with an s3:// store and the tracking server: exit 0, one FINISHED child run
    per stage."""
    code, out = fdm(["submit", CONFIG, "--address", multinode.job_api, *_sets([*TINY, *multinode.overrides])])
    assert code == 0, out[-4000:]
    run_id = mlflow_run_id(out)
    runs = children(multinode.tracking, run_id)
    assert {c.data.tags["stage"] for c in runs} == TINY_STAGES
    assert all(c.info.status == "FINISHED" for c in runs)
