"""Samples in the order of their seeded hash, without a global permutation in memory.

Rows arrive in any order (Ray Data delivers blocks as tasks finish) and are appended to one of 256 local
spill files by the top byte of their hash. Read back bucket by bucket, each sorted by its full 128-bit
hash, they come out in global hash order with one bucket in memory at a time: the same rows give the same
order whatever the partitioning, the node count or the arrival order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

BUCKET_BITS = 8


class HashSpill:
    """Fixed-size records (h1, h2, label, x[width]) spilled to bucket files under `directory`."""

    def __init__(self, directory: str | Path, x_dtype: str, width: int) -> None:
        self.directory = Path(directory)
        self.record = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("label", "<i8"), ("x", x_dtype, (width,))])
        self.rows = 0
        self._files: dict[int, BinaryIO] = {}

    def _path(self, bucket: int) -> Path:
        return self.directory / f"bucket-{bucket:03d}.bin"

    def add(self, h1: np.ndarray, h2: np.ndarray, labels: np.ndarray, x: np.ndarray) -> None:
        """Append rows (x flat, [n, width]) to their buckets."""
        rec = np.empty(len(h1), self.record)
        rec["h1"], rec["h2"], rec["label"], rec["x"] = h1, h2, labels, x
        bucket = (rec["h1"] >> np.uint64(64 - BUCKET_BITS)).astype(np.intp)
        order = np.argsort(bucket, kind="stable")
        rec, bucket = rec[order], bucket[order]
        edges = np.searchsorted(bucket, np.arange((1 << BUCKET_BITS) + 1))
        for b in np.flatnonzero(np.diff(edges)):
            if b not in self._files:
                self._files[b] = open(self._path(b), "ab", buffering=1 << 16)  # noqa: SIM115 (closed in rows_in_order)
            self._files[b].write(rec[edges[b] : edges[b + 1]].tobytes())
        self.rows += len(rec)

    def rows_in_order(self) -> Iterator[np.ndarray]:
        """The spilled records, bucket by bucket, each sorted by (h1, h2); files removed as they are read."""
        for f in self._files.values():
            f.close()
        for b in sorted(self._files):
            path = self._path(b)
            rec = np.fromfile(path, self.record)
            path.unlink()
            yield rec[np.lexsort((rec["h2"], rec["h1"]))]
        self._files.clear()
