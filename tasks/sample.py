"""Sampling a model artifact, sequentially or by ParaDiGMS Picard windows (docs/design.md: ParaDiGMS):
`fdm sample` and the picard_sample stage use it.

Picard windows are evaluated locally in one batched call, or split across Ray actors that each load the
model from the artifact store (`StepFactory`). The same seed gives the same initial noise and the same
DDPM noise to both samplers, so their results are directly comparable.
"""

from __future__ import annotations

import io
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fdm_core.options import Method
from fdm_core.picard import PicardStats, parallel_sample
from fdm_core.precond import Denoiser
from fdm_core.samplers import nfe, process_grid, sample, step_delta
from infra.ray_evaluator import RayEvaluator, StepFn
from infra.store import S3Settings, open_store
from tasks.checkpoints import load_model
from tasks.sample_options import SampleConfig

DEFAULT_STEPS = 18
DEFAULT_METHOD: Method = "heun"


@dataclass(frozen=True)
class StepFactory:
    """Builds Δ(x, σ_t, σ_s, method) inside a Ray actor, loading the model artifact once per actor start."""

    model_uri: str
    s3: S3Settings | None = None
    num_threads: int = 1

    def __call__(self) -> StepFn:
        torch.set_num_threads(self.num_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, _ = load_model(open_store(self.model_uri, self.s3), "", device)

        @torch.inference_mode()
        def step(x: Tensor, sigma_t: Tensor, sigma_s: Tensor, method: str) -> Tensor:
            return step_delta(model, x.to(device), sigma_t.to(device), sigma_s.to(device), method).cpu()

        return step


def sampling_grid(spec: dict[str, Any], model: Denoiser, steps: int | None) -> Tensor:
    """The artifact's own grid (a distilled student's) unless other `steps` are asked for, else the
    process's default grid."""
    own = spec.get("sigmas")
    if own is not None and steps in (None, len(own) - 1):
        return torch.tensor(own, dtype=torch.float64)
    return process_grid(model.process, steps or int(spec.get("steps", DEFAULT_STEPS)))


def data_shape(spec: dict[str, Any]) -> tuple[int, ...]:
    """Shape of one sample: recorded by training, else implied by the network."""
    if "data_shape" in spec:
        return tuple(spec["data_shape"])
    net = spec["network"]
    if net["kind"] == "mlp":
        return (net["dim"],)
    return (net["in_channels"], net["img_resolution"], net["img_resolution"])


def draw_samples(
    cfg: SampleConfig,
    model_uri: str,
    s3: S3Settings | None = None,
    device: str = "cpu",
    placement_timeout: float | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Samples (unclipped) and stats: cost (parallel iterations, model evaluations), wall and setup time.
    Actors whose placement waits longer than `placement_timeout` seconds (default 60) fail the call.

    With `compare`, the first Picard run warms up (actors, caches) and is not timed; then `pairs` pairs of
    (sequential, Picard) runs alternate on the same CPUs, with the actors kept up, so a change of load hits
    both arms alike: the speed-up is the median of the pairs' ratios, with their min and max."""
    t_setup = time.perf_counter()
    model, spec = load_model(open_store(model_uri, s3), "", device)
    sigmas = sampling_grid(spec, model, cfg.steps)
    method: Method = cfg.sampler or spec.get("sampler", DEFAULT_METHOD)
    steps = len(sigmas) - 1
    gen = torch.Generator().manual_seed(cfg.seed)
    x = (torch.randn((cfg.num, *data_shape(spec)), generator=gen) * float(sigmas[0])).to(device)
    noise_state = gen.get_state()  # the sampler's noise comes next from the same generator

    def draw() -> torch.Generator:
        return torch.Generator().set_state(noise_state)

    stats: dict[str, Any] = {"sampler": method, "steps": steps, "num": cfg.num, "seed": cfg.seed}
    evaluator = None
    if cfg.picard and cfg.actors:
        evaluator = RayEvaluator(
            StepFactory(model_uri, s3),
            cfg.actors,
            cfg.strategy,
            num_cpus=cfg.actor_cpus,
            ready_timeout_s=placement_timeout,
        )
    stats["setup_seconds"] = time.perf_counter() - t_setup

    def sequential() -> Tensor:
        return sample(model, x, sigmas, method, draw())

    def parallel() -> tuple[Tensor, PicardStats]:
        return parallel_sample(model, x, sigmas, method, cfg.window, cfg.tol, draw(), evaluator, cfg.solver)

    try:
        t0 = time.perf_counter()
        if not cfg.picard:
            out = sequential()
            stats.update(parallel_iterations=steps, model_evaluations=nfe(method, steps))
            stats["wall_seconds"] = time.perf_counter() - t0
            return out, stats
        out, ps = parallel()
        stats["wall_seconds"] = time.perf_counter() - t0
        if cfg.compare:
            stats["load_before"] = os.getloadavg()[0]
            if evaluator is not None:
                evaluator.times = type(evaluator.times)()
            seq_s, par_s = [], []
            for _ in range(cfg.pairs):
                t0 = time.perf_counter()
                ref = sequential()
                t1 = time.perf_counter()
                out, ps = parallel()
                seq_s.append(t1 - t0)
                par_s.append(time.perf_counter() - t1)
            ratios = [a / b for a, b in zip(seq_s, par_s)]
            stats.update(
                load_after=os.getloadavg()[0],
                pairs=cfg.pairs,
                sequential_seconds=statistics.median(seq_s),
                wall_seconds=statistics.median(par_s),
                speedup=statistics.median(ratios),
                speedup_min=min(ratios),
                speedup_max=max(ratios),
                max_deviation=float((out - ref).abs().max()),
            )
        stats.update(
            cfg.model_dump(include={"window", "tol", "solver", "actors"}),
            parallel_iterations=ps.parallel_iterations,
            model_evaluations=ps.model_evaluations,
            strides=ps.strides,
            errors=ps.errors,
            **iteration_breakdown(ps, evaluator),
        )
    finally:
        if evaluator is not None:
            evaluator.close()
    return out, stats


def iteration_breakdown(ps: PicardStats, evaluator: RayEvaluator | None) -> dict[str, float]:
    """Milliseconds per parallel iteration of the last Picard run: in the evaluator and in Picard's update;
    on actors, the evaluator's share split as `CallTimes` (averaged over the timed runs)."""
    n = max(ps.parallel_iterations, 1)
    out = {"ms_per_iteration": 1e3 * (ps.evaluate_seconds + ps.update_seconds) / n}
    out["ms_evaluate"] = 1e3 * ps.evaluate_seconds / n
    out["ms_update"] = 1e3 * ps.update_seconds / n
    if evaluator is not None:
        out.update({f"ms_actor_{k}": v for k, v in evaluator.times.per_call_ms().items()})
    return out


def samples_npz(samples: Tensor, stats: dict[str, Any]) -> bytes:
    """`samples` clipped to [-1, 1] (float32) with their `shape`, and every stat as its own array."""
    clipped = samples.clamp(-1, 1).float().cpu().numpy()
    buf = io.BytesIO()
    np.savez(
        buf, samples=clipped, shape=np.array(clipped.shape), **{k: np.asarray(v) for k, v in stats.items()}
    )
    return buf.getvalue()


def sample_rows(model_dir: str, row: dict[str, Any]) -> np.ndarray:
    """One request to a served model: `num` samples (with optional seed, steps, sampler), each flattened
    and clipped to the data range, as float32 rows; what the MLflow pyfunc model calls."""

    def given(name: str) -> Any:
        value = row.get(name)
        return None if value is None or value != value else value  # absent columns arrive as NaN

    cfg = SampleConfig(
        num=int(row["num"]),
        seed=int(given("seed") or 0),
        steps=int(given("steps")) if given("steps") else None,
        sampler=given("sampler"),
    )
    samples, _ = draw_samples(cfg, model_dir)
    return samples.clamp(-1, 1).reshape(len(samples), -1).float().numpy()
