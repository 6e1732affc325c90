"""`fdm submit` and `fdm status`: run a pipeline on a Ray cluster as a Ray Job, and look one up later.

    fdm submit pipelines/configs/cifar10.yaml --address http://127.0.0.1:8265 [--set a.b=c]... [--no-wait]
    fdm status JOB_ID --address http://127.0.0.1:8265

The job's entrypoint is `fdm run CONFIG --set ...` on the head node, with this working copy uploaded as its
working_dir (so the cluster runs exactly this code and these configs); it joins the job's cluster through
the RAY_ADDRESS that Ray Jobs set for a driver. The config must be
a file inside the working copy. With token authentication (RAY_AUTH_MODE=token), the token comes from
RAY_AUTH_TOKEN if set, else from Ray's own sources (RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config import ConfigError, load_config

if TYPE_CHECKING:  # Ray loads when a job is submitted or queried, not with the `fdm` command line
    from ray.job_submission import JobStatus, JobSubmissionClient

REPO_ROOT = Path(__file__).resolve().parent.parent
# Never uploaded: environments, local outputs and history (Ray's upload limit is a few hundred MiB).
UPLOAD_EXCLUDES = [
    ".venv",
    ".git",
    "artifacts",
    "mlflow.db",
    "mlruns",
    "benchmarks/results",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
]
RUN_ID_LINE = re.compile(r"MLflow run id:\s*([0-9a-f]{32})")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: Any) -> None:
    """Register `submit` and `status` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "submit", help="run a pipeline on a Ray cluster as a Ray Job", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("config", help="pipeline YAML inside this working copy (see pipelines/configs/)")
    p.add_argument("--address", required=True, help="the cluster's job API, e.g. http://127.0.0.1:8265")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="as `fdm run`"
    )
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following")
    s = subparsers.add_parser("status", help="status and MLflow run id of a submitted pipeline job")
    s.add_argument("job_id")
    s.add_argument("--address", required=True, help="the cluster's job API, e.g. http://127.0.0.1:8265")


def job_client(address: str) -> JobSubmissionClient:
    """A job client for `address`, sending RAY_AUTH_TOKEN as the bearer token when it is set."""
    from ray.job_submission import JobSubmissionClient

    token = os.environ.get("RAY_AUTH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def entrypoint(config: str | Path, overrides: list[str]) -> str:
    """The job's shell command: `fdm run` on the uploaded copy of `config`; it joins the job's cluster
    through RAY_ADDRESS, which Ray Jobs set for the driver."""
    path = Path(config).resolve()
    try:
        rel = path.relative_to(REPO_ROOT)
    except ValueError:
        raise ConfigError(f"{config}: must be inside {REPO_ROOT} (the job's uploaded working_dir)") from None
    args = ["fdm", "run", rel.as_posix(), *[a for o in overrides for a in ("--set", o)]]
    return shlex.join(args)


def pipeline_job(config: str | Path, overrides: list[str]) -> dict[str, Any]:
    """The Ray Job for a pipeline (submit_job's arguments); validated here, so a bad config fails before
    anything is uploaded."""
    load_config(config, overrides)
    if not (REPO_ROOT / "pyproject.toml").is_file():  # an installed copy: site-packages is no working_dir
        raise ConfigError(f"fdm submit runs from a source checkout (pip install -e); {REPO_ROOT} is not one")
    return {
        "entrypoint": entrypoint(config, overrides),
        "runtime_env": {"working_dir": str(REPO_ROOT), "excludes": UPLOAD_EXCLUDES},
        "metadata": {"fdm_config": Path(config).name},
    }


def mlflow_run_id(logs: str) -> str | None:
    """The pipeline's MLflow run id, from the line `fdm run` prints first."""
    m = RUN_ID_LINE.search(logs)
    return m.group(1) if m else None


def follow(
    client: JobSubmissionClient, job_id: str, echo: Callable[[str], None], poll_seconds: float = 1.0
) -> JobStatus:
    """Echo the job's logs as they grow until it reaches a terminal status; returns that status."""
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            echo(logs[shown:])
            shown = len(logs)
        if status.is_terminal():
            return status
        time.sleep(poll_seconds)


def job_exit_code(client: JobSubmissionClient, job_id: str) -> int:
    """`fdm run`'s own exit code for a finished job (0 ok, 2 bad input, 1 failed); 1 if it never ran."""
    from ray.job_submission import JobStatus

    info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        return EXIT_OK
    return info.driver_exit_code if info.driver_exit_code in (EXIT_FAILED, EXIT_USAGE) else EXIT_FAILED


def run(args: argparse.Namespace) -> int:
    """`fdm submit` or `fdm status`; exit codes as `fdm run`'s (a running job's status exits 0)."""
    try:
        job = pipeline_job(args.config, args.overrides) if args.command == "submit" else {}
        client = job_client(args.address)
        if args.command == "status":
            info = client.get_job_info(args.job_id)
            print(f"job {args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
            print(f"MLflow run id: {mlflow_run_id(client.get_job_logs(args.job_id)) or 'not yet known'}")
            return job_exit_code(client, args.job_id) if info.status.is_terminal() else EXIT_OK
        job_id = client.submit_job(**job)
    except (ConnectionError, RuntimeError) as err:  # unreachable cluster, bad token, unknown job id
        print(f"fdm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"submitted job {job_id}  (fdm status {job_id} --address {args.address})", flush=True)
    if args.no_wait:
        return EXIT_OK
    status = follow(client, job_id, lambda text: print(text, end="", flush=True))
    logs = client.get_job_logs(job_id)
    print(f"\njob {job_id}: {status}; MLflow run id: {mlflow_run_id(logs) or 'none (the run never started)'}")
    return job_exit_code(client, job_id)
