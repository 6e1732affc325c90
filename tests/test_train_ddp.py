"""Multi-worker base training (`train.workers = 2`): Ray Train DDP on 2 CPU workers (gloo) writes the same
model artifact and checkpoint format as single-worker training."""

from pathlib import Path

import pytest

from infra.store import open_store
from tasks.checkpoints import latest_training_checkpoint, load_model
from tasks.prepare_data import DataConfig, prepare_data
from tasks.stage import StageContext
from tasks.train_base import ModelConfig, TrainConfig, train_base

MODEL = ModelConfig(kind="mlp", hidden=32, depth=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("ddp"))
    cfg = DataConfig(source={"kind": "toy2d", "toy": "eight_gaussians", "n": 1000})
    return prepare_data(cfg, StageContext(root, "data")).outputs["dataset"]


def _train(tmp_path: Path, dataset: str, workers: int):
    cfg = TrainConfig(steps=40, batch_size=64, checkpoint_every=20, log_every=10, workers=workers)
    return train_base(MODEL, cfg, dataset, StageContext(str(tmp_path), "model", key=f"w{workers}"))


def test_two_workers_write_single_worker_compatible_artifacts(
    ray_local: None, dataset: str, tmp_path: Path
) -> None:
    single = _train(tmp_path / "single", dataset, workers=1)
    multi = _train(tmp_path / "multi", dataset, workers=2)
    assert multi.metrics["workers"] == 2 and multi.metrics["steps"] == 40
    assert multi.info["parameters"] == single.info["parameters"]
    model, spec = load_model(open_store(multi.outputs["model"]), "")  # verifies the manifest
    single_model, single_spec = load_model(open_store(single.outputs["model"]), "")
    assert spec == single_spec and model.state_dict().keys() == single_model.state_dict().keys()
    ckpt = latest_training_checkpoint(open_store(str(tmp_path / "multi")), "checkpoints/train_base/w2")
    assert ckpt is not None and ckpt.step == 20 and ckpt.ema is not None
    assert not any(k.startswith("module.") for k in ckpt.model)  # raw weights, not the DDP wrapper's
