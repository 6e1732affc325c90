"""Stage: sample a pipeline model with ParaDiGMS, its Picard windows evaluated by Ray actors that each hold
the model, and sequentially with the same noise, in alternating timed pairs; record the median speed-up with
its min and max, the parallel depth and cost, where an iteration's time goes, and how far the parallel result
lands from the sequential one (docs/design.md: ParaDiGMS)."""

from __future__ import annotations

import torch

from tasks.plots import grid_png
from tasks.sample import draw_samples, samples_npz
from tasks.sample_options import SampleConfig
from tasks.stage import StageContext, StageResult
from tasks.stages.picard_sample import PicardSampleConfig


def picard_sample(cfg: PicardSampleConfig, ctx: StageContext, model: str) -> StageResult:
    """Sample `model` with Picard iteration on `cfg.actors` actors, then sequentially, and compare."""
    torch.set_num_threads(max(1, ctx.num_threads))
    run = SampleConfig(**cfg.model_dump(exclude={"enabled", "model"}), picard=True, compare=True)
    samples, stats = draw_samples(run, model, ctx.s3, ctx.device, ctx.placement_timeout)
    ctx.output_path("samples.npz").write_bytes(samples_npz(samples, stats))
    title = (
        f"{stats['sampler']}-{stats['steps']} by Picard ({cfg.solver}, window {cfg.window}, {cfg.actors} "
        f"actors): {stats['parallel_iterations']} parallel iterations"
    )
    ctx.output_path("samples.png").write_bytes(grid_png(samples.clamp(-1, 1), None, 8, title))
    keys = (
        "speedup",
        "speedup_min",
        "speedup_max",
        "pairs",
        "parallel_iterations",
        "model_evaluations",
        "max_deviation",
        "wall_seconds",
        "sequential_seconds",
        "setup_seconds",
        "load_before",
        "load_after",
    )
    metrics = {k: float(stats[k]) for k in keys}
    metrics.update({k: float(v) for k, v in stats.items() if k.startswith("ms_")})  # per-iteration breakdown
    return StageResult(
        stage="picard_sample",
        key=ctx.key,
        metrics=metrics,
        info={k: stats[k] for k in ("sampler", "steps", "actors", "solver")},
    )
