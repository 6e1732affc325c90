"""ray_cluster.yaml is a valid Ray cluster-launcher config, checked offline with Ray's own validation."""

from pathlib import Path

import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "ray_cluster.yaml"


def _prepared() -> dict:
    return prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))


def test_cluster_yaml_passes_ray_validation() -> None:
    config = _prepared()
    validate_config(config)  # raises on any schema error; no cloud calls
    assert config["provider"]["type"] == "aws"


def test_head_and_autoscaling_gpu_workers() -> None:
    config = _prepared()
    nodes = dict(config["available_node_types"])
    head = nodes.pop(config["head_node_type"])
    workers = list(nodes.values())
    assert head["resources"] == {"CPU": 0}
    assert workers and all(w["resources"].get("GPU", 0) >= 1 for w in workers)
    assert all(w["min_workers"] == 0 and w["max_workers"] >= 2 for w in workers)  # autoscaling from zero
    assert all("IamInstanceProfile" in w["node_config"] for w in workers)  # S3 access for the store


def test_nodes_install_this_working_copy_and_start_ray_with_token_auth() -> None:
    config = _prepared()
    assert config["file_mounts"]["~/fdm-pipeline"] == "."
    assert {".git", ".venv", "artifacts", "mlflow.db"} <= set(config["rsync_exclude"])
    assert any("pip install" in c and "~/fdm-pipeline" in c for c in config["setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    # The cluster runs the Ray version the client is tested with (job submission needs a match).
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
