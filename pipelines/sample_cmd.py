"""`fdm sample`: draw samples from a model artifact, sequentially or by ParaDiGMS Picard windows.

    fdm sample --checkpoint REF --sampler ddpm --steps 1000 --num 16 --seed 0 \\
        [--picard --window 64 --tol 0.1 --actors 2] --out samples.npz

REF is a model artifact (local directory or s3://bucket/prefix), or an MLflow model (`models:/NAME@alias`,
`models:/NAME/VERSION`, `runs:/RUN_ID`) from `--tracking-uri`. The same seed gives the sequential and
the Picard sampler the same noise, so `--compare` reports how far Picard lands from the sequential result.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from fdm_core.options import METHODS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `sample` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "sample",
        help="sample a model artifact (sequential or ParaDiGMS Picard)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="model artifact (local dir, s3://bucket/prefix) or MLflow model (models:/NAME@alias, runs:/ID)",
    )
    p.add_argument(
        "--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI for models:/ and runs:/"
    )
    p.add_argument("--sampler", choices=METHODS, help="default: the artifact's own, else heun")
    p.add_argument("--steps", type=int, help="default: the artifact's own grid, else 18")
    p.add_argument("--num", type=int, default=16, help="number of samples (default 16)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the initial and the sampler's noise (default 0)"
    )
    p.add_argument("--picard", action="store_true", help="ParaDiGMS: Picard iteration over sliding windows")
    p.add_argument("--window", type=int, default=64, help="Picard window p (default 64)")
    p.add_argument("--tol", type=float, default=0.1, help="Picard tolerance tau (default 0.1)")
    p.add_argument(
        "--solver",
        default="picard",
        choices=["picard", "anderson"],
        help="Picard's fixed-point solver (default picard; anderson: ParaTAA's, fewer iterations)",
    )
    p.add_argument("--actors", type=int, default=0, help="Ray actors evaluating windows (default 0: local)")
    p.add_argument(
        "--strategy",
        default="PACK",
        choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
        help="placement of the actors (default PACK; STRICT_SPREAD: one per node)",
    )
    p.add_argument("--compare", action="store_true", help="also run the sequential sampler; report deviation")
    p.add_argument(
        "--pairs", type=int, default=1, help="with --compare: timed (sequential, Picard) pairs (default 1)"
    )
    p.add_argument("--ray-address", help="join this Ray cluster (default: start one on 127.0.0.1)")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: FDM_S3_ENDPOINT_URL / AWS_ENDPOINT_URL)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", default="samples.npz", help="output .npz (default samples.npz)")
    return p


def run(args: argparse.Namespace) -> int:
    """Sample, write `--out`, print the cost. Exit codes as `fdm`: 0 ok, 2 bad input, 1 sampling failed."""
    import ray
    import torch

    from infra.ray_runtime import init_ray
    from infra.store import S3Settings, StoreError
    from tasks.sample import SampleConfig, generate, samples_npz

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        checkpoint = args.checkpoint
        if checkpoint.startswith(("models:/", "runs:/")):
            from mlflow.exceptions import MlflowException

            from infra.mlflow_models import local_model_dir
            from infra.tracking import existing_store

            try:
                checkpoint = local_model_dir(checkpoint, existing_store(args.tracking_uri))
            except (MlflowException, OSError) as err:
                raise StoreError(f"{args.checkpoint}: {str(err).splitlines()[0]}") from None
        cfg = SampleConfig(
            sampler=args.sampler,
            steps=args.steps,
            num=args.num,
            seed=args.seed,
            picard=args.picard,
            window=args.window,
            tol=args.tol,
            solver=args.solver,
            actors=args.actors,
            strategy=args.strategy,
            compare=args.compare,
            pairs=args.pairs,
        )
        started = (
            cfg.picard and cfg.actors > 0 and init_ray(args.ray_address, max(os.cpu_count() or 1, cfg.actors))
        )
        try:
            samples, stats = generate(cfg, checkpoint, S3Settings(args.endpoint_url), device)
        finally:
            if started:
                ray.shutdown()
        Path(args.out).write_bytes(samples_npz(samples, stats))
    except (StoreError, ValueError, LookupError) as err:  # a bad reference, artifact or option
        print(f"fdm sample: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, ray.exceptions.RayError) as err:  # the sampling itself failed
        print(f"fdm sample: failed: {err}", file=sys.stderr)
        return 1
    print(_report(stats, list(samples.shape), args.out))
    return 0


def _report(stats: dict[str, Any], shape: list[int], out: str) -> str:
    how = "sequential"
    if "window" in stats:
        where = f"{stats['actors']} Ray actors" if stats["actors"] else "local batched"
        how = f"Picard ({stats['solver']}) window {stats['window']}, tol {stats['tol']} ({where})"
    lines = [
        f"{stats['sampler']} {stats['steps']} steps, {how}: {shape[0]} samples of {shape[1:]}",
        f"parallel iterations {stats['parallel_iterations']}, model evaluations {stats['model_evaluations']}",
        f"wall {stats['wall_seconds']:.3f} s (setup {stats['setup_seconds']:.3f} s)",
    ]
    if "max_deviation" in stats:
        lines.append(
            f"sequential {stats['sequential_seconds']:.3f} s, speed-up {stats['speedup']:.2f}x "
            f"(median of {stats['pairs']} pairs, {stats['speedup_min']:.2f}-{stats['speedup_max']:.2f}x), "
            f"max deviation {stats['max_deviation']:.3g}"
        )
    lines.append(f"wrote {out}")
    return "\n".join(lines)
