"""prepare_data on a folder of 32x32 PNGs: today's in-memory path against the Ray Data path, side by side.

For 2k, 20k and 100k generated images (random pixels, like CIFAR-10's), each arm runs in a fresh process
(alternating, repeated) and reports images/s of the stage call, the peak RSS of its processes and the
stored bytes per image. "today" is tasks/prepare_data.py as of commit BASELINE (stage version 3, loaded from
git at run time: one process decodes every image into a list, stacks it, stores float32); "Ray Data" is the
current stage in a fresh local Ray of 2 CPUs (Ray start-up not timed), its peak being the sum of the
driver's and every Ray worker's own peak (Ray's per-node agents left out). Generate the folders first:

    python -m benchmarks.prepare [--quick]        # with nothing else computing on the machine

writes benchmarks/results/prepare{,_quick}.md with its headline in prepare{,_quick}.summary.json, and logs
them to MLflow.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import command, machine, summary, write_report

BASELINE = "6515869"  # the last commit of the in-memory stage (version 3)
ROOT = Path(__file__).resolve().parent.parent
SIZES = {"full": (2_000, 20_000, 100_000), "quick": (2_000, 20_000)}
REPEATS = {"full": 2, "quick": 1}

ARM = r"""
import json, os, resource, sys, time
from pathlib import Path
from benchmarks.peak_memory import ray_peak_rss
arm, folder, out = sys.argv[1:4]
from tasks.stage import StageContext
from tasks.stages.prepare_data import DataConfig
cfg = DataConfig(source={"kind": "image_folder", "path": folder})
ctx = StageContext(store_uri=out, out_prefix="out", key="bench", out_dir=Path(out))
if arm == "today":
    import importlib.util
    spec = importlib.util.spec_from_file_location("prepare_data_v3", sys.argv[4])
    stage = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
else:
    import ray
    from ray._private import ray_constants
    from tasks import prepare_data as stage
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
t0 = time.perf_counter()
result = stage.prepare_data(cfg, ctx)
seconds = time.perf_counter() - t0

peak = sum(ray_peak_rss(os.getpid()).values())
shards = [p for p in Path(out).rglob("*.parquet")]
n = result.metrics["n_train"] + result.metrics["n_val"]
stored = sum(p.stat().st_size for p in shards)
print(json.dumps({"seconds": seconds, "peak": peak, "n": n, "bytes_per_image": stored / n}))
"""


def make_folder(folder: Path, n: int) -> None:
    """`n` 32x32 RGB PNGs of random pixels (incompressible, as natural images nearly are at this size)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        (folder / f"{i:06d}.png").write_bytes(buf.getvalue())


