"""MLflow adapter: one parent run per pipeline run, one child run per stage, with explicit run ids.

The active run does not cross process boundaries, so workers receive the tracking URI, experiment id and
parent run id explicitly. Parameters are flattened; secrets (values under secret-looking keys, credentials
inside URIs) are redacted in params, tags and logged text (infra/secrets.py).
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from infra.secrets import REDACTED, SECRET_KEY, scrub

_SECRET = SECRET_KEY


def resolve_tracking_uri(uri: str) -> str:
    """Make sqlite and file URIs absolute, so Ray workers with another cwd reach the same store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def existing_store(uri: str) -> str:
    """The resolved tracking URI of a store that must already exist (for reading past runs): a sqlite URI
    naming a missing file is an error, never a new empty database."""
    resolved = resolve_tracking_uri(uri)
    if resolved.startswith("sqlite:///") and not Path(resolved[len("sqlite:///") :]).is_file():
        raise LookupError(f"--tracking-uri {uri}: no MLflow database at {resolved[len('sqlite:///') :]}")
    return resolved


def provenance_tags(command: str, repo: Path | None = None) -> dict[str, str]:
    """MLflow's standard source tags for a run started by `command`: user, source, and the git commit of
    `repo` (with "+dirty" when the working tree has uncommitted changes) when it is a git checkout."""
    tags = {
        "mlflow.user": getpass.getuser(),
        "mlflow.source.name": command,
        "mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_ID") else "LOCAL",
    }
    if repo is not None:
        try:
            commit = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            commit = ""
        if commit:
            tags["mlflow.source.git.commit"] = commit + ("+dirty" if dirty else "")
    return tags


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b.c': 'value'}, secrets redacted, values cut to MLflow's 6000-char limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif _SECRET.search(str(key)):
            flat[name] = REDACTED
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            flat[name] = scrub(text)[:6000]
    return flat


# MLflow 3.17's UI takes its mode (GenAI or model training) from the page URL's `workflowType` parameter,
# else from the browser's local storage (key `mlflow.workflowType`, default genai, written only when the
# user clicks the sidebar's "Model training" toggle); experiment tags play no part. Every link the product
# prints carries the parameter, so it opens the runs whatever the browser has stored.
MODEL_TRAINING = "workflowType=machine_learning"


