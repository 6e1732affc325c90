"""Which requests a cluster can place, and which an autoscaler can still make room for (infra/placement.py),
against known answers; the live checks run on the multi-node cluster in tests/test_multinode.py."""

from __future__ import annotations

from types import SimpleNamespace

from infra.placement import autoscalable, cluster_summary, describe_request, feasible

WORKER = {"CPU": 2.0, "memory": 1e9, "node:127.0.0.1": 1.0}
HEAD = {"memory": 1e9, "node:__internal_head__": 1.0}
NODES = [HEAD, {**WORKER, "node_w1": 1.0}, {**WORKER, "node_w2": 1.0}]


def test_feasible_by_strategy() -> None:
    half = {"CPU": 0.5}
    assert feasible([half] * 2, "STRICT_SPREAD", NODES)
    assert not feasible([half] * 3, "STRICT_SPREAD", NODES)  # the head has no CPU
    assert feasible([half] * 3, "PACK", NODES) and feasible([half] * 8, "SPREAD", NODES)
    assert not feasible([half] * 9, "SPREAD", NODES)
    assert feasible([half] * 4, "STRICT_PACK", NODES) and not feasible([half] * 5, "STRICT_PACK", NODES)
    assert not feasible([{"CPU": 3.0}], "PACK", NODES)
    assert not feasible([{"CPU": 1.0, "GPU": 1.0}], "PACK", NODES)
    assert feasible([{"CPU": 1.0, "node_w2": 0.5}], "PACK", NODES)


def test_autoscalable_only_while_a_fitting_node_type_can_grow() -> None:
    def node_type(max_count: int, **resources: float) -> SimpleNamespace:
        return SimpleNamespace(resources=resources, max_count=max_count)

    three = [{"CPU": 0.5}] * 3
    assert not autoscalable(three, "STRICT_SPREAD", NODES, [])  # no autoscaler
    assert autoscalable(three, "STRICT_SPREAD", NODES, [node_type(3, CPU=2.0)])  # 2 up, 1 more allowed
    assert not autoscalable(three, "STRICT_SPREAD", NODES, [node_type(2, CPU=2.0)])  # at its maximum
    assert autoscalable(three, "STRICT_SPREAD", NODES, [node_type(-1, CPU=2.0)])  # unbounded
    gpu = [{"CPU": 1.0, "GPU": 1.0}]
    assert not autoscalable(gpu, "PACK", NODES, [node_type(5, CPU=2.0)])  # no type has a GPU
    assert autoscalable(gpu, "PACK", NODES, [node_type(5, CPU=2.0), node_type(1, CPU=8.0, GPU=1.0)])


def test_the_line_names_the_request_and_each_node() -> None:
    assert describe_request([{"CPU": 0.5}] * 3, "STRICT_SPREAD") == "3 x {'CPU': 0.5} (STRICT_SPREAD)"
    assert cluster_summary(NODES) == "3 alive nodes: {}, {CPU: 2, node_w1: 1}, {CPU: 2, node_w2: 1}"
