"""Stage: sample a model with given samplers and step counts, and measure sample quality.

Images: Fréchet distance in the evaluation classifier's features (against the training split), the
classifier's mean confidence and class coverage of the samples, and standard FID when the user supplies a
TorchScript Inception feature extractor locally. 2-D data: sliced Wasserstein distance to held-out data.
Always: NFE, wall time per sample, a sample grid PNG.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import torch
from torch import Tensor

from fdm_core.metrics import frechet_distance, sliced_wasserstein
from fdm_core.options import SINGLE_STEP_METHODS
from fdm_core.picard import parallel_sample
from fdm_core.samplers import nfe, process_grid, sample
from infra.store import open_store
from tasks.checkpoints import load_model
from tasks.dataset import load_split
from tasks.plots import grid_png
from tasks.stage import StageContext, StageResult
from tasks.stages.evaluate import EvalConfig, SamplerSpec
from tasks.train_classifier import load_classifier


def _sample(
    model, sigmas: Tensor, method: str, cfg: EvalConfig, shape, device: str
) -> tuple[Tensor, dict[str, float]]:
    """Samples in batches; with Picard options, ParaDiGMS and its accumulated stats."""
    gen = torch.Generator().manual_seed(cfg.seed)
    out, stats = [], {"parallel_iterations": 0.0, "model_evaluations": 0.0}
    picard = cfg.picard if method in SINGLE_STEP_METHODS else None
    for start in range(0, cfg.num_samples, cfg.batch_size):
        b = min(cfg.batch_size, cfg.num_samples - start)
        x = torch.randn((b, *shape), generator=gen).to(device) * float(sigmas[0])
        if picard is None:
            out.append(sample(model, x, sigmas.to(device), method, generator=gen).float().cpu())
            continue
        x, st = parallel_sample(
            model, x, sigmas.to(device), method, picard.window, picard.tol, gen, solver=picard.solver
        )
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


def evaluate(
    cfg: EvalConfig, ctx: StageContext, model: str, dataset: str, classifier: str | None = None
) -> StageResult:
    """Evaluate `model` with each sampler; a distilled student (grid in its spec) uses its own grid."""
    torch.set_num_threads(max(1, ctx.num_threads))
    denoiser, spec = load_model(open_store(model, ctx.s3), "", ctx.device)
    train_x, _, meta = load_split(dataset, "train", ctx.s3)
    has_val = "val" in meta.splits and meta.rows("val") > 0
    held_out = load_split(dataset, "val", ctx.s3)[0] if has_val else train_x
    judge = load_classifier(classifier, ctx.s3, ctx.device) if classifier else None
    if judge is not None:
        with torch.no_grad():
            ref_feats = torch.cat([judge.features(b.to(ctx.device)).cpu() for b in train_x.split(500)])
    ref_inception = _inception_features(cfg.inception, train_x) if cfg.inception else None

    samplers = cfg.samplers
    if "sigmas" in spec:  # a distilled student samples on the grid it was distilled for
        samplers = [SamplerSpec(method=spec.get("sampler", "euler"), steps=int(spec["steps"]))]
    by_sampler: dict[str, dict[str, float]] = {}
    for sp in samplers:
        sigmas = torch.tensor(spec["sigmas"], dtype=torch.float64) if "sigmas" in spec else None
        if sigmas is None:
            sigmas = process_grid(denoiser.process, sp.steps)
        t0 = time.perf_counter()
        x, picard_stats = _sample(denoiser, sigmas, sp.method, cfg, meta.shape, ctx.device)
        sec = (time.perf_counter() - t0) / cfg.num_samples
        m = {"nfe": float(nfe(sp.method, len(sigmas) - 1)), "seconds_per_sample": sec, **picard_stats}
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"{sp.tag}: non-finite samples from {model}")
        if meta.normalization is not None:  # images live in [-1, 1]; vector data keeps its own scale
            x = x.clamp(-1, 1)
        m["sw"] = sliced_wasserstein(x.flatten(1), held_out.flatten(1))
        if judge is not None:
            with torch.no_grad():
                logits = torch.cat([judge(b.to(ctx.device)).cpu() for b in x.clamp(-1, 1).split(500)])
                feats = torch.cat([judge.features(b.to(ctx.device)).cpu() for b in x.clamp(-1, 1).split(500)])
            probs = logits.softmax(1)
            m["fd"] = frechet_distance(feats, ref_feats)
            m["confidence"] = float(probs.max(1).values.mean())
            counts = torch.bincount(probs.argmax(1), minlength=meta.num_classes)
            m["coverage"] = float((counts > 0).float().mean())
        if ref_inception is not None:
            m["fid"] = frechet_distance(_inception_features(cfg.inception, x), ref_inception)
        quality = m.get("fid", m.get("fd", m["sw"]))
        m["quality"] = quality
        by_sampler[sp.tag] = m
        ctx.log_metrics(m, sp.steps)  # the same keys for every sampler and run, at step = sampling steps
        title = f"{sp.tag}: {_metric_name(m)} {quality:.3g} (lower is better)"
        ctx.output_path(f"samples_{sp.tag}.png").write_bytes(grid_png(x, held_out, cfg.grid_size, title))
        buf = io.BytesIO()
        np.savez_compressed(buf, samples=x.numpy())
        ctx.output_path(f"samples_{sp.tag}.npz").write_bytes(buf.getvalue())
    first = samplers[0]
    headline = {"sampler": first.method, "steps": first.steps, "tag": first.tag}
    info = {
        "headline": headline,
        "metric_name": _metric_name(by_sampler[first.tag]),
        "by_sampler": by_sampler,
        "tags": {"sampler": first.method, "steps": first.steps, "nfe": int(by_sampler[first.tag]["nfe"])},
    }
    ctx.output_path("metrics.json").write_bytes(json.dumps(info, indent=2).encode())
    return StageResult(stage="evaluate", key=ctx.key, metrics=dict(by_sampler[first.tag]), info=info)


def _metric_name(metrics: dict) -> str:
    """The metric behind `quality`: FID if computed, else the classifier FD, else sliced Wasserstein."""
    return "fid" if "fid" in metrics else "fd" if "fd" in metrics else "sw"
