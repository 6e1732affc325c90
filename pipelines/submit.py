"""`fdm submit`, `fdm status` and `fdm logs`: run a pipeline on a Ray cluster as a Ray Job, and follow it.

    fdm submit pipelines/configs/cifar10.yaml --address http://127.0.0.1:8265 [--set a.b=c]... [--no-wait]
    fdm status JOB_ID --address http://127.0.0.1:8265     # the job, and its pipeline's stage table
    fdm logs JOB_ID --address http://127.0.0.1:8265 [--follow]

The job's entrypoint is `fdm run CONFIG --set ...` on the head node, with this working copy uploaded as its
working_dir (so the cluster runs exactly this code and these configs); it joins the job's cluster through
the RAY_ADDRESS that Ray Jobs set for a driver. The config must be
a file inside the working copy. The job's working directory is temporary, so a relative tracking URI or
store root would lose the results: they are refused unless --allow-local. The job's log has one line per
stage transition and the pipeline's MLflow run id and tracking URI, from which `fdm status` reads the stage
table. With token authentication (RAY_AUTH_MODE=token), the token comes from
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

from pipelines.config import ConfigError, PipelineConfig, load_config

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
UI_LINE = re.compile(r"^MLflow UI: (.+)$", re.M)
RUN_ID_LINE = re.compile(r"MLflow run id:\s*([0-9a-f]{32})(?:\s+\(tracking (\S+)\))?")
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
    p.add_argument(
        "--allow-local",
        action="store_true",
        help="submit even with a relative tracking.uri or store.root (they end up in the job's temporary "
        "working directory on the cluster); the job's `fdm run` gets --allow-local too",
    )
    s = subparsers.add_parser(
        "status", help="status, MLflow run id and stage table of a submitted pipeline job"
    )
    s.add_argument("job_id", help="the id `fdm submit` printed")
    s.add_argument("--address", required=True, help="the cluster's job API, e.g. http://127.0.0.1:8265")
    s.add_argument(
        "--tracking-uri", default=None, help="where to read the stages (default: the URI the job's log names)"
    )
    g = subparsers.add_parser("logs", help="the log of a submitted pipeline job")
    g.add_argument("job_id", help="the id `fdm submit` printed")
    g.add_argument("--address", required=True, help="the cluster's job API, e.g. http://127.0.0.1:8265")
    g.add_argument("--follow", action="store_true", help="keep printing as the log grows, until the job ends")


def job_client(address: str) -> JobSubmissionClient:
    """A job client for `address`, sending RAY_AUTH_TOKEN as the bearer token when it is set."""
    from ray.job_submission import JobSubmissionClient

    token = os.environ.get("RAY_AUTH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def entrypoint(config: str | Path, overrides: list[str], allow_local: bool = False) -> str:
    """The job's shell command: `fdm run` on the uploaded copy of `config` (with --allow-local if asked);
    it joins the job's cluster through RAY_ADDRESS, which Ray Jobs set for the driver."""
    path = Path(config).resolve()
    try:
        rel = path.relative_to(REPO_ROOT)
    except ValueError:
        raise ConfigError(f"{config}: must be inside {REPO_ROOT} (the job's uploaded working_dir)") from None
    args = ["fdm", "run", rel.as_posix(), *[a for o in overrides for a in ("--set", o)]]
    if allow_local:
        args.append("--allow-local")
    return shlex.join(args)


def local_paths(cfg: PipelineConfig) -> list[str]:
    """The settings of `cfg` that name relative local paths: on a cluster they would resolve inside the job's
    temporary working directory, and the results would be lost with it."""
    found = []
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///"):
        relative = not uri.startswith("sqlite:////")
    elif uri.startswith("file:"):
        relative = not uri.removeprefix("file:").startswith("/")
    else:
        relative = "://" not in uri and not Path(uri).is_absolute()
    if relative:
        found.append(f"tracking.uri={uri}")
    root = cfg.store.root
    if "://" not in root and not Path(root).is_absolute():
        found.append(f"store.root={root}")
    return found


