"""Loader throughput (images/s) from local Parquet and from an S3 endpoint, against the training step.

The loader runs synchronously inside the training loop, so its cost per batch adds to every step; the
goal is that loading a batch costs under 5% of one training step of the digits U-Net at batch 128.
S3 is moto on 127.0.0.1, served from a separate process so that it does not share the loader's GIL.

    python -m benchmarks.loader_throughput [--quick]

writes benchmarks/results/loader_throughput{,_quick}.md and logs it to MLflow.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import boto3
import numpy as np
import torch

from benchmarks.common import command, machine, summary, write_report
from fdm_core.networks import UNet, count_parameters
from fdm_core.precond import Denoiser
from fdm_core.processes import make_process
from fdm_core.training import EMA, TrainState, denoising_loss, train_step
from infra.store import S3Settings
from tasks.dataset import ParquetBatches
from tasks.registry import STAGES
from tasks.stage import StageContext, run_stage
from tasks.stages.prepare_data import DataConfig

BATCH = 128
SEED = 0
GOAL = 0.05
# The digits U-Net as tasks/train_base.ModelConfig builds it by default for (1, 8, 8) images.
UNET = {"model_channels": 32, "channel_mult": (1, 2), "num_blocks": 1, "attn_resolutions": (4,)}
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass(frozen=True)
class Mode:
    """Epochs per loader pass, passes (best of), timed training steps, and images of the CIFAR-shaped set."""

    name: str
    epochs: int
    repeats: int
    steps: int
    n_cifar: int


MODES = {
    "full": Mode("full", epochs=20, repeats=3, steps=40, n_cifar=16384),
    "quick": Mode("quick", epochs=4, repeats=2, steps=10, n_cifar=4096),
    # The CI smoke test's: one pass of one epoch, one timed step.
    "tiny": Mode("tiny", epochs=1, repeats=1, steps=1, n_cifar=256),
}


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
    """A moto S3 endpoint on 127.0.0.1 in a child process, with `bucket` created; fake credentials in the
    environment until it stops."""
    with mock.patch.dict(os.environ, FAKE_AWS):
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
        loader = ParquetBatches(uri, BATCH, seed=SEED + r, epochs=epochs, s3=S3Settings(endpoint))
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


def write_cifar_shaped(path: Path, n: int) -> None:
    """Random uint8 images of CIFAR-10's shape, to see how the loader scales with sample size."""
    rng = np.random.default_rng(SEED)
    np.save(path, rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))


def measure(mode: Mode, tmp: str) -> dict[tuple[str, str], float]:
    """Loader images/s of each data set from local Parquet and from S3 (moto), written under `tmp`."""
    rates: dict[tuple[str, str], float] = {}
    with moto_endpoint("bench") as url:
        write_cifar_shaped(Path(tmp) / "cifar_shaped.npy", mode.n_cifar)
        configs = {
            "digits [1, 8, 8]": DataConfig(source={"kind": "digits"}, seed=SEED),
            f"CIFAR-shaped [3, 32, 32], {mode.n_cifar} random": DataConfig(
                source={"kind": "npy", "path": f"{tmp}/cifar_shaped.npy"}, seed=SEED, val_fraction=0.0
            ),
        }
        for data, cfg in configs.items():
            for where, root, endpoint in (
                ("local Parquet", f"{tmp}/store", None),
                ("S3 (moto)", "s3://bench", url),
            ):
                ctx = StageContext(store_uri=root, out_prefix=data.split()[0], s3=S3Settings(endpoint))
                uri = run_stage(STAGES["prepare_data"], cfg, ctx).output_uri
                rates[(data, where)] = loader_rate(uri, endpoint, mode.epochs, mode.repeats)
    return rates


def run(mode: Mode, threads: int = 1) -> tuple[str, dict[str, bytes]]:
    """Measure the loader and the training step; the report, and no plots."""
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        rates = measure(mode, tmp)
    step_s, n_params = train_step_seconds((1, 8, 8), device, mode.steps)

    flags = [f"--threads {threads}"] if threads != 1 else []
    lines = [
        "# Loader throughput vs training step",
        "",
        f"Command: `{command('loader_throughput', mode.name, *flags)}`  ",
        f"Machine: {machine()}  ",
        f"Seeds: data preparation {SEED}, loader {SEED}..{SEED + mode.repeats - 1} (one per pass), "
        f"training {SEED}.  ",
        f"Loader: batch {BATCH}, shuffle buffer 8192, {mode.epochs} epochs per pass, best of {mode.repeats} "
        "passes; S3 is moto on 127.0.0.1 in a separate process.  ",
        f"Training step: EDM-FDM denoising loss, Adam, EMA, grad clip, digits U-Net {UNET} "
        f"({n_params:,} parameters) at batch {BATCH}, median of {mode.steps} steps after 3 warm-up: "
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
    worst = max(BATCH / rate / step_s for rate in rates.values())
    name = "loader_throughput" + ("" if mode.name == "full" else f"_{mode.name}")
    headline = (
        f"loading a batch costs at most {worst:.2%} of a digits training step, over local Parquet and S3 "
        f"(goal < {GOAL:.0%}: {'met' if worst < GOAL else 'not met'})"
    )
    return "\n".join(lines), summary(name, headline, worst_fraction=round(worst, 5), met=worst < GOAL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, images and steps (about 30 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the training step")
    args = parser.parse_args(argv)
    report, files = run(MODES["quick" if args.quick else "full"], args.threads)
    sys.stdout.write(report)
    print(f"report: {write_report('loader_throughput' + ('_quick' if args.quick else ''), report, files)}")


if __name__ == "__main__":
    main()
