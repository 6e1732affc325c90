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


def stage_runs(tracking: str, run_id: str, stage: str) -> list:
    return sorted(
        (c for c in children(tracking, run_id) if c.data.tags.get("stage") == stage),
        key=lambda c: c.info.start_time,
    )


def test_a_local_store_on_several_nodes_exits_2_unless_allowed(multinode: MultiNode, tmp_path: Path) -> None:
    """A local store root and sqlite tracking on a 3-node cluster: refused at once, naming both settings
    and what to use; --allow-local (this machine's disk is shared by its nodes) runs, each stage tagged with
    the node it ran on and its attempt."""
    local = [*TINY, f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    code, out = fdm(["run", CONFIG, "--address", multinode.gcs, *_sets(local)])
    assert code == 2, out[-3000:]
    text = " ".join(out.split())
    assert "store.root=" in text and "tracking.uri=sqlite" in text and "3 nodes" in text
    assert "s3://" in text and "shared" in text and "--allow-local" in text and "Traceback" not in text

    code, out = fdm(["run", CONFIG, "--address", multinode.gcs, "--allow-local", *_sets(local)])
    assert code == 0, out[-3000:]
    run_id = mlflow_run_id(out)
    tracking = f"sqlite:///{tmp_path / 'm.db'}"
    workers = {n.node_id for n in multinode.workers.values()}
    for c in children(tracking, run_id):
        assert c.data.tags["fdm.node_id"] in workers and c.data.tags["fdm.node_ip"] == "127.0.0.1"
        assert c.data.tags["fdm.attempt"] == "1"
    code, out = fdm(["stages", run_id, "--tracking-uri", tracking])
    assert code == 0 and "attempt" in out and "node" in out


INFEASIBLE = """
import time
import ray
from infra.placement import Unplaceable
from infra.ray_evaluator import RayEvaluator
from infra.ray_runtime import init_ray
init_ray(None)
def factory():
    return None
@ray.remote(num_cpus=1)
class Holder:  # one CPU of a worker node in use while the "busy" request waits
    def ping(self):
        return True
holder = Holder.remote()
ray.get(holder.ping.remote())
for label, kwargs in [
    ("spread", dict(actors=3, strategy="STRICT_SPREAD", num_cpus=0.5)),
    ("gpu", dict(actors=1, num_gpus=1)),
    ("busy", dict(actors=2, strategy="STRICT_SPREAD", num_cpus=2, ready_timeout_s=3)),
]:
    t0 = time.monotonic()
    try:
        RayEvaluator(factory, **kwargs)
    except Unplaceable as err:
        print(label, round(time.monotonic() - t0, 1), err, flush=True)
"""


def test_placement_that_cannot_happen_fails_at_once_naming_request_and_cluster(multinode: MultiNode) -> None:
    """STRICT_SPREAD over 3 nodes when 2 can hold actors, and a GPU on this CPU-only cluster, fail at once;
    2 whole nodes while an actor holds a CPU of one fails after its timeout; each line names the request and
    the nodes. A stage asking for more CPUs than any node has stops `fdm run` with exit 2 before it runs."""
    proc = subprocess.run(
        [sys.executable, "-c", INFEASIBLE],
        env={**os.environ, "RAY_ADDRESS": multinode.gcs, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert set(lines) == {"spread", "gpu", "busy"}, proc.stdout + proc.stderr[-3000:]
    for line in lines.values():
        assert float(line.split()[1]) < 60
        assert "3 alive nodes" in line and "CPU: 2" in line and "node_w1: 1" in line, line
    assert "3 x {'CPU': 0.5} (STRICT_SPREAD)" in lines["spread"] and "never" in lines["spread"]
    assert "'GPU': 1" in lines["gpu"] and "never" in lines["gpu"]
    assert "not placed within 3 s" in lines["busy"] and "placement_timeout" in lines["busy"]

    overrides = [*TINY, *multinode.overrides, "resources.train.num_cpus=3"]
    code, out = fdm(["run", CONFIG, "--address", multinode.gcs, *_sets(overrides)])
    assert code == 2, out[-3000:]
    text = " ".join(out.split())
    assert "stage train_base (resources.train): 1 x {'CPU': 3" in text and "3 alive nodes" in text
