"""A shared MLflow tracking server: SQL backend for runs, proxied artifacts stored under an S3 (or local) URI.

Workers on any node log to `http://HOST:PORT`; artifacts travel through the server (`--serve-artifacts`) to
`--artifacts-destination`, so only the server needs S3 credentials (and MLFLOW_S3_ENDPOINT_URL for an
S3-compatible endpoint). It binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any


class TrackingServerError(RuntimeError):
    """The server exited or did not answer its health check in time."""


def server_command(backend: str, artifacts: str, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The `mlflow server` command line (one worker: a sqlite backend does not take concurrent writers)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def start_tracking_server(
    backend: str,
    artifacts: str,
    host: str = "127.0.0.1",
    port: int = 5000,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> subprocess.Popen:
    """Start `mlflow server` and wait until it answers /health; `env` adds to this process's environment."""
    proc = subprocess.Popen(
        server_command(backend, artifacts, host, port),
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group, so stop_tracking_server ends its workers too
    )
    url = f"http://{host}:{port}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrackingServerError(
                f"mlflow server exited with code {proc.returncode} before serving {url}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    stop_tracking_server(proc)
    raise TrackingServerError(f"mlflow server did not answer {url} within {timeout:.0f} s")


def stop_tracking_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a server from start_tracking_server: SIGTERM to its process group, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    pgid = os.getpgid(proc.pid)
    os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        proc.wait()


def add_parser(subparsers: Any) -> None:
    """Register `tracking-server` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "tracking-server",
        help="run a shared MLflow tracking server (SQL backend, artifacts proxied to S3)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--backend", default="sqlite:///mlflow.db", help="SQLAlchemy URI of the run store")
    p.add_argument("--artifacts", required=True, help="artifact destination, e.g. s3://bucket/mlflow")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port to listen on (default 5000)")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM); exit 1 if the server fails to start or dies."""
    try:
        proc = start_tracking_server(args.backend, args.artifacts, args.host, args.port)
    except TrackingServerError as err:
        print(f"fdm tracking-server: {err}", file=sys.stderr)
        return 1
    print(f"MLflow tracking server at http://{args.host}:{args.port} (artifacts -> {args.artifacts})")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on SIGTERM too
    try:
        return 0 if proc.wait() == 0 else 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_tracking_server(proc)
