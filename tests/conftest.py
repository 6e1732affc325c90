"""Shared pytest fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

S3_BUCKET = "fdm-test"
_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups from boto3 or pyarrow
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
}


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
