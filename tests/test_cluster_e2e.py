"""Cluster-shaped end to end on loopback: a real `mlflow server` (sqlite runs, artifacts proxied to moto's
S3 server), the local Ray cluster, an s3:// artifact store, and the base model trained by 2 Ray Train DDP
workers (gloo on CPU). Stage artifacts must land in the bucket under the server's artifacts destination;
datasets, models and checkpoints under the store root, in the single-worker formats."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console
from test_submit import CONFIG, TINY, TINY_STAGES, free_ports

from infra.manifest import MANIFEST_NAME
from infra.mlflow_server import start_tracking_server, stop_tracking_server
from infra.store import S3Settings, open_store
from pipelines.config import load_config
from pipelines.runner import run_pipeline
from tasks.checkpoints import load_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tracking_server(s3_server: str, s3_root: str, tmp_path: Path) -> Iterator[str]:
    """`fdm tracking-server`'s server on 127.0.0.1: sqlite backend, artifacts to S3_ROOT/mlflow."""
    (port,) = free_ports(1)
    proc = start_tracking_server(
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        f"{s3_root}/mlflow",
        port=port,
        env={"MLFLOW_S3_ENDPOINT_URL": s3_server},
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_tracking_server(proc)
    assert proc.poll() is not None


def test_pipeline_tracks_to_the_server_and_stores_in_s3(
    s3_server: str, ray_local: None, tracking_server: str, s3_root: str
) -> None:
    cfg = load_config(
        REPO / CONFIG,
        [
            *TINY,
            "train.workers=2",
            f"tracking.uri={tracking_server}",
            f"store.root={s3_root}/store",
            f"store.endpoint_url={s3_server}",
        ],
    )
    run = run_pipeline(cfg, console=Console(quiet=True))
    assert {o.status for o in run.outcomes.values()} == {"done"}, {
        n: o.error for n, o in run.outcomes.items()
    }

    client = MlflowClient(tracking_server)
    parent = client.get_run(run.run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.run_id}'"
    )
    assert {c.data.tags["stage"] for c in children} == TINY_STAGES

    bucket, prefix = s3_root.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    keys = [o["Key"].removeprefix(f"{prefix}/") for page in pages for o in page.get("Contents", [])]

    # MLflow's proxied artifacts: <destination>/<experiment id>/<run id>/artifacts/<file>.
    exp = parent.info.experiment_id
    evaluate_run = run.outcomes["evaluate_base"].result.run_id
    artifacts = f"mlflow/{exp}/{evaluate_run}/artifacts/"
    assert f"{artifacts}metrics.json" in keys
    assert any(k.startswith(artifacts) and k.endswith(".png") for k in keys)
    assert f"mlflow/{exp}/{run.run_id}/artifacts/config.yaml" in keys
    assert any(a.path == "metrics.json" for a in client.list_artifacts(evaluate_run))  # read back via proxy

    # The artifact store: prepared dataset and model under the s3:// root, each in the version directory
    # its key's CURRENT names; the training checkpoints are gone once the stage's output is complete.
    store = open_store(cfg.store.root, S3Settings(s3_server))
    data_root, base_root = (run.outcomes[n].spec.out_root for n in ("prepare_data", "train_base"))
    data_dir = f"{data_root}/{store.read_bytes(f'{data_root}/CURRENT').decode()}"
    base_dir = f"{base_root}/{store.read_bytes(f'{base_root}/CURRENT').decode()}"
    assert any(k.startswith(f"store/{data_dir}/") and k.endswith(".parquet") for k in keys)
    assert f"store/{data_dir}/{MANIFEST_NAME}" in keys
    assert f"store/{base_dir}/weights.safetensors" in keys
    assert not any(k.startswith("store/checkpoints/train_base/") for k in keys)
    assert not any(k.startswith("store/") and "/mlflow/" in k for k in keys)

    # Trained by 2 DDP workers; rank 0 reported the model Ray Train carried back, and evaluate loaded it.
    assert run.outcomes["train_base"].result.metrics["workers"] == 2
    model, spec = load_model(store, base_dir)
    assert spec["network"]["kind"] == "mlp"
    assert not any(k.startswith("net.module.") for k in model.state_dict())
