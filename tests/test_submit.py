"""`fdm submit` / `fdm status` against a real local Ray head (token auth on, 127.0.0.1): a tiny toy2d
pipeline runs as a Ray Job from the uploaded working copy and lands in MLflow with one child run per stage."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY_TOY2D
from mlflow.tracking import MlflowClient
from ray.job_submission import JobSubmissionClient

from pipelines import submit
from pipelines.cli import main
from pipelines.config import ConfigError
from pipelines.submit import REPO_ROOT, entrypoint, mlflow_run_id, mlflow_ui_link, pipeline_job

CONFIG = "pipelines/configs/toy2d.yaml"
# The tiny toy2d without distillation (its settings then plan nothing): data, base model, its evaluation.
TINY = [
    *TINY_TOY2D,
    "distill.enabled=false",
    "train.steps=100",
    "train.checkpoint_every=50",
    "evaluate.samplers=[{method: heun, steps: 4}]",
]
TINY_STAGES = {"prepare_data", "train_base", "evaluate_base"}


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@dataclass(frozen=True)
class Head:
    job_api: str  # http://127.0.0.1:PORT, for `fdm submit`
    gcs: str  # 127.0.0.1:PORT, for `fdm run --address` and RAY_ADDRESS
    token: str


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Head]:
    """A Ray head (`ray start --head --block`, 2 CPUs, token auth) on 127.0.0.1.

    Started from this venv's `ray`, so job drivers run this venv's python and `fdm`. Stopped by signalling
    the process group it was started in (not `ray stop`, which would stop every Ray on the machine)."""
    token = secrets.token_hex(16)
    gcs, dashboard, client, agent = free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="fdmray", dir="/tmp")  # short: Ray's socket paths have a length limit
    venv_bin = Path(sys.executable).parent
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once on SIGTERM, no draining
        "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    with Path(temp_dir, "head.log").open("wb") as log:  # the child keeps its own handle
        proc = subprocess.Popen(
            [
                str(venv_bin / "ray"),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}",
                "--num-cpus=2",
                "--num-gpus=0",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_AUTH_TOKEN", token)  # what `fdm submit` sends as its bearer token
            deadline = time.monotonic() + 120
            while True:
                try:
                    JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
                    break
                except Exception:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            "Ray head did not start:\n" + Path(temp_dir, "head.log").read_text()[-3000:]
                        ) from None
                    time.sleep(1)
            yield Head(address, f"127.0.0.1:{gcs}", token)
    finally:
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):  # SIGKILL: stragglers only
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the head's process group: every Ray process it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait_s)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(ray_cluster: Head) -> str:
    """The head's job API URL."""
    return ray_cluster.job_api


def test_job_entrypoint_and_upload() -> None:
    """The entrypoint re-parses to `fdm run` with the same overrides and no address (the job's driver joins
    through the RAY_ADDRESS Ray Jobs set); local clutter is never uploaded."""
    cmd = shlex.split(entrypoint(REPO_ROOT / CONFIG, TINY))
    assert cmd[:3] == ["fdm", "run", CONFIG] and cmd[3:] == _sets(TINY)
    job = pipeline_job(CONFIG, TINY, allow_local=True)
    assert job["runtime_env"]["working_dir"] == str(REPO_ROOT)
    assert {".venv", "artifacts", "mlflow.db", ".git", "benchmarks/results"} <= set(
        job["runtime_env"]["excludes"]
    )
    assert mlflow_run_id("x\nMLflow run id: " + "ab" * 16 + "  (tracking sqlite:///m.db)\n") == "ab" * 16
    link = "http://h:5000/#/experiments/1/runs/ab?workflowType=machine_learning"
    assert mlflow_ui_link(f"x\nMLflow UI: {link}\n12:00:00 stage a started\n") == link


def test_bad_config_or_config_outside_the_repo_exit_2_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    nowhere = "http://127.0.0.1:9"  # nothing listens: reaching it would be a different error
    assert main(["submit", CONFIG, "--address", nowhere, "--set", "bogus.key=1"]) == 2
    assert "bogus: unknown key" in capsys.readouterr().out
    outside = tmp_path / "toy.yaml"
    shutil.copy(REPO_ROOT / CONFIG, outside)
    assert main(["submit", str(outside), "--address", nowhere]) == 2
    assert "working_dir" in capsys.readouterr().out.replace("\n", "")