def run_arm(arm: str, folder: Path, baseline: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fdm-bench-prepare-") as out:
        proc = subprocess.run(
            [sys.executable, "-c", ARM, arm, str(folder), out, str(baseline)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
    if proc.returncode:
        raise RuntimeError(f"{arm} on {folder}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default="/tmp/fdm-bench-prepare", help="where the PNG folders are made")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    data = Path(args.data)
    baseline = data / "prepare_data_v3.py"
    baseline.parent.mkdir(parents=True, exist_ok=True)
    baseline.write_bytes(
        subprocess.check_output(["git", "show", f"{BASELINE}:tasks/prepare_data.py"], cwd=ROOT)
    )
    for n in SIZES[mode]:
        folder = data / f"png32_{n}"
        if not folder.exists() or len(list(folder.iterdir())) != n:
            make_folder(folder, n)

    rows = []
    for n in SIZES[mode]:
        runs: dict[str, list[dict[str, float]]] = {"today": [], "ray": []}
        for r in range(REPEATS[mode]):
            for arm in ("today", "ray") if r % 2 == 0 else ("ray", "today"):  # alternate the order
                runs[arm].append(run_arm(arm, data / f"png32_{n}", baseline))
                print(n, arm, runs[arm][-1], flush=True)
        rows.append((n, runs))

    lines = [
        "# prepare_data: in-memory (today, stage v3) vs Ray Data (stage v4), folders of 32x32 PNGs",
        "",
        f"Command: `{command('prepare', mode)}` (run under `flock -x`, nothing else computing).",
        f"Machine: {machine()}. Baseline: tasks/prepare_data.py at {BASELINE} (git show). Ray Data: local "
        "Ray, 2 CPUs. Each cell: median of "
        f"{REPEATS[mode]} fresh processes, arms alternating; ratio spread = min..max over repeats.",
        "",
        "| images | today img/s | Ray Data img/s | ratio (Ray/today) | today peak RSS | Ray Data peak RSS "
        "(sum over processes) | today bytes/img | Ray Data bytes/img |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, runs in rows:
        rate = {a: [n / x["seconds"] for x in runs[a]] for a in runs}
        ratios = [b / a for a, b in zip(rate["today"], rate["ray"])]
        peak = {a: statistics.median(x["peak"] for x in runs[a]) / 2**20 for a in runs}
        size = {a: runs[a][0]["bytes_per_image"] for a in runs}
        lines.append(
            f"| {n:,} | {statistics.median(rate['today']):,.0f} | {statistics.median(rate['ray']):,.0f} | "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f}) | "
            f"{peak['today']:,.0f} MiB | {peak['ray']:,.0f} MiB | {size['today']:,.0f} | {size['ray']:,.0f} |"
        )
    big = rows[-1]
    ray_peak = statistics.median(x["peak"] for x in big[1]["ray"]) / 2**20
    today_peak = statistics.median(x["peak"] for x in big[1]["today"]) / 2**20
    ray_rate = statistics.median(big[0] / x["seconds"] for x in big[1]["ray"])
    today_rate = statistics.median(big[0] / x["seconds"] for x in big[1]["today"])
    lines += [
        "",
        "## Goals (issue 29)",
        "",
        "| measure | today | goal | Ray Data (measured) | met |",
        "|---|---|---|---|---|",
        f"| peak memory of the stage, {big[0]:,}-image folder | {today_peak:,.0f} MiB "
        f"(grows with the dataset) | flat: <= 1 GB | {ray_peak:,.0f} MiB "
        f"| {'yes' if ray_peak * 2**20 <= 1e9 else 'no'} |",
        f"| throughput, 32x32 PNG folder, 2 cores ({big[0]:,} images) | {today_rate:,.0f} img/s | >= today "
        f"| {ray_rate:,.0f} img/s | {'yes' if ray_rate >= today_rate else 'no'} |",
        f"| stored bytes per 32x32x3 image | {big[1]['today'][0]['bytes_per_image']:,.0f} | <= 3,100 "
        f"| {big[1]['ray'][0]['bytes_per_image']:,.0f} "
        f"| {'yes' if big[1]['ray'][0]['bytes_per_image'] <= 3100 else 'no'} |",
        "",
        "Peak RSS adds each process's own peak (VmHWM), an upper bound of what they held at once; shared "
        "library pages count once per process.",
    ]
    name = "prepare" if mode == "full" else "prepare_quick"
    ratio = statistics.median(t["seconds"] / r["seconds"] for r, t in zip(big[1]["ray"], big[1]["today"]))
    files = headline(
        name,
        big[0],
        ratio,  # as the largest folder's row shows it
        {"today": today_rate, "ray": ray_rate},
        {"today": today_peak, "ray": ray_peak},
        big[1]["ray"][0]["bytes_per_image"],
    )
    path = write_report(name, "\n".join(lines) + "\n", files)
    print(path.read_text())


def headline(
    name: str, images: int, ratio: float, rate: dict[str, float], peak_mib: dict[str, float], stored: float
) -> dict[str, bytes]:
    """The summary file: the Ray Data stage against today's at the largest folder (`ratio`: the median
    throughput ratio Ray Data / today), each goal met or not."""
    memory_met, bytes_met = peak_mib["ray"] * 2**20 <= 1e9, stored <= 3100
    speed_met = rate["ray"] >= rate["today"]  # as the goals table judges it
    speed = f"{ratio:.2f}x the in-memory stage's throughput"
    if not speed_met:  # a loss in words
        speed = f"the method lost: {1 / ratio:.2f}x slower than the in-memory stage"

    def met(ok: bool) -> str:
        return "met" if ok else "not met"

    return summary(
        name,
        f"the Ray Data stage on {images:,} 32x32 PNGs: {speed} (goal >= it: {met(speed_met)}); "
        f"{stored:,.0f} stored bytes per image (goal <= 3,100: {met(bytes_met)}); peak memory "
        f"{peak_mib['ray']:,.0f} MiB summed over its processes, against {peak_mib['today']:,.0f} MiB for the "
        f"in-memory stage (goal flat <= 1 GB: {met(memory_met)})",
        images=images,
        throughput_ratio=round(ratio, 2),
        ray_images_per_s=round(rate["ray"]),
        today_images_per_s=round(rate["today"]),
        ray_peak_mib=round(peak_mib["ray"]),
        today_peak_mib=round(peak_mib["today"]),
        bytes_per_image=round(stored),
        met=memory_met and speed_met and bytes_met,
    )


if __name__ == "__main__":
    main()
