"""Picard windows evaluated by K Ray actors, each holding one model replica (DESIGN.md §2, §5).

infra holds no diffusion math: the actors receive a picklable *factory* from tasks/ and call it once in
their constructor to build a step function (x, sigma_t, sigma_s, method) -> delta, loading the weights
from the artifact store. A restarted actor runs its constructor again, so it reloads its weights, and the
window chunk it was evaluating is retried; the result is the same as without the failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor

StepFn = Callable[[Tensor, Tensor, Tensor, str], Tensor]
StepFactory = Callable[[], StepFn]
Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class ModelReplica:
    """One actor's model: built by `factory()` in the constructor, so weights load once per (re)start."""

    def __init__(self, factory: StepFactory) -> None:
        self._step = factory()

    def evaluate(self, x: Tensor, sigma_t: Tensor, sigma_s: Tensor, method: str) -> Tensor:
        return self._step(x, sigma_t, sigma_s, method)

    def pid(self) -> int:
        return os.getpid()


class RayEvaluator:
    """Splits each window batch into `actors` contiguous chunks, one per actor, and gathers them in order.

    The actors are gang-scheduled in one placement group (`strategy`: PACK or SPREAD on one machine,
    STRICT_SPREAD for one node per replica on a cluster) with one GPU each when the cluster has GPUs.
    Use as a context manager, or call `close()`, to free the actors and their placement group.
    """

    def __init__(
        self,
        factory: StepFactory,
        actors: int = 2,
        strategy: Strategy = "PACK",
        num_cpus: float = 1,
        num_gpus: float | None = None,
        max_restarts: int = 3,
        max_task_retries: int = 3,
        ready_timeout_s: float = 300.0,
    ) -> None:
        if actors < 1:
            raise ValueError(f"actors: must be >= 1 (got {actors})")
        if num_gpus is None:
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.placement_group = placement_group([bundle] * actors, strategy=strategy)
        try:
            ray.get(self.placement_group.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            remove_placement_group(self.placement_group)
            raise RuntimeError(
                f"placement group: {actors} x {bundle} with strategy {strategy} could not be placed within "
                f"{ready_timeout_s:.0f} s; cluster resources are {ray.cluster_resources()}"
            ) from err
        replica = ray.remote(ModelReplica)
        self.actors = [
            replica.options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                max_restarts=max_restarts,
                max_task_retries=max_task_retries,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, i),
            ).remote(factory)
            for i in range(actors)
        ]
        try:
            # Returns once every replica has loaded its weights.
            ray.get([a.pid.remote() for a in self.actors], timeout=ready_timeout_s)
        except BaseException:
            self.close()
            raise

    def __call__(self, x: Tensor, sigma_t: Tensor, sigma_s: Tensor, method: str) -> Tensor:
        chunks = zip(
            *(t.cpu().tensor_split(len(self.actors)) for t in (x, sigma_t, sigma_s)),
        )
        refs = [
            actor.evaluate.remote(xc, tc, sc, method)
            for actor, (xc, tc, sc) in zip(self.actors, chunks)
            if len(xc)
        ]
        return torch.cat(ray.get(refs)).to(x.device)

    def pids(self) -> list[int]:
        """The process id of every actor (changes when an actor restarts)."""
        return ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.placement_group)

    def __enter__(self) -> RayEvaluator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
