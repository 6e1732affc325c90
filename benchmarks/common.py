"""What every benchmark report shares: the machine description, writing the report, logging it to MLflow."""

from __future__ import annotations

import io
import json
import os
import platform
import re
from pathlib import Path

import torch
from matplotlib.figure import Figure

from infra.tracking import Tracking
from tasks.stages.prepare_data import DataConfig
from tasks.stages.train_base import ModelConfig

RESULTS = Path(__file__).resolve().parent / "results"
# The benchmarks' stage cache: a store laid out as `fdm run` lays it out (benchmarks.stage_cache), shared by
# the studies (FDM_BENCH_CACHE overrides; delete it to retrain from scratch).
CACHE = Path(os.environ.get("FDM_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))

# The digits U-Net the benchmarks share (the shipped digits.yaml model), as fdm_core.networks.UNet kwargs.
DIGITS_UNET = {
    "img_resolution": 8,
    "in_channels": 1,
    "model_channels": 16,
    "channel_mult": (1, 2),
    "num_blocks": 1,
    "attn_resolutions": (4,),
}

# sklearn's 8x8 digits with 10% held out, prepared as the shipped digits.yaml prepares them.
DIGITS_DATA = DataConfig.model_validate({"source": {"kind": "digits"}, "val_fraction": 0.1})
DIGITS_MODEL = ModelConfig(
    kind="unet",
    model_channels=DIGITS_UNET["model_channels"],
    channel_mult=list(DIGITS_UNET["channel_mult"]),
    num_blocks=DIGITS_UNET["num_blocks"],
    attn_resolutions=list(DIGITS_UNET["attn_resolutions"]),
)  # the same U-Net as the product's model config, for the benchmarks that train through the product


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> str:
    """One line: cores, CPU model, device, versions; every report's "Machine:" line starts with it."""
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return (
        f"{os.cpu_count()} cores ({cpu_name()}), device {device}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (reports return their plots as bytes; write_report stores them)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def command(name: str, mode: str, *flags: str) -> str:
    """The command that reproduces a report of `benchmarks.<name>` in `mode` (full mode takes no flag)."""
    return " ".join(["python -m", f"benchmarks.{name}", *([] if mode == "full" else [f"--{mode}"]), *flags])


def stated_command(markdown: str) -> str:
    """The command a report says reproduces it (its "Command: `...`" line), or "" if it names none."""
    found = re.search(r"Command: `([^`]+)`", markdown)
    return found.group(1) if found else ""


def summary(name: str, headline: str, **numbers: float | str | bool | None) -> dict[str, bytes]:
    """`<name>.summary.json` (as a report file): the report's headline in one line and the numbers behind it,
    which the README's results table shows (benchmarks/readme.py), so nothing parses the Markdown."""
    doc = {"benchmark": name, "report": f"{name}.md", "headline": headline, "numbers": numbers}
    return {f"{name}.summary.json": (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode()}


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
        f"bench-{name}", {"command": stated_command(markdown)}, {"benchmark": name}
    )
    tracking.log_artifact(run_id, path)
    for fname in files or {}:
        tracking.log_artifact(run_id, RESULTS / fname)
    tracking.end(run_id)
    return path
