"""Peak memory of a driver and its Ray workers, read from /proc (Linux): what the prepare_data benchmark and
its memory-cap test measure. Imports nothing heavy, so importing it adds nothing to the peaks it reads."""

from __future__ import annotations

import contextlib
from pathlib import Path


def process_tree(root: int) -> set[int]:
    """The pids of `root` and of every process descended from it."""
    parent = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found = {root}
    while new := {c for c, pp in parent.items() if pp in found} - found:
        found |= new
    return found


def ray_peak_rss(root: int) -> dict[str, int]:
    """Each process's own peak RSS (VmHWM, bytes), keyed "pid command", of `root` and the Ray workers below
    it: task workers and Ray Data's actors, not Ray's per-node agents."""
    peaks = {}
    for pid in process_tree(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        if pid == root or (cmd.startswith("ray::") and not cmd.endswith("Agent")):
            peaks[f"{pid} {cmd}"] = next(int(s.split()[1]) for s in status if s.startswith("VmHWM")) * 1024
    return peaks
