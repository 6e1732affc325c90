"""Ray start-up and the small shared actor that stages report their progress to.

Without an address Ray starts embedded (`address="local"`, even when another cluster runs on this machine)
and listens on loopback only; with an address (`--address` or RAY_ADDRESS, as
Ray Jobs set it for their driver) it joins an existing cluster, without resource arguments (those describe
a cluster being started), after `infra.ray_join.probe_cluster` has checked it can.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import ray
from ray._private import ray_constants

from infra.ray_join import AUTH_HINT, ClusterError, cluster_address, probe_cluster


def init_ray(
    address: str | None = None, num_cpus: int | None = None, setup_hook: Callable[[], None] | None = None
) -> bool:
    """Start (or join) Ray; returns True if this call started it, so the caller knows to shut it down.

    Joining (an `address`, or RAY_ADDRESS set) probes the cluster first (ClusterError if it is unreachable
    or refuses this client) and passes no resources. `setup_hook` (an importable function) runs in each
    worker of an embedded cluster as it starts: Ray prestarts a worker per CPU, so a hook importing the
    stage code warms them before the first task."""
    if ray.is_initialized():
        return False
    join = cluster_address(address)
    if join:
        probe_cluster(join)
        try:  # Ray itself would read RAY_ADDRESS for None or "auto": join is what it would join
            ray.init(address=join, logging_level="ERROR", log_to_driver=False)
        except ray.exceptions.AuthenticationError:
            raise ClusterError(f"the Ray cluster at {join} refused this client: {AUTH_HINT}") from None
    else:
        # Ray turns 127.0.0.1 into the machine's reachable IP and listens on all interfaces unless its
        # single-node switch is off (as on macOS/Windows): off, the embedded cluster stays on loopback.
        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(
            address="local",  # always a new one: never a cluster found running on this machine
            num_cpus=num_cpus or os.cpu_count(),
            runtime_env={"worker_process_setup_hook": setup_hook} if setup_hook else None,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
        )
    return True


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ProgressBoard:
    """Latest status of each stage (state, step, total, start), written by workers, read by the driver.

    In memory, never on a disk; `new_board()` puts it on the driver's own node, so losing a worker node
    never loses it (and if it restarts anyway, calls wait for it)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}

    def report(self, stage: str, **fields: Any) -> None:
        entry = self.stages.setdefault(stage, {})
        if fields.get("state") == "running" and "started" not in entry:
            entry["started"] = time.time()
        entry.update(fields)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.stages


def new_board() -> Any:
    """A ProgressBoard on the driver's node (soft: anywhere if that node cannot take it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ProgressBoard.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote()
