"""Stage: a small CNN classifier trained once on the training split; its features define the Fréchet
distance, confidence and class coverage that judge image samples (nothing is downloaded)."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from infra.manifest import read_manifest, read_verified
from infra.store import S3Settings, open_store
from tasks.dataset import ParquetBatches, dataset_meta, load_split
from tasks.stage import StageContext, StageResult
from tasks.stages.train_classifier import ClassifierConfig
from tasks.training_loop import LoopSettings, fit

WEIGHTS = "classifier.safetensors"
SPEC = "classifier.json"


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


def train_classifier(cfg: ClassifierConfig, ctx: StageContext, dataset: str) -> StageResult:
    """Train on the train split, report validation accuracy, stage the weights and their spec."""
    torch.set_num_threads(max(1, ctx.num_threads))
    torch.manual_seed(cfg.seed)
    meta = dataset_meta(dataset, ctx.s3)
    if len(meta.shape) != 3 or meta.num_classes < 2:
        raise ValueError(
            f"classifier: needs labelled images, the dataset has shape {list(meta.shape)} "
            f"and {meta.num_classes} classes"
        )
    net = Classifier(meta.shape[0], meta.num_classes, cfg.width, cfg.feature_dim).to(ctx.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)

    def batches(step: int):
        loader = ParquetBatches(dataset, cfg.batch_size, seed=cfg.seed + step, epochs=None, s3=ctx.s3)
        return ((x.to(ctx.device), y.to(ctx.device)) for x, y in loader)

    def loss_fn(batch: tuple[Tensor, Tensor], state, gen: torch.Generator) -> Tensor:
        x, y = batch
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        return F.cross_entropy(net(x + cfg.noise_std * noise), y)

    run = fit(
        net, opt, loss_fn, batches, ctx, LoopSettings("classifier", cfg.steps, seed=cfg.seed), scheduler=sched
    )
    split = "val" if "val" in meta.splits and meta.rows("val") > 0 else "train"
    x_val, y_val, _ = load_split(dataset, split, ctx.s3)
    net.eval()
    with torch.no_grad():
        acc = float((net(x_val.to(ctx.device)).argmax(1).cpu() == y_val).float().mean())
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    spec = {
        "in_channels": meta.shape[0],
        "num_classes": meta.num_classes,
        "width": cfg.width,
        "feature_dim": cfg.feature_dim,
    }
    ctx.output_path(WEIGHTS).write_bytes(st_save(state))
    ctx.output_path(SPEC).write_bytes(json.dumps(spec).encode())
    return StageResult(
        stage="train_classifier",
        key=ctx.key,
        metrics={"val_accuracy": acc, "train_seconds": run.seconds},
        info={"split": split},
    )


def load_classifier(uri: str, s3: S3Settings | None = None, device: str = "cpu") -> Classifier:
    """Load a trained classifier, verified against its manifest."""
    store = open_store(uri, s3)
    manifest = read_manifest(store, "")
    net = Classifier(**json.loads(read_verified(store, "", SPEC, manifest)))
    net.load_state_dict(st_load(read_verified(store, "", WEIGHTS, manifest)))
    return net.to(device).eval()
