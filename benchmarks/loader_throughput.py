"""Loader throughput (images/s) from local Parquet and from an S3 endpoint, against the training step.

The loader runs synchronously inside the training loop, so its cost per batch adds to every step; the
goal is that loading a batch costs under 5% of one training step of the digits U-Net at batch 128.
S3 is moto on 127.0.0.1, served from a separate process so that it does not share the loader's GIL.

    python -m benchmarks.loader_throughput [--quick]

writes benchmarks/results/loader_throughput.md.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import numpy as np
import torch

from fdm_core.networks import UNet, count_parameters
from fdm_core.precond import Denoiser
from fdm_core.processes import make_process
from fdm_core.training import EMA, TrainState, denoising_loss, train_step
from tasks.dataset import ParquetBatches
from tasks.prepare_data import DataConfig, prepare_data
from tasks.stage import StageContext

RESULTS = Path(__file__).parent / "results" / "loader_throughput.md"
BATCH = 128
SEED = 0
GOAL = 0.05
# The digits U-Net as tasks/train_base.ModelConfig builds it by default for (1, 8, 8) images.
UNET = {"model_channels": 32, "channel_mult": (1, 2), "num_blocks": 1, "attn_resolutions": (4,)}


def _serve_moto(conn: mp.connection.Connection) -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request lines in the output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    conn.send(server.get_host_and_port())
    conn.recv()  # block until told to stop
    server.stop()


@contextmanager
def moto_endpoint(bucket: str) -> Iterator[str]:
    """A moto S3 endpoint on 127.0.0.1 in a child process, with fake credentials and `bucket` created."""
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=_serve_moto, args=(child,), daemon=True)
    proc.start()
    host, port = parent.recv()
    url = f"http://{host}:{port}"
    try:
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
        yield url
    finally:
        parent.send("stop")
        proc.join(10)


def loader_rate(uri: str, endpoint: str | None, epochs: int, repeats: int) -> float:
    """Best-of-`repeats` images/s streaming `epochs` epochs of shuffled batches (manifest checks included)."""
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        loader = ParquetBatches(uri, BATCH, seed=SEED + r, epochs=epochs, endpoint_url=endpoint)
        n = sum(len(y) for _, y in loader)
        rates.append(n / (time.perf_counter() - t0))
    return max(rates)


def train_step_seconds(shape: tuple[int, ...], device: str, steps: int) -> tuple[float, int]:
    """Median seconds of one EDM-FDM training step (Adam, EMA, grad clip) of the digits U-Net at BATCH."""
    torch.manual_seed(SEED)
    net = UNet(img_resolution=shape[1], in_channels=shape[0], **UNET)
    model = Denoiser(net, make_process("edm", fdm=True)).to(device)
    ema, opt, state = EMA(model), torch.optim.Adam(model.parameters(), lr=2e-3), TrainState()
    gen = torch.Generator().manual_seed(SEED)
    x0 = torch.rand(BATCH, *shape) * 2 - 1
    times = []
    for i in range(steps + 3):  # the first steps warm up allocators and kernels
        t0 = time.perf_counter()
        xb = x0.to(device)
        train_step(model, opt, lambda xb=xb: denoising_loss(model, xb, state.warmup_step, gen), state, ema)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), count_parameters(net)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def write_cifar_shaped(path: Path, n: int) -> None:
    """Random uint8 images of CIFAR-10's shape, to see how the loader scales with sample size."""
    rng = np.random.default_rng(SEED)
    np.save(path, rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, images and steps (about 30 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the training step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    epochs, repeats, steps, n_cifar = (4, 2, 10, 4096) if args.quick else (20, 3, 40, 16384)

    rates: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp, moto_endpoint("bench") as url:
        write_cifar_shaped(Path(tmp) / "cifar_shaped.npy", n_cifar)
        configs = {
            "digits [1, 8, 8]": DataConfig(source={"kind": "digits"}, seed=SEED),
            f"CIFAR-shaped [3, 32, 32], {n_cifar} random": DataConfig(
                source={"kind": "npy", "path": f"{tmp}/cifar_shaped.npy"}, seed=SEED, val_fraction=0.0
            ),
        }
        for data, cfg in configs.items():
            for where, root, endpoint in (
                ("local Parquet", f"{tmp}/store", None),
                ("S3 (moto)", "s3://bench", url),
            ):
                ctx = StageContext(store_uri=root, out_prefix=data.split()[0], endpoint_url=endpoint)
                uri = prepare_data(cfg, ctx).outputs["dataset"]
                rates[(data, where)] = loader_rate(uri, endpoint, epochs, repeats)
    step_s, n_params = train_step_seconds((1, 8, 8), device, steps)

    gpu = f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""
    flags = (" --quick" if args.quick else "") + (f" --threads {args.threads}" if args.threads != 1 else "")
    lines = [
        "# Loader throughput vs training step",
        "",
        f"Command: `python -m benchmarks.loader_throughput{flags}`  ",
        f"Machine: {os.cpu_count()} cores ({cpu_name()}), device `{device}`{gpu}, torch threads "
        f"{args.threads}, Python {platform.python_version()}, torch {torch.__version__}  ",
        f"Seeds: data preparation {SEED}, loader {SEED}..{SEED + repeats - 1} (one per pass), "
        f"training {SEED}.  ",
        f"Loader: batch {BATCH}, shuffle buffer 8192, {epochs} epochs per pass, best of {repeats} passes; "
        "S3 is moto on 127.0.0.1 in a separate process.  ",
        f"Training step: EDM-FDM denoising loss, Adam, EMA, grad clip, digits U-Net {UNET} "
        f"({n_params:,} parameters) at batch {BATCH}, median of {steps} steps after 3 warm-up: "
        f"**{step_s * 1e3:.1f} ms/step ({BATCH / step_s:,.0f} images/s)**.",
        "",
        "| data | source | loader images/s | ms per batch of 128 | loading / digits training step |",
        "|---|---|---:|---:|---:|",
    ]
    for (data, where), rate in rates.items():
        ratio = BATCH / rate / step_s
        verdict = "within goal" if ratio < GOAL else "over goal"
        lines.append(
            f"| {data} | {where} | {rate:,.0f} | {BATCH / rate * 1e3:.2f} | {ratio:.2%} ({verdict}) |"
        )
    lines += [
        "",
        f"Goal: loading a batch costs under {GOAL:.0%} of a training step. Loader rates include opening the "
        "dataset each pass (manifest, dataset.json) and the sha256 check of every shard streamed. The "
        "CIFAR-shaped rows are compared with the digits step only to bound the cost: a U-Net step on "
        "32x32x3 images is slower still.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    sys.stdout.write("\n".join(lines))


if __name__ == "__main__":
    main()
