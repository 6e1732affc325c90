"""What every benchmark report shares: the machine description, writing the report, logging it to MLflow."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

from infra.tracking import Tracking

RESULTS = Path(__file__).resolve().parent / "results"

# The digits U-Net the benchmarks share (the shipped digits.yaml model), as fdm_core.networks.UNet kwargs.
DIGITS_UNET = {
    "img_resolution": 8,
    "in_channels": 1,
    "model_channels": 16,
    "channel_mult": (1, 2),
    "num_blocks": 1,
    "attn_resolutions": (4,),
}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> str:
    """One line: cores, CPU model, device, versions."""
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return (
        f"{os.cpu_count()} cores ({cpu_name()}), device {device}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def command(module: str) -> str:
    """The command that reproduces this report."""
    return " ".join(["python -m", module, *sys.argv[1:]])


def write_report(
    name: str, markdown: str, files: dict[str, bytes] | None = None, tracking_uri: str = "sqlite:///mlflow.db"
) -> Path:
    """Write `results/<name>.md` (+ extra files such as PNG plots) and log them to MLflow as one run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(markdown)
    for fname, data in (files or {}).items():
        (RESULTS / fname).write_bytes(data)
    tracking = Tracking.setup(tracking_uri, "fdm-benchmarks")
    run_id = tracking.start_parent(
        f"bench-{name}", {"command": command(f"benchmarks.{name}")}, {"benchmark": name}
    )
    tracking.log_artifact(run_id, path)
    for fname in files or {}:
        tracking.log_artifact(run_id, RESULTS / fname)
    tracking.end(run_id)
    return path
