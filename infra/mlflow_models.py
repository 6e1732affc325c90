"""Stage outputs as MLflow Models (pyfunc flavour) and the Model Registry.

infra holds no diffusion math: the pyfunc model receives a picklable `sample` function from tasks/ and
calls it as `sample(model_dir, row)` for each input row, so `mlflow.pyfunc.load_model(...).predict`, the
registry and `mlflow models serve` all run the project's own sampler on the logged weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from infra.tracking import Tracking

MODEL_DIR = "model_dir"
SampleFn = Callable[[str, dict[str, Any]], np.ndarray]
SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("long", "num"),
            ColSpec("long", "seed", required=False),
            ColSpec("long", "steps", required=False),
            ColSpec("string", "sampler", required=False),
        ]
    ),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
)
# Given rather than inferred: inference would import and run the model while logging it.
REQUIREMENTS = ["torch", "safetensors", "pydantic", "numpy", "pandas", "pyarrow", "boto3", "mlflow"]


class ArtifactSampler(mlflow.pyfunc.PythonModel):
    """predict(rows of num[, seed, steps, sampler]) -> every row's samples, flattened, stacked."""

    def __init__(self, sample: SampleFn) -> None:
        self.sample = sample

    def load_context(self, context: Any) -> None:
        self.model_dir = context.artifacts[MODEL_DIR]

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        rows = model_input.to_dict("records")
        return np.concatenate([self.sample(self.model_dir, row) for row in rows]).astype(np.float32)


@contextmanager
def in_run(tracking: Tracking, run_id: str) -> Iterator[None]:
    """Make `run_id` the active MLflow run of this process for the fluent API (model logging)."""
    mlflow.set_tracking_uri(tracking.tracking_uri)
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        yield


def log_sampler_model(
    tracking: Tracking,
    run_id: str,
    model_dir: str,
    sample: SampleFn,
    code_paths: Sequence[str],
    tags: dict[str, str],
    name: str = "model",
) -> str:
    """Log the model artifact in local directory `model_dir` to run `run_id` as a pyfunc model named `name`
    that samples with `sample`; its files go to `artifacts/<model_dir's name>/`. Returns its model URI
    (models:/<id>)."""
    with in_run(tracking, run_id):
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=ArtifactSampler(sample),
            artifacts={MODEL_DIR: model_dir},
            code_paths=list(code_paths),
            signature=SIGNATURE,
            pip_requirements=REQUIREMENTS,
            tags=tags,
        )
    return info.model_uri


def local_model_dir(ref: str, tracking_uri: str) -> str:
    """The model artifact directory of an MLflow model reference (`models:/NAME@alias`, `models:/NAME/3`,
    `models:/<id>`, `runs:/<run id>` or `runs:/<run id>/model`), downloaded to a local directory."""
    if ref.startswith("runs:/") and ref.rstrip("/").count("/") == 1:  # the run's one logged model
        run_id, client = ref.rstrip("/").removeprefix("runs:/"), mlflow.MlflowClient(tracking_uri)
        experiment = client.get_run(run_id).info.experiment_id
        found = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
        if not found:
            raise LookupError(f"--checkpoint {ref}: run {run_id} logged no model")
        ref = found[0].model_uri
    root = mlflow.artifacts.download_artifacts(artifact_uri=ref, tracking_uri=tracking_uri)
    artifacts = mlflow.models.Model.load(root).flavors["python_function"]["artifacts"]
    return str(Path(root, artifacts[MODEL_DIR]["path"]))


def logged_model_uri(tracking: Tracking, key: str) -> str | None:
    """The newest model logged in the experiment by the stage computation of key `key` (its `fdm.key` tag)."""
    mlflow.set_tracking_uri(tracking.tracking_uri)
    found = mlflow.search_logged_models(
        experiment_ids=[tracking.experiment_id],
        filter_string=f"tags.`fdm.key` = '{key}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
        output_format="list",
    )
    return found[0].model_uri if found else None


def register(tracking: Tracking, model_uri: str, name: str, alias: str, tags: dict[str, str]) -> str:
    """Register `model_uri` as a new version of `name`, point `alias` at it; returns the version."""
    mlflow.set_tracking_uri(tracking.tracking_uri)
    version = mlflow.register_model(model_uri, name, tags=tags).version
    tracking.client.set_registered_model_alias(name, alias, version)
    return str(version)
