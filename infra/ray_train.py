"""Data-parallel training on Ray Train: one TorchTrainer worker per replica, joined in a torch.distributed
process group (NCCL on GPU, gloo on CPU). The training loop itself comes from tasks/."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import ray.train
import torch
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, get_device


def run_data_parallel(
    loop: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    workers: int,
    cpus_per_worker: float = 1,
    use_gpu: bool = False,
    name: str = "fdm-train",
    files_into: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run `loop(config)` on `workers` Ray Train workers; returns the metrics rank 0 last reported and
    copies the files it reported (its Ray Train checkpoint) into `files_into`."""
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    # Ray Train's run state goes to a throwaway directory (a fresh run every time, never an implicit
    # resume): resumption and model checkpoints are the artifact store's, written by rank 0.
    with tempfile.TemporaryDirectory(prefix="fdm-train-") as storage:
        trainer = TorchTrainer(
            loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(name=name, storage_path=storage),
        )
        result = trainer.fit()
        if files_into is not None and result.checkpoint is not None:
            result.checkpoint.to_directory(str(files_into))
        return dict(result.metrics or {})


def worker_rank() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of the calling Ray Train worker."""
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), get_device()


def report_outputs(metrics: dict[str, Any], files: str | os.PathLike[str]) -> None:
    """Report final metrics; every rank must call it. Rank 0 attaches the directory `files` (its outputs) as
    the Ray Train checkpoint, which also carries its metrics to the run's Result."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(files)))
