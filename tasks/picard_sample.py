"""Stage: sample a pipeline model with ParaDiGMS, its Picard windows evaluated by Ray actors that each hold
the model, and sequentially with the same noise; record the speed-up, the parallel depth and cost, and how
far the parallel result lands from the sequential one (DESIGN.md §5)."""

from __future__ import annotations

import torch

from tasks.plots import grid_png
from tasks.sample import SampleConfig, generate, samples_npz
from tasks.stage import StageContext, StageResult
from tasks.stages.picard_sample import PicardSampleConfig


def picard_sample(cfg: PicardSampleConfig, ctx: StageContext, model: str) -> StageResult:
    """Sample `model` with Picard iteration on `cfg.actors` actors, then sequentially, and compare."""
    torch.set_num_threads(max(1, ctx.num_threads))
    run = SampleConfig(
        sampler=cfg.sampler,
        steps=cfg.steps,
        num=cfg.num,
        seed=cfg.seed,
        picard=True,
        window=cfg.window,
        tol=cfg.tol,
        actors=cfg.actors,
        actor_cpus=cfg.actor_cpus,
        strategy=cfg.strategy,
        compare=True,
    )
    samples, stats = generate(run, model, ctx.endpoint_url, ctx.device)
    ctx.output_path("samples.npz").write_bytes(samples_npz(samples, stats))
    title = (
        f"{stats['sampler']}-{stats['steps']} by Picard (window {cfg.window}, {cfg.actors} actors): "
        f"{stats['parallel_iterations']} parallel iterations"
    )
    ctx.output_path("samples.png").write_bytes(grid_png(samples.clamp(-1, 1), None, 8, title))
    keys = (
        "speedup",
        "parallel_iterations",
        "model_evaluations",
        "max_deviation",
        "wall_seconds",
        "sequential_seconds",
        "setup_seconds",
    )
    return StageResult(
        stage="picard_sample",
        key=ctx.key,
        metrics={k: float(stats[k]) for k in keys},
        info={"sampler": stats["sampler"], "steps": stats["steps"], "actors": cfg.actors},
    )
