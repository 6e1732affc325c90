"""Shared pytest fixtures."""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

TOY2D = Path(__file__).resolve().parent.parent / "pipelines" / "configs" / "toy2d.yaml"
# The toy2d pipeline in seconds: one 4 -> 2 distillation round of 30 updates, evaluated by Euler at 4 steps on
# 200 samples. The base model's train.steps is each test's (the config's 1200 otherwise); a test's own
# settings come after these, and the last --set of a key wins.
TINY_TOY2D = (
    "distill.start_steps=4",
    "distill.end_steps=2",
    "distill.round.updates=30",
    "distill.round.final_updates=30",
    "evaluate.num_samples=200",
    "evaluate.batch_size=200",
    "evaluate.samplers=[{method: euler, steps: 4}]",
)

S3_BUCKET = "fdm-test"
_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups from boto3 or pyarrow
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
}


def tiny_toy2d(work: Path, *extra: str) -> list[str]:
    """TINY_TOY2D with a store and a sqlite MLflow under `work`, then `extra`."""
    where = [f"store.root={work / 'store'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    return [*TINY_TOY2D, *where, *extra]


@pytest.fixture
def toy2d_overrides(tmp_path: Path) -> list[str]:
    """The tiny toy2d overrides (`tiny_toy2d`) with a store and MLflow of this test's own, in tmp_path."""
    return tiny_toy2d(tmp_path)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real-HTTP moto S3 endpoint on 127.0.0.1, fake credentials and bucket S3_BUCKET; yields its URL."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "FDM_S3_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            url = f"http://{host}:{port}"
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket=S3_BUCKET)
            yield url
        finally:
            server.stop()


@pytest.fixture
def s3_root(s3_server: str) -> str:
    """A fresh, empty s3:// prefix in the moto bucket for one test."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray cluster (2 CPUs, 127.0.0.1) for one test module, shut down after it."""
    import ray

    from infra.ray_runtime import init_ray

    started = init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def ray_worker_pid(task_name: str) -> int | None:
    """The worker process Ray titled `ray::<task_name>` while it runs that task (for fault injection)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(f"ray::{task_name}"):
                return int(proc.name)
    return None


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Set before Ray starts and for every process a multi-node test launches: every node stays on 127.0.0.1.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@dataclass
class MultiNode:
    """The running multi-node cluster: `cluster` (ray.cluster_utils.Cluster), its `workers` by custom
    resource name ("node_w1", "node_w2"; each a ray._private.node.Node, `.node_id` its hex id), `gcs`
    (host:port for `--address`/RAY_ADDRESS), `job_api` (http:// for `fdm submit`), `s3` (moto endpoint),
    `tracking` (the `fdm tracking-server` URL), `store_root` (s3://...) and `overrides` (the `--set`s that
    point a pipeline at that store and tracking server)."""

    cluster: Any
    workers: dict[str, Any]
    gcs: str
    job_api: str
    s3: str
    tracking: str
    store_root: str

    @property
    def overrides(self) -> list[str]:
        return [
            f"tracking.uri={self.tracking}",
            f"store.root={self.store_root}",
            f"store.endpoint_url={self.s3}",
        ]

    def add_worker(self, name: str) -> Any:
        """Start a worker node with 2 CPUs and the custom resource `name` (e.g. to replace a removed one)."""
        node = self.cluster.add_node(**worker_node_args(name))
        self.cluster.wait_for_nodes()
        self.workers[name] = node
        return node

    def remove_worker(self, name: str) -> None:
        """Kill the worker node `name` like a lost machine (no graceful drain)."""
        self.cluster.remove_node(self.workers.pop(name), allow_graceful=False)


def worker_node_args(name: str) -> dict[str, Any]:
    """A worker node with 2 CPUs, the custom resource `name`, and its own runtime-env directory, as a
    separate machine has: all nodes of a `Cluster` share one session dir, and Ray's working_dir plugin
    re-unpacks a package (rmtree, then unzip) when a node first uses it, which would pull a submitted job's
    code out from under the driver running on the head."""
    return {"num_cpus": 2, "resources": {name: 1}, "runtime_env_dir_name": f"runtime_resources_{name}"}


def _wait_for_job_api(url: str, timeout: float = 600) -> None:
    """Until the head's job API takes and runs a job (its agent registers some seconds after the head)."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            client = JobSubmissionClient(url)
            job = client.submit_job(entrypoint="true")
            while not client.get_job_status(job).is_terminal():
                time.sleep(0.5)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def multinode(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNode]:
    """A 3-node Ray cluster on 127.0.0.1, shaped like ray_cluster.yaml, for one test module (issue 25).

    `ray.cluster_utils.Cluster`: a head with num_cpus=0 and the job API (dashboard) on, and 2 worker nodes
    with 2 CPUs each and the custom resources {"node_w1": 1} and {"node_w2": 1}, so a test can aim a task at
    a node (`resources={"node_w1": 0.01}`) or kill one (`remove_worker`). Its store is a fresh prefix in
    the moto S3 bucket, its MLflow `fdm tracking-server` (sqlite runs, artifacts proxied to S3). The
    environment (LOOPBACK_ENV, the fake AWS settings) holds for the module and every process it launches.
    Nothing is left running: the tracking server and every Ray node are stopped at the end. Tests that
    remove a node should add its replacement (`add_worker`) if later tests in the module need two."""
    from ray.cluster_utils import Cluster

    from infra.mlflow_server import start_tracking_server, stop_tracking_server

    root = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    tmp = tmp_path_factory.mktemp("multinode")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in LOOPBACK_ENV.items():
            mp.setenv(name, value)
        mp.delenv("RAY_ADDRESS", raising=False)
        # The nodes inherit this PATH, so a submitted job's `fdm` is this venv's, as on an installed cluster
        # (`make test` runs .venv/bin/pytest without activating the venv).
        mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        from ray._private import ray_constants

        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # if Ray was imported before the env var
        port = free_port()
        proc = start_tracking_server(
            f"sqlite:///{tmp / 'mlflow.db'}",
            f"{root}/mlflow",
            port=port,
            env={"MLFLOW_S3_ENDPOINT_URL": s3_server},
        )
        dashboard = free_port()
        cluster = Cluster(
            initialize_head=True,
            connect=False,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard,
                # Ray's fixed default (52365) may be held by another cluster on this machine: no job agent
                "dashboard_agent_listen_port": free_port(),
            },
        )
        try:
            workers = {name: cluster.add_node(**worker_node_args(name)) for name in ("node_w1", "node_w2")}
            cluster.wait_for_nodes()
            _wait_for_job_api(f"http://127.0.0.1:{dashboard}")
            yield MultiNode(
                cluster,
                workers,
                cluster.address,
                f"http://127.0.0.1:{dashboard}",
                s3_server,
                f"http://127.0.0.1:{port}",
                f"{root}/store",
            )
        finally:
            cluster.shutdown()
            stop_tracking_server(proc)