def test_submit_refuses_relative_tracking_and_store_unless_allowed(capsys: pytest.CaptureFixture) -> None:
    """A relative sqlite tracking URI or store root would end in the job's temporary working directory:
    refused (exit 2, before connecting) with what to use instead, unless --allow-local."""
    nowhere = "http://127.0.0.1:9"
    assert main(["submit", CONFIG, "--address", nowhere]) == 2  # toy2d.yaml: sqlite:///mlflow.db, artifacts
    out = capsys.readouterr().out.replace("\n", " ")
    assert "tracking.uri=sqlite:///mlflow.db and store.root=artifacts: relative" in out
    assert "fdm tracking-server" in out and "s3://" in out and "--allow-local" in out
    assert main(["submit", CONFIG, "--address", nowhere, "--set", "store.root=s3://b/fdm"]) == 2
    assert "tracking.uri=sqlite:///mlflow.db: relative" in capsys.readouterr().out
    shared = ["tracking.uri=sqlite:////shared/mlflow.db", "store.root=/shared/fdm"]
    assert pipeline_job(CONFIG, shared)["entrypoint"].startswith("fdm run")
    assert pipeline_job(CONFIG, ["tracking.uri=http://10.0.0.5:5000", "store.root=s3://b/fdm"])
    assert pipeline_job(CONFIG, [], allow_local=True)


def test_submit_refuses_an_installed_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(submit, "REPO_ROOT", tmp_path)  # e.g. site-packages: no pyproject.toml
    with pytest.raises(ConfigError, match="source checkout"):
        pipeline_job(REPO_ROOT / CONFIG, [])


def test_submit_runs_the_pipeline_as_a_ray_job(
    ray_head: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*TINY, f"store.root={tmp_path / 'store'}", f"tracking.uri={tracking}"]
    code = main(["submit", CONFIG, "--address", ray_head, *_sets(overrides)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    job_id = re.search(r"submitted job (\S+)", out).group(1)
    assert f"job {job_id}: SUCCEEDED" in out
    run_id = mlflow_run_id(out)
    assert run_id and out.rstrip().endswith(run_id)

    client = MlflowClient(tracking)
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    assert {c.data.tags["stage"] for c in children} == TINY_STAGES
    assert all(c.info.status == "FINISHED" for c in children)
    assert (tmp_path / "store" / "stages" / "train_base").is_dir()

    # The job's log: one line per stage transition, as it happened (stdout is no terminal there).
    for name in TINY_STAGES:
        started = out.index(f"stage {name} started")
        assert started < out.index(f"stage {name} done in ")
    assert out.index("stage prepare_data done") < out.index("stage train_base started")

    assert main(["status", job_id, "--address", ray_head]) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and run_id in out
    assert f"/runs/{run_id}?workflowType=machine_learning" in out  # the link opens the run in model training
    table = out[out.index(f"pipeline run {run_id}") :]  # the stage table, read from MLflow
    assert all(name in table for name in TINY_STAGES) and "finished" in table

    assert main(["logs", job_id, "--address", ray_head]) == 0
    logs = capsys.readouterr().out
    assert f"MLflow run id: {run_id}" in logs and "stage evaluate_base done" in logs
    assert main(["logs", job_id, "--address", ray_head, "--follow"]) == 0  # an ended job: its log, then 0
    assert capsys.readouterr().out == logs


def test_joining_with_a_wrong_token_fails_fast_naming_the_setting(
    ray_cluster: Head, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A token-auth cluster joined without the token (RAY_ADDRESS set, as `ray job submit -- fdm run` does):
    one line that says to set RAY_AUTH_MODE=token and where the token comes from, exit 2, in seconds."""
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.gcs)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token for Ray to find by itself
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(name, "")  # recorded, so the test's end restores what was there
        monkeypatch.delenv(name)
    overrides = [*TINY, f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    t0 = time.monotonic()
    assert main(["run", CONFIG, *_sets(overrides)]) == 2
    assert time.monotonic() - t0 < 20
    out = capsys.readouterr().out
    assert ray_cluster.gcs in out and "RAY_AUTH_MODE=token" in out and "RAY_AUTH_TOKEN" in out
    assert "~/.ray/auth_token" in out and "Traceback" not in out
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 32)  # a wrong one
    assert main(["run", CONFIG, *_sets(overrides)]) == 2
    assert "refused this client" in capsys.readouterr().out
