"""Fault injection on a real local Ray cluster: a killed training worker, a NaN loss, deleted outputs,
bad data and secrets. Each must cost at most the work since the last checkpoint and never leave a
corrupt or complete-looking artifact."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import TOY2D, ray_worker_pid
from mlflow.tracking import MlflowClient
from rich.console import Console

from infra.manifest import MANIFEST_NAME, is_complete, verify
from infra.store import open_store
from infra.tracking import flatten
from pipelines.cli import main
from pipelines.config import load_config
from pipelines.runner import run_pipeline


def test_killed_training_worker_resumes_from_checkpoint(ray_local: None, toy2d_overrides: list[str]) -> None:
    cfg = load_config(TOY2D, [*toy2d_overrides, "train.steps=1500", "train.checkpoint_every=100"])
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(run=run_pipeline(cfg, console=Console(quiet=True))))
    thread.start()
    store = open_store(cfg.store.root)
    deadline, killed = time.time() + 240, None
    while time.time() < deadline and killed is None:
        ckpts = [p for p in store.list("checkpoints/train_base") if p.endswith(MANIFEST_NAME)]
        pid = ray_worker_pid("train_base")
        if ckpts and pid:
            os.kill(pid, signal.SIGKILL)
            killed = pid
        time.sleep(0.2)
    thread.join(timeout=600)
    assert killed, "train_base never reached its first checkpoint"
    run = box["run"]
    assert not run.failed, [o.error for o in run.failed]
    base = run.outcomes["train_base"].result
    assert base.metrics["resumed_from"] >= 100  # the retry did not restart from step 0
    assert base.metrics["steps"] == 1500
    verify(open_store(run.outcomes["train_base"].result.outputs["model"]), "")
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_run(run.run_id).info.experiment_id
    attempts = client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{run.run_id}' and tags.stage = 'train_base'"
    )
    assert sorted(a.info.status for a in attempts) == ["FINISHED", "KILLED"]


def test_nan_loss_fails_the_stage_keeps_the_last_checkpoint(
    ray_local: None, toy2d_overrides: list[str]
) -> None:
    cfg = load_config(
        TOY2D,
        [
            *toy2d_overrides,
            "train.lr=1e12",
            "train.lr_rampup=0",
            "train.steps=50",
            "train.checkpoint_every=1",
            "train.grad_clip=null",
        ],
    )
    run = run_pipeline(cfg, console=Console(quiet=True))
    failed = {o.spec.name: o.error for o in run.failed}
    assert list(failed) == ["train_base"]
    assert "non-finite loss" in failed["train_base"] and "at step" in failed["train_base"]
    assert run.outcomes["distill_4to2"].status == "not run"
    store = open_store(cfg.store.root)
    assert not store.list(run.outcomes["train_base"].spec.out_root)  # nothing of the stage's output
    ckpt_root = f"checkpoints/train_base/{run.outcomes['train_base'].spec.key}"
    assert any(is_complete(store, f"{ckpt_root}/{p.split('/')[-2]}") for p in store.list(ckpt_root))


def test_deleted_output_reruns_instead_of_stale_cache(ray_local: None, toy2d_overrides: list[str]) -> None:
    cfg = load_config(TOY2D, [*toy2d_overrides, "train.steps=100"])
    first = run_pipeline(cfg, console=Console(quiet=True))
    open_store(first.outcomes["distill_4to2"].result.outputs["model"]).delete("weights.safetensors")
    second = run_pipeline(cfg, console=Console(quiet=True))
    status = {n: o.status for n, o in second.outcomes.items()}
    assert status["train_base"] == "cached" and status["distill_4to2"] == "done"


def test_bad_data_exits_2_naming_the_file(
    ray_local: None, tmp_path: Path, toy2d_overrides: list[str], capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "nowhere" / "data.npy"
    args = [
        "run",
        str(TOY2D),
        *[a for o in toy2d_overrides for a in ("--set", o)],
        "--set",
        f"data.source={{kind: npy, path: {missing}}}",
    ]
    assert main(args) == 2
    assert str(missing) in capsys.readouterr().out.replace("\n", "")


def test_secrets_never_reach_mlflow_params(monkeypatch: pytest.MonkeyPatch) -> None:
    flat = flatten({"store": {"aws_secret_access_key": "sekrit", "root": "s3://b/p"}, "token": "t0k"})
    assert flat == {"store.aws_secret_access_key": "***", "store.root": "s3://b/p", "token": "***"}


def test_embedded_ray_listens_on_loopback_only(ray_local: None) -> None:
    import ray

    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
