"""Stage: a small CNN classifier trained once on the training split; its features define the Fréchet
distance, confidence and class coverage that judge image samples (nothing is downloaded)."""

from __future__ import annotations

import json
import posixpath
import time

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from infra.manifest import read_manifest, read_verified, write_manifest
from infra.store import open_store
from tasks.dataset import ParquetBatches, dataset_meta, load_split
from tasks.stage import StageContext, StageResult

WEIGHTS = "classifier.safetensors"
SPEC = "classifier.json"


class ClassifierConfig(BaseModel):
    """Training of the evaluation classifier."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(400, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    width: int = Field(32, ge=4)
    feature_dim: int = Field(64, ge=2)
    noise_std: float = Field(
        0.1, ge=0, description="input noise augmentation, so samples near the data classify"
    )
    seed: int = 0


class Classifier(nn.Module):
    """Conv-conv(stride 2)-conv(stride 2)-pool, a `feature_dim` feature layer, then the class logits."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_classifier(cfg: ClassifierConfig, dataset_uri: str, ctx: StageContext) -> StageResult:
    """Train on the train split, report validation accuracy, write weights + manifest."""
    torch.set_num_threads(max(1, ctx.num_threads))
    torch.manual_seed(cfg.seed)
    meta = dataset_meta(dataset_uri, ctx.endpoint_url)
    if len(meta.shape) != 3 or meta.num_classes < 2:
        raise ValueError(
            f"classifier: needs labelled images, the dataset has shape {list(meta.shape)} "
            f"and {meta.num_classes} classes"
        )
    net = Classifier(meta.shape[0], meta.num_classes, cfg.width, cfg.feature_dim).to(ctx.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    batches = iter(
        ParquetBatches(dataset_uri, cfg.batch_size, seed=cfg.seed, epochs=None, endpoint_url=ctx.endpoint_url)
    )
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        x, y = (t.to(ctx.device) for t in next(batches))
        x = x + cfg.noise_std * torch.randn_like(x)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps:
            ctx.log_metrics({"loss": loss.item()}, step)
    split = "val" if "val" in meta.splits and meta.rows("val") > 0 else "train"
    x_val, y_val, _ = load_split(dataset_uri, split, ctx.endpoint_url)
    net.eval()
    with torch.no_grad():
        acc = float((net(x_val.to(ctx.device)).argmax(1).cpu() == y_val).float().mean())
    store = open_store(ctx.store_uri, ctx.endpoint_url)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    spec = {
        "in_channels": meta.shape[0],
        "num_classes": meta.num_classes,
        "width": cfg.width,
        "feature_dim": cfg.feature_dim,
    }
    store.write_bytes(posixpath.join(ctx.out_prefix, WEIGHTS), st_save(state))
    store.write_bytes(posixpath.join(ctx.out_prefix, SPEC), json.dumps(spec).encode())
    write_manifest(store, ctx.out_prefix, {"stage": "train_classifier", "key": ctx.key, "val_accuracy": acc})
    return StageResult(
        stage="train_classifier",
        key=ctx.key,
        outputs={"classifier": store.uri(ctx.out_prefix)},
        metrics={"val_accuracy": acc, "train_seconds": time.perf_counter() - t0},
        info={"split": split},
    )


def load_classifier(uri: str, endpoint_url: str | None = None, device: str = "cpu") -> Classifier:
    """Load a trained classifier, verified against its manifest."""
    store = open_store(uri, endpoint_url)
    manifest = read_manifest(store, "")
    net = Classifier(**json.loads(read_verified(store, "", SPEC, manifest)))
    net.load_state_dict(st_load(read_verified(store, "", WEIGHTS, manifest)))
    return net.to(device).eval()
