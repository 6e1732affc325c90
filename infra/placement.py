"""Whether a resource request can be placed on the Ray cluster, and waiting for a placement group that can.

A request the cluster cannot satisfy (more CPUs than any node has, STRICT_SPREAD over more nodes than
exist, GPUs on a CPU-only cluster) would wait forever in Ray; here it fails at once, or after
a timeout (the run's `resources.placement_timeout`, 60 s by default) for one that fits but is not placed,
with a line naming the request and the cluster's resources. An autoscaling cluster is the exception: while
its node types (the autoscaler's cluster config in the GCS) can still add a node that fits, the request is
passed to the autoscaler (`ray.autoscaler.sdk.request_resources`) and waited for.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray

DEFAULT_TIMEOUT_S = 60.0
Bundle = Mapping[str, float]


class Unplaceable(RuntimeError):
    """A resource request the cluster cannot place; the message names it and the cluster's resources."""


def alive_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the cluster Ray is connected to."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _fits(bundle: Bundle, node: Mapping[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in bundle.items() if v > 0)


def _total(bundles: Sequence[Bundle]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def feasible(bundles: Sequence[Bundle], strategy: str, nodes: Sequence[Mapping[str, float]]) -> bool:
    """Whether `bundles` under `strategy` fit the nodes' total resources at all (ignoring what is in use):
    STRICT_PACK needs one node for their sum, STRICT_SPREAD a distinct node for each, PACK and SPREAD
    every bundle somewhere (first fit, largest first)."""
    if strategy == "STRICT_PACK":
        return any(_fits(_total(bundles), n) for n in nodes)
    if strategy == "STRICT_SPREAD":
        used: set[int] = set()
        for b in sorted(bundles, key=lambda b: -sum(b.values())):
            i = next((i for i, n in enumerate(nodes) if i not in used and _fits(b, n)), None)
            if i is None:
                return False
            used.add(i)
        return True
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: -sum(b.values())):
        n = next((n for n in free if _fits(b, n)), None)
        if n is None:
            return False
        for k, v in b.items():
            n[k] = n.get(k, 0.0) - v
    return True


def autoscalable(
    bundles: Sequence[Bundle], strategy: str, nodes: Sequence[Mapping[str, float]], node_types: Sequence[Any]
) -> bool:
    """Whether an autoscaler with these node types (ClusterConfig.node_group_configs: resources, max_count;
    -1 = unbounded) can still add nodes that make the request feasible: every bundle fits a node type that
    may grow, and with as many new nodes of it as the request has bundles, the request fits."""
    growable = []
    for t in node_types:
        resources = dict(t.resources)
        now = sum(1 for n in nodes if all(n.get(k, 0.0) == v for k, v in resources.items()))
        if t.max_count == -1 or t.max_count > now:
            room = len(bundles) if t.max_count == -1 else min(len(bundles), t.max_count - now)
            growable += [resources] * room
    if not growable or not all(any(_fits(b, t) for t in growable) for b in bundles):
        return False
    return feasible(bundles, strategy, [*nodes, *growable])


def _node_types() -> list[Any]:
    """The autoscaler's node types, from its cluster config in the GCS; none without an autoscaler."""
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # an older GCS without the key, or no connection: treat as not autoscaling
        return []
    return list(config.node_group_configs) if config is not None else []


def describe_request(bundles: Sequence[Bundle], strategy: str | None = None) -> str:
    """The request in words, e.g. `2 x {CPU: 0.5} (STRICT_SPREAD)`."""
    shapes = [dict(b) for b in bundles]
    text = f"{len(shapes)} x {shapes[0]}" if all(s == shapes[0] for s in shapes) else str(shapes)
    return f"{text} ({strategy})" if strategy else text


def cluster_summary(nodes: Sequence[Mapping[str, float]]) -> str:
    """The alive nodes' CPUs, GPUs and custom resources, one entry per node."""
    parts = []
    for n in nodes:
        keys = [k for k in n if not k.startswith(("node:", "memory", "object_store_memory"))]
        parts.append("{" + ", ".join(f"{k}: {n[k]:g}" for k in sorted(keys)) + "}")
    return f"{len(nodes)} alive node{'s' * (len(nodes) != 1)}: " + ", ".join(parts)


def check(what: str, bundles: Sequence[Bundle], strategy: str = "PACK") -> bool:
    """Raise Unplaceable at once if `bundles` can never be placed on the cluster as it is and no autoscaler
    can add nodes for it; returns True when they can be placed only once the autoscaler adds nodes (the
    request is then passed to it)."""
    nodes = alive_nodes()
    if feasible(bundles, strategy, nodes):
        return False
    if autoscalable(bundles, strategy, nodes, _node_types()):
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[dict(b) for b in bundles])
        return True
    raise Unplaceable(
        f"{what}: {describe_request(bundles, strategy)} can never be placed on this cluster "
        f"({cluster_summary(nodes)}), and no autoscaler can add nodes that fit"
    )


def wait_ready(
    pg: Any, what: str, bundles: Sequence[Bundle], strategy: str, timeout: float = DEFAULT_TIMEOUT_S
) -> None:
    """Wait until placement group `pg` is placed: Unplaceable at once if it never can be (see check),
    after `timeout` seconds if it could but is not; no limit while an autoscaler can still
    add nodes for it. Checked again every second, so a node lost meanwhile ends the wait as soon as it
    makes the request unplaceable."""
    deadline = time.monotonic() + timeout
    ready = pg.ready()
    while True:
        done, _ = ray.wait([ready], timeout=1.0)
        if done:
            return
        if check(what, bundles, strategy):
            deadline = time.monotonic() + timeout  # the autoscaler can still add fitting nodes: keep waiting
        elif time.monotonic() > deadline:
            raise Unplaceable(
                f"{what}: {describe_request(bundles, strategy)} was not placed within {timeout:.0f} s "
                f"({cluster_summary(alive_nodes())}; the rest is in use); set resources.placement_timeout "
                "to wait longer"
            )