def ui_path(experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's path (after the host) of an experiment's runs, or of one run, in model training."""
    page = f"runs/{run_id}" if run_id else "runs"
    return f"#/experiments/{experiment_id}/{page}?{MODEL_TRAINING}"


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where to open a run in the MLflow UI: its URL on a tracking server; for a local store (sqlite, a
    directory), the `mlflow ui` command that serves it and the URL the run then has."""
    path = ui_path(experiment_id, run_id)
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{path}"
    return f"run `mlflow ui --backend-store-uri {tracking_uri}`, then open http://127.0.0.1:5000/{path}"


# MLflow's experiment kind: the experiment page's kind selector shows "Machine learning" with it. It does
# not choose the page the UI opens on (that is `workflowType`, above).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


@dataclass(frozen=True)
class Tracking:
    """Where runs go: picklable, so it can be handed to Ray workers."""

    tracking_uri: str
    experiment_id: str

    @classmethod
    def setup(cls, tracking_uri: str, experiment: str, artifact_root: str | None = None) -> Tracking:
        """Resolve the URI and get or create the experiment (artifacts under `artifact_root` if new), of
        MLflow's kind for model training."""
        uri = resolve_tracking_uri(tracking_uri)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return cls(uri, exp.experiment_id)
        location = artifact_root
        if location is None and uri.startswith("sqlite:"):
            location = Path(uri[len("sqlite:///") :]).resolve().parent.joinpath("mlruns").as_uri()
        tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        return cls(uri, client.create_experiment(experiment, artifact_location=location, tags=tags))

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def start_parent(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        clean = {k: REDACTED if _SECRET.search(k) else scrub(str(v)) for k, v in tags.items()}
        run = self.client.create_run(self.experiment_id, run_name=scrub(name), tags=clean)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_child(self, parent_run_id: str, name: str, tags: Mapping[str, str]) -> str:
        clean = {k: REDACTED if _SECRET.search(k) else scrub(str(v)) for k, v in tags.items()}
        tags = {"mlflow.parentRunId": parent_run_id, **clean}
        return self.client.create_run(self.experiment_id, run_name=scrub(name), tags=tags).info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = list(flatten(params).items())
        for i in range(0, len(items), 100):
            batch = [mlflow.entities.Param(k, v) for k, v in items[i : i + 100]]
            self.client.log_batch(run_id, params=batch)

    def log_metrics(
        self,
        run_id: str,
        metrics: Mapping[str, float],
        step: int = 0,
        model_id: str | None = None,
        dataset: tuple[str, str] | None = None,
    ) -> None:
        """Log `metrics` at `step`; with `model_id`, linked to that logged model (MLflow 3 shows them on
        the model and ranks models by them), and with `dataset` (name, digest), to the data they measure."""
        clean = _metrics(metrics, step, model_id, dataset)
        if clean:
            self.client.log_batch(run_id, metrics=clean)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, REDACTED if _SECRET.search(k) else scrub(str(v)))

    def log_artifact(
        self, run_id: str, local_path: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        self.client.log_artifact(run_id, str(local_path), artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, scrub(text), name)

    def log_bytes(self, run_id: str, data: bytes, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, Path(name).name)
            path.write_bytes(data)
            parent = str(Path(name).parent)
            self.log_artifact(run_id, path, None if parent == "." else parent)

    def log_model_inputs(self, run_id: str, model_ids: list[str]) -> None:
        """Record logged models (by id) as inputs of the run, e.g. a distillation round's teacher."""
        from mlflow.entities import LoggedModelInput

        self.client.log_inputs(run_id, models=[LoggedModelInput(model_id) for model_id in model_ids])

    def log_dataset(self, run_id: str, uri: str, name: str, digest: str, context: str = "training") -> None:
        """Record the dataset at `uri` (a Parquet directory) as an input of the run, the MLflow way."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # MLflow warns that a path could be several kinds of source
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(uri)
        dataset = MetaDataset(source, name=name, digest=digest[:36])._to_mlflow_entity()
        self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def close_stale(
        self, parent_run_id: str, stage: str | None = None, status: str = "KILLED", reason: str = ""
    ) -> int:
        """Mark child runs (of `stage`, or all) still RUNNING as `status`: KILLED when their worker died
        before a retry or the run was interrupted, FAILED when the stage's retries are used up; `reason`
        goes to their `fdm.end_reason` tag, "{node}" in it replaced by the node the run was on."""
        only = f" and tags.stage = '{stage}'" if stage else ""
        stale = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'{only} "
            "and attributes.status = 'RUNNING'",
        )
        for run in stale:
            if reason:
                tags = run.data.tags
                node = f"{tags.get('fdm.node_id', '?')[:8]} ({tags.get('fdm.node_ip', '?')})"
                self.set_tags(run.info.run_id, {"fdm.end_reason": reason.replace("{node}", node)})
            self.end(run.info.run_id, status)
        return len(stale)

    def attempts(self, parent_run_id: str, stage: str) -> int:
        """How many computing attempts of `stage` (child runs tagged `fdm.attempt`) the parent run has."""
        return len(
            self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = '{stage}' "
                "and tags.`fdm.attempt` LIKE '%'",
            )
        )

    def fail_orphans(self, host: str, alive: Callable[[int, float], bool]) -> list[str]:
        """Mark RUNNING parent runs of this experiment whose driver (tags fdm.driver_host/pid/started) ran on
        `host` and is gone, and their RUNNING children, FAILED; returns their run ids."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`fdm.driver_host` = '{host}' and attributes.status = 'RUNNING'",
        )
        gone = []
        for run in runs:
            tags = run.data.tags
            try:
                pid, started = int(tags["fdm.driver_pid"]), _epoch(tags.get("fdm.driver_started", "0"))
            except (KeyError, ValueError):
                continue
            if alive(pid, started):
                continue
            self.close_stale(run.info.run_id, status="FAILED")
            self.client.set_tag(run.info.run_id, "fdm.failed_reason", f"driver {host}:{pid} gone")
            self.end(run.info.run_id, "FAILED")
            gone.append(run.info.run_id)
        return gone

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def record_child(
        self,
        parent_run_id: str,
        name: str,
        tags: Mapping[str, Any],
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> str:
        """A finished child run for a stage that did not compute (cached, skipped), in three calls."""
        run_id = self.start_child(parent_run_id, name, tags)
        params_list = [mlflow.entities.Param(k, v) for k, v in flatten(params or {}).items()]
        # One batch with the metrics and the first 100 params (MLflow's limit per batch), then the rest.
        self.client.log_batch(run_id, metrics=_metrics(metrics or {}, 0), params=params_list[:100])
        for i in range(100, len(params_list), 100):
            self.client.log_batch(run_id, params=params_list[i : i + 100])
        self.end(run_id)
        return run_id

    @contextmanager
    def child_run(self, parent_run_id: str, name: str, tags: Mapping[str, str]) -> Iterator[str]:
        """A child run that ends FAILED if the body raises, FINISHED otherwise."""
        run_id = self.start_child(parent_run_id, name, tags)
        try:
            yield run_id
        except (KeyboardInterrupt, SystemExit):  # cancelled or interrupted, not a failure of the stage
            self.end(run_id, "KILLED")
            raise
        except BaseException:
            self.end(run_id, "FAILED")
            raise
        self.end(run_id)


def _metrics(
    metrics: Mapping[str, float],
    step: int,
    model_id: str | None = None,
    dataset: tuple[str, str] | None = None,
) -> list[mlflow.entities.Metric]:
    """MLflow metrics of the finite numbers in `metrics` (MLflow refuses NaN and inf in some stores)."""
    name, digest = dataset or (None, None)
    return [
        mlflow.entities.Metric(k, float(v), _now_ms(), step, model_id, name, digest)
        for k, v in metrics.items()
        if isinstance(v, int | float) and v == v and abs(v) != float("inf")
    ]


def _epoch(when: str) -> float:
    """A time tag as epoch seconds: an ISO 8601 time, or the raw seconds of runs recorded before."""
    try:
        return float(when)
    except ValueError:
        return datetime.fromisoformat(when).timestamp()


def iso_time(seconds: float) -> str:
    """Epoch seconds as an ISO 8601 UTC time, the way times are written in params and tags."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _now_ms() -> int:
    return int(time.time() * 1000)
