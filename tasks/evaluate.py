"""Stage: sample a model with given samplers and step counts, and measure sample quality.

Images: Fréchet distance in the evaluation classifier's features (against the training split), the
classifier's mean confidence and class coverage of the samples, and standard FID when the user supplies a
TorchScript Inception feature extractor locally. 2-D data: sliced Wasserstein distance to held-out data.
Always: NFE, wall time per sample, a sample grid PNG.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import time
from typing import Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from fdm_core.metrics import frechet_distance, sliced_wasserstein
from fdm_core.picard import picard_sample
from fdm_core.samplers import nfe, process_grid, sample
from infra.manifest import write_manifest
from infra.store import open_store
from tasks.checkpoints import load_model
from tasks.dataset import load_split
from tasks.stage import StageContext, StageResult
from tasks.train_classifier import load_classifier


class SamplerSpec(BaseModel):
    """One way to sample: a method and a step count (on the model's own grid when it has one)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["euler", "heun", "ddpm", "dpmpp_2m"] = "heun"
    steps: int = Field(18, ge=1)

    @property
    def tag(self) -> str:
        return f"{self.method}{self.steps}"


class PicardOptions(BaseModel):
    """Sample the evaluations with ParaDiGMS (euler, heun, ddpm) instead of the sequential sampler."""

    model_config = ConfigDict(extra="forbid")
    window: int = Field(16, ge=1)
    tol: float = Field(0.1, gt=0)


class EvalConfig(BaseModel):
    """How every model in the pipeline is judged."""

    model_config = ConfigDict(extra="forbid")
    num_samples: int = Field(500, ge=16)
    batch_size: int = Field(250, ge=1)
    samplers: list[SamplerSpec] = Field(default_factory=lambda: [SamplerSpec(method="heun", steps=18)])
    seed: int = 0
    inception: str | None = Field(None, description="local TorchScript Inception (EDM/StyleGAN fid format)")
    grid_size: int = Field(8, ge=1, le=32)
    picard: PicardOptions | None = None


def _sample(
    model, sigmas: Tensor, method: str, cfg: EvalConfig, shape, device: str
) -> tuple[Tensor, dict[str, float]]:
    """Samples in batches; with Picard options, ParaDiGMS and its accumulated stats."""
    gen = torch.Generator().manual_seed(cfg.seed)
    out, stats = [], {"parallel_iterations": 0.0, "model_evaluations": 0.0}
    picard = cfg.picard if method in ("euler", "heun", "ddpm") else None
    for start in range(0, cfg.num_samples, cfg.batch_size):
        b = min(cfg.batch_size, cfg.num_samples - start)
        x = torch.randn((b, *shape), generator=gen).to(device) * float(sigmas[0])
        if picard is None:
            out.append(sample(model, x, sigmas.to(device), method, generator=gen).float().cpu())
            continue
        x, st = picard_sample(model, x, sigmas.to(device), method, picard.window, picard.tol, generator=gen)
        out.append(x.float().cpu())
        stats["parallel_iterations"] += st.parallel_iterations
        stats["model_evaluations"] += st.model_evaluations
    return torch.cat(out), stats if picard else {}


def _inception_features(path: str, x: Tensor) -> Tensor:
    """Features of the user's TorchScript Inception, fed uint8 RGB images as EDM's fid.py does."""
    net = torch.jit.load(path, map_location="cpu").eval()
    imgs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if imgs.shape[1] == 1:
        imgs = imgs.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return torch.cat([net(chunk, return_features=True) for chunk in imgs.split(100)]).double()


def _grid_png(x: Tensor, reference: Tensor, size: int, title: str) -> bytes:
    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    if x.ndim == 2:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, alpha=0.3, label="held-out data")
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, label="samples")
        ax.legend(loc="upper right", fontsize=6)
    else:
        k = min(size, int(math.sqrt(len(x))))
        imgs = ((x[: k * k].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
        imgs = torch.nn.functional.pad(imgs, (0, 0, 0, 1, 0, 1), value=0.5).numpy()  # 1-px grey gutter
        c, h, w = imgs.shape[3], imgs.shape[1], imgs.shape[2]
        grid = imgs.reshape(k, k, h, w, c).transpose(0, 2, 1, 3, 4).reshape(k * h, k * w, c)
        cmap = "gray" if c == 1 else None
        ax.imshow(grid.squeeze(-1) if c == 1 else grid, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
    ax.set_title(title, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def evaluate(
    cfg: EvalConfig,
    model_uri: str,
    dataset_uri: str,
    classifier_uri: str | None,
    ctx: StageContext,
) -> StageResult:
    """Evaluate `model_uri` with each sampler; a distilled student (grid in its spec) uses its own grid."""
    torch.set_num_threads(max(1, ctx.num_threads))
    store = open_store(ctx.store_uri, ctx.endpoint_url)
    model_store = open_store(model_uri, ctx.endpoint_url)
    model, spec = load_model(model_store, "", ctx.device)
    train_x, _, meta = load_split(dataset_uri, "train", ctx.endpoint_url)
    has_val = "val" in meta.splits and meta.rows("val") > 0
    held_out = load_split(dataset_uri, "val", ctx.endpoint_url)[0] if has_val else train_x
    classifier = load_classifier(classifier_uri, ctx.endpoint_url, ctx.device) if classifier_uri else None
    if classifier is not None:
        with torch.no_grad():
            ref_feats = torch.cat([classifier.features(b.to(ctx.device)).cpu() for b in train_x.split(500)])
    ref_inception = _inception_features(cfg.inception, train_x) if cfg.inception else None

    samplers = cfg.samplers
    if "sigmas" in spec:  # a distilled student samples on the grid it was distilled for
        samplers = [SamplerSpec(method=spec.get("sampler", "euler"), steps=int(spec["steps"]))]
    metrics: dict[str, float] = {}
    headline = None
    for k, sp in enumerate(samplers):
        sigmas = torch.tensor(spec["sigmas"], dtype=torch.float64) if "sigmas" in spec else None
        if sigmas is None:
            sigmas = process_grid(model.process, sp.steps)
        t0 = time.perf_counter()
        x, picard_stats = _sample(model, sigmas, sp.method, cfg, meta.shape, ctx.device)
        sec = (time.perf_counter() - t0) / cfg.num_samples
        m = {"nfe": float(nfe(sp.method, len(sigmas) - 1)), "sec_per_sample": sec, **picard_stats}
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"{sp.tag}: non-finite samples from {model_uri}")
        if meta.normalization is not None:  # images live in [-1, 1]; vector data keeps its own scale
            x = x.clamp(-1, 1)
        m["sw"] = sliced_wasserstein(x.flatten(1), held_out.flatten(1))
        if classifier is not None:
            with torch.no_grad():
                logits = torch.cat([classifier(b.to(ctx.device)).cpu() for b in x.clamp(-1, 1).split(500)])
                feats = torch.cat(
                    [classifier.features(b.to(ctx.device)).cpu() for b in x.clamp(-1, 1).split(500)]
                )
            probs = logits.softmax(1)
            m["fd"] = frechet_distance(feats, ref_feats)
            m["confidence"] = float(probs.max(1).values.mean())
            counts = torch.bincount(probs.argmax(1), minlength=meta.num_classes)
            m["coverage"] = float((counts > 0).float().mean())
        if ref_inception is not None:
            m["fid"] = frechet_distance(_inception_features(cfg.inception, x), ref_inception)
        quality = m.get("fid", m.get("fd", m["sw"]))
        m["quality"] = quality
        metrics.update({f"{sp.tag}/{name}": v for name, v in m.items()})
        ctx.log_metrics({f"{sp.tag}/{name}": v for name, v in m.items()}, sp.steps)
        if k == 0:
            headline = {"sampler": sp.tag, "steps": sp.steps, **m}
        title = f"{sp.tag}: quality {quality:.3g}"
        store.write_bytes(
            posixpath.join(ctx.out_prefix, f"samples_{sp.tag}.png"),
            _grid_png(x, held_out, cfg.grid_size, title),
        )
        buf = io.BytesIO()
        np.savez_compressed(buf, samples=x.numpy())
        store.write_bytes(posixpath.join(ctx.out_prefix, f"samples_{sp.tag}.npz"), buf.getvalue())
    assert headline is not None
    metrics["quality"] = headline["quality"]
    summary = {"headline": headline, "metrics": metrics, "metric_name": _metric_name(headline)}
    store.write_bytes(posixpath.join(ctx.out_prefix, "metrics.json"), json.dumps(summary, indent=2).encode())
    write_manifest(store, ctx.out_prefix, {"stage": "evaluate", "key": ctx.key, "model": model_uri})
    return StageResult(
        stage="evaluate",
        key=ctx.key,
        outputs={"evaluation": store.uri(ctx.out_prefix)},
        metrics=metrics,
        info={"headline": headline, "metric_name": _metric_name(headline)},
    )


def _metric_name(headline: dict) -> str:
    return "fid" if "fid" in headline else "fd" if "fd" in headline else "sw"
