"""Picard windows evaluated by K Ray actors, each holding one model replica (docs/design.md: Layers,
ParaDiGMS).

infra holds no diffusion math: the actors receive a picklable *factory* from tasks/ and call it once in
their constructor to build a step function (x, sigma_t, sigma_s, method) -> delta, loading the weights
from the artifact store. A restarted actor runs its constructor again, so it reloads its weights, and the
window chunk it was evaluating is retried; the result is the same as without the failure.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor

from fdm_core.options import Strategy
from infra.placement import DEFAULT_TIMEOUT_S, check, wait_ready

StepFn = Callable[[Tensor, Tensor, Tensor, str], Tensor]
StepFactory = Callable[[], StepFn]


class ModelReplica:
    """One actor's model: built by `factory()` in the constructor, so weights load once per (re)start.

    The actor owns its torch thread count (one per CPU it holds: Ray sets OMP_NUM_THREADS, not torch's
    intra-op pool) and its priority (`niceness`, the caller's), and takes its window chunk as numpy arrays,
    which Ray deserialises without a copy.
    """

    def __init__(self, factory: StepFactory, num_threads: int = 1, niceness: int | None = None) -> None:
        self._step = factory()
        torch.set_num_threads(num_threads)
        if niceness is not None and os.getpriority(os.PRIO_PROCESS, 0) > niceness:
            # Ray starts workers at nice 15: any nice-0 process on the core (a daemon, another job) then
            # takes ~97% of it from the actor. Run at the caller's priority where the OS allows it.
            # Without CAP_SYS_NICE the actor keeps Ray's niceness; info() reports it.
            with contextlib.suppress(PermissionError):
                os.setpriority(os.PRIO_PROCESS, 0, niceness)

    def evaluate(self, x: np.ndarray, sigmas: np.ndarray, method: str) -> tuple[np.ndarray, float]:
        """Δ of the chunk (`sigmas` stacks σ_t and σ_s) and the seconds its computation took."""
        t0 = time.perf_counter()
        delta = self._step(
            torch.from_numpy(x), torch.from_numpy(sigmas[0]), torch.from_numpy(sigmas[1]), method
        )
        return delta.numpy(), time.perf_counter() - t0

    def info(self) -> dict[str, int]:
        """Process id (changes when the actor restarts), niceness and torch threads."""
        return {
            "pid": os.getpid(),
            "niceness": os.getpriority(os.PRIO_PROCESS, 0),
            "threads": torch.get_num_threads(),
        }

    def node(self) -> str:
        """The id of the Ray node this replica runs on (changes when a lost node's replica restarts)."""
        return ray.get_runtime_context().get_node_id()


@dataclass
class CallTimes:
    """Where the evaluator's time went, summed over its calls (seconds): splitting the window and submitting
    one task per actor (serialisation included), waiting for the results (the actors' compute plus Ray's
    scheduling, transfer and object store), the slowest actor's own compute, and gathering the chunks."""

    calls: int = 0
    submit: float = 0.0
    wait: float = 0.0
    compute: float = 0.0
    gather: float = 0.0

    def per_call_ms(self) -> dict[str, float]:
        """Each part per call in ms, with `overhead` = wait - compute (Ray's share of the wait)."""
        n = max(self.calls, 1)
        parts = {"submit": self.submit, "wait": self.wait, "compute": self.compute, "gather": self.gather}
        out = {k: 1e3 * v / n for k, v in parts.items()}
        out["overhead"] = out["wait"] - out["compute"]
        out["total"] = out["submit"] + out["wait"] + out["gather"]
        return out


class RayEvaluator:
    """Splits each window batch into `actors` contiguous chunks, one per actor, and gathers them in order:
    one actor call per actor per iteration and one `ray.get` for all of them; `times` records where the time
    went.

    The actors are gang-scheduled in one placement group (`strategy`: PACK or SPREAD on one machine,
    STRICT_SPREAD for one node per replica on a cluster) with one GPU each when the cluster has GPUs; a
    group the cluster can never hold fails at once, one not placed within `ready_timeout_s` (default
    60 s) fails then, both naming the request and the cluster's nodes.
    An actor whose node is lost restarts where its bundle is placed again (Ray reschedules it); until it is
    back, its chunks go to the actors left.
    Use as a context manager, or call `close()`, to free the actors and their placement group.
    """

    def __init__(
        self,
        factory: StepFactory,
        actors: int,
        strategy: Strategy = "PACK",
        num_cpus: float = 1,
        num_gpus: float | None = None,
        max_restarts: int = 3,
        max_task_retries: int = 3,
        ready_timeout_s: float | None = None,
    ) -> None:
        if actors < 1:
            raise ValueError(f"actors: must be >= 1 (got {actors})")
        if num_gpus is None:
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        ready_timeout_s = DEFAULT_TIMEOUT_S if ready_timeout_s is None else ready_timeout_s
        bundles = [bundle] * actors
        check("Picard placement group", bundles, strategy)  # one that can never be placed fails at once
        self.placement_group = placement_group(bundles, strategy=strategy)
        try:
            wait_ready(self.placement_group, "Picard placement group", bundles, strategy, ready_timeout_s)
        except BaseException:
            remove_placement_group(self.placement_group)
            raise
        replica = ray.remote(ModelReplica)
        self.actors = [
            replica.options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                max_restarts=max_restarts,
                max_task_retries=max_task_retries,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, i),
            ).remote(factory, max(1, math.floor(num_cpus)), os.getpriority(os.PRIO_PROCESS, 0))
            for i in range(actors)
        ]
        self.times = CallTimes()
        try:
            # Returns once every replica has loaded its weights.
            self.replica_info = ray.get([a.info.remote() for a in self.actors], timeout=ready_timeout_s)
        except BaseException:
            self.close()
            raise

    def __call__(self, x: Tensor, sigma_t: Tensor, sigma_s: Tensor, method: str) -> Tensor:
        t0 = time.perf_counter()
        xs = x.detach().cpu().numpy()  # a view, no copy, on the CPU
        sig = torch.stack([sigma_t, sigma_s]).cpu().numpy()
        bounds = np.linspace(0, len(xs), len(self.actors) + 1).round().astype(int)
        work = [
            (a, xs[lo:hi], sig[:, lo:hi])
            for a, lo, hi in zip(self.actors, bounds[:-1], bounds[1:])
            if hi > lo
        ]
        refs = [actor.evaluate.remote(xc, sc, method) for actor, xc, sc in work]
        t1 = time.perf_counter()
        try:
            results = ray.get(refs)
        except ray.exceptions.RayActorError:  # an actor lost (e.g. its node) and not back yet
            results = [self._survivor(ref, xc, sc, method) for ref, (_, xc, sc) in zip(refs, work)]
        t2 = time.perf_counter()
        out = torch.from_numpy(np.concatenate([r[0] for r in results])).to(x.device)
        t3 = time.perf_counter()
        times = self.times
        times.calls += 1
        times.submit += t1 - t0
        times.wait += t2 - t1
        times.compute += max(r[1] for r in results)
        times.gather += t3 - t2
        return out

    def _survivor(self, ref: Any, x: np.ndarray, sigmas: np.ndarray, method: str) -> tuple[np.ndarray, float]:
        """The chunk's result from its own actor if it answered, else from the first actor that does (the
        same model, so the same numbers); RayActorError only when none is left."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as err:
            lost = err
        for actor in self.actors:
            try:
                return ray.get(actor.evaluate.remote(x, sigmas, method))
            except ray.exceptions.RayActorError as err:
                lost = err
        raise lost

    def pids(self) -> list[int]:
        """The process id of every actor (changes when an actor restarts)."""
        return [i["pid"] for i in ray.get([a.info.remote() for a in self.actors])]

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.placement_group)

    def __enter__(self) -> RayEvaluator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