def pipeline_job(config: str | Path, overrides: list[str], allow_local: bool = False) -> dict[str, Any]:
    """The Ray Job for a pipeline (submit_job's arguments); validated here, so a bad config (or one whose
    results would stay in the job's temporary directory, unless `allow_local`) fails before anything is
    uploaded."""
    cfg = load_config(config, overrides)
    if not (REPO_ROOT / "pyproject.toml").is_file():  # an installed copy: site-packages is no working_dir
        raise ConfigError(f"fdm submit runs from a source checkout (pip install -e); {REPO_ROOT} is not one")
    command = entrypoint(config, overrides, allow_local)
    local = local_paths(cfg)
    if local and not allow_local:
        raise ConfigError(
            f"{' and '.join(local)}: relative, so the job would keep its results in its temporary working "
            "directory on the cluster, where they are lost. Track to a shared MLflow server (`fdm "
            "tracking-server` on the head, then --set tracking.uri=http://HEAD:5000) and store in S3 "
            "(--set store.root=s3://BUCKET/fdm), or give absolute paths on a filesystem the cluster shares; "
            "--allow-local submits anyway"
        )
    return {
        "entrypoint": command,
        "runtime_env": {"working_dir": str(REPO_ROOT), "excludes": UPLOAD_EXCLUDES},
        "metadata": {"fdm_config": Path(config).name},
    }


def mlflow_run_id(logs: str) -> str | None:
    """The pipeline's MLflow run id, from the line `fdm run` prints first."""
    m = RUN_ID_LINE.search(logs)
    return m.group(1) if m else None


def mlflow_ui_link(logs: str) -> str | None:
    """Where to open the pipeline's run in the MLflow UI (in model-training mode), as `fdm run` printed it."""
    found = UI_LINE.search(logs)
    return found.group(1).strip() if found else None


def mlflow_tracking_uri(logs: str) -> str | None:
    """The tracking URI the pipeline logs to, from the same line."""
    m = RUN_ID_LINE.search(logs)
    return m.group(2) if m else None


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


def _stages(tracking_uri: str, run_id: str) -> None:
    """Print the pipeline run's stage table (from MLflow), or one line saying why it cannot be read here."""
    from rich.console import Console

    from pipelines.stages_cmd import past_stages

    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        console.print(past_stages(tracking_uri, run_id))
    except Exception as err:  # e.g. a sqlite file on the head, or a server not reachable from here
        print(f"stages: cannot read run {run_id} at {tracking_uri} from here ({type(err).__name__}: {err})")


def status(client: JobSubmissionClient, job_id: str, tracking_uri: str | None) -> int:
    """`fdm status`: the job's status, its pipeline's MLflow run id and stage table."""
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    logs = client.get_job_logs(job_id)
    run_id = mlflow_run_id(logs)
    print(f"MLflow run id: {run_id or 'not yet known'}")
    link = mlflow_ui_link(logs)
    if link:
        print(f"MLflow UI: {link}")
    tracking_uri = tracking_uri or mlflow_tracking_uri(logs)
    if run_id and tracking_uri:
        _stages(tracking_uri, run_id)
    return job_exit_code(client, job_id) if info.status.is_terminal() else EXIT_OK


def _echo(text: str) -> None:
    print(text, end="", flush=True)


def run(args: argparse.Namespace) -> int:
    """`fdm submit`, `fdm status` or `fdm logs`; exit codes as `fdm run`'s (a running job's status and
    log exit 0)."""
    try:
        job = pipeline_job(args.config, args.overrides, args.allow_local) if args.command == "submit" else {}
        client = job_client(args.address)
        if args.command == "status":
            return status(client, args.job_id, args.tracking_uri)
        if args.command == "logs":
            if not args.follow:
                _echo(client.get_job_logs(args.job_id))
                return EXIT_OK
            follow(client, args.job_id, _echo)
            return job_exit_code(client, args.job_id)
        job_id = client.submit_job(**job)
    except (ConnectionError, RuntimeError) as err:  # unreachable cluster, bad token, unknown job id
        print(f"fdm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"submitted job {job_id}  (fdm status {job_id} --address {args.address})", flush=True)
    if args.no_wait:
        return EXIT_OK
    final = follow(client, job_id, _echo)
    logs = client.get_job_logs(job_id)
    print(f"\njob {job_id}: {final}; MLflow run id: {mlflow_run_id(logs) or 'none (the run never started)'}")
    return job_exit_code(client, job_id)
