"""Reading a prepared dataset (local or s3://): a streaming, shuffled batch loader and small helpers.

Every read goes through the dataset's manifest: dataset.json and each shard are checked against their
sha256 before use, so a corrupt or partial dataset is refused with the offending file's URI. Shards are
verified as they are streamed (one shard's bytes in memory at a time), not all up front. uint8 shards are
mapped to float32 model space as they are read (`DatasetMeta.to_model_space`), after shuffling, so the
shuffle buffer holds a quarter of the bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from infra.manifest import Manifest, read_manifest, read_verified
from infra.store import ArtifactStore, S3Settings, open_store
from tasks.prepare_data import DATASET_META_NAME, DataError

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DatasetMeta:
    """What dataset.json records: sample shape, classes, normalisation, source and files per split."""

    shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    normalization: dict[str, Any] | None
    source: dict[str, Any]
    splits: dict[str, dict[str, Any]]
    x_dtype: str = "float32"  # datasets from stage version 3 stored float32 only

    def to_model_space(self, x: np.ndarray) -> np.ndarray:
        """Stored values as float32 model space: uint8 through the recorded normalisation (a 256-entry table
        computed as the stage computed it before it stored uint8), float32 as stored."""
        if self.x_dtype != "uint8":
            return x
        lo, hi = self.normalization["from"] if self.normalization else (0.0, 255.0)
        table = ((np.arange(256, dtype=np.float64) - lo) * (2.0 / (hi - lo)) - 1.0).astype(np.float32)
        return table[x]

    def files(self, split: str) -> list[str]:
        """Shard names of `split`, in written order."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; the dataset has {sorted(self.splits)}")
        return list(self.splits[split]["files"])

    def rows(self, split: str) -> int:
        """Number of samples in `split`."""
        self.files(split)
        return int(self.splits[split]["rows"])


def _open(dataset_uri: str, s3: S3Settings | None) -> tuple[ArtifactStore, Manifest, DatasetMeta]:
    store = open_store(dataset_uri, s3)
    manifest = read_manifest(store, "")
    doc = json.loads(read_verified(store, "", DATASET_META_NAME, manifest))
    meta = DatasetMeta(
        shape=tuple(doc["shape"]),
        num_classes=doc["num_classes"],
        class_names=tuple(doc["class_names"]),
        normalization=doc["normalization"],
        source=doc["source"],
        splits=doc["splits"],
        x_dtype=doc.get("x_dtype", "float32"),
    )
    return store, manifest, meta


def dataset_meta(dataset_uri: str, s3: S3Settings | None = None) -> DatasetMeta:
    """The verified metadata of a prepared dataset."""
    return _open(dataset_uri, s3)[2]


def _shard(store: ArtifactStore, manifest: Manifest, name: str) -> pq.ParquetFile:
    """A shard whose bytes match the manifest, opened from memory."""
    data = read_verified(store, "", name, manifest)
    try:
        return pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{store.uri(name)}: not a readable Parquet shard ({err})") from err


def _row_group(shard: pq.ParquetFile, i: int, uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Row group `i` as stored x [n, D] (flat: numpy concatenates and permutes 2-D rows far faster) and
    labels."""
    try:
        # No Arrow thread pool: a row group is small, and pool threads alive at interpreter exit can abort
        # the process (apache/arrow#34314).
        table = shard.read_row_group(i, columns=["x", "label"], use_threads=False)
        col = table.column("x").combine_chunks()
        if pa.types.is_fixed_size_binary(col.type):  # uint8 samples, one binary value each
            width = col.type.byte_width
            x = np.frombuffer(col.buffers()[1], np.uint8, len(col) * width, col.offset * width)
        else:
            x = col.flatten().to_numpy()
        labels = table.column("label").to_numpy()
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        raise DataError(f"{uri}: unreadable row group {i} ({err})") from err
    return x.reshape(len(labels), -1), labels


def load_split(
    dataset_uri: str, split: str = "train", s3: S3Settings | None = None
) -> tuple[torch.Tensor, torch.Tensor, DatasetMeta]:
    """All of one split in memory, in stored order: x float32 [N, *shape], labels int64 [N], metadata."""
    store, manifest, meta = _open(dataset_uri, s3)
    xs, ys = [np.empty((0, math.prod(meta.shape)), np.float32)], [np.empty(0, np.int64)]
    for name in meta.files(split):
        shard = _shard(store, manifest, name)
        for i in range(shard.num_row_groups):
            x, y = _row_group(shard, i, store.uri(name))
            xs.append(meta.to_model_space(x))
            ys.append(y)
    x = np.concatenate(xs).reshape(-1, *meta.shape)
    return torch.from_numpy(x), torch.from_numpy(np.concatenate(ys)), meta


@dataclass
class ParquetBatches:
    """Shuffled (x, labels) torch batches streamed from a prepared dataset's shards.

    Each epoch visits the shards and their row groups in a seeded random order and mixes rows through a
    shuffle buffer of about `shuffle_buffer` rows, so memory stays bounded by one shard plus the buffer.
    The same seed gives the same batches. Plain fields only, so it pickles into Ray tasks.
    `epochs=None` repeats forever.
    """

    dataset_uri: str
    batch_size: int = 128
    split: str = "train"
    seed: int = 0
    epochs: int | None = 1
    shuffle_buffer: int = 8192
    drop_last: bool = True
    s3: S3Settings | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.shuffle_buffer < 0 or (self.epochs is not None and self.epochs < 0):
            raise ValueError("need batch_size >= 1, shuffle_buffer >= 0 and epochs >= 0 (or None)")

    def __iter__(self) -> Iterator[Batch]:
        store, manifest, meta = _open(self.dataset_uri, self.s3)
        files = meta.files(self.split)
        for epoch in count() if self.epochs is None else range(self.epochs):
            rng = np.random.default_rng([self.seed, epoch])
            chunks = self._chunks(store, manifest, files, rng)
            yield from self._shuffled_batches(chunks, rng, meta)

    @staticmethod
    def _chunks(
        store: ArtifactStore,
        manifest: Manifest,
        files: list[str],
        rng: np.random.Generator,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for f in rng.permutation(len(files)):
            shard = _shard(store, manifest, files[f])
            for i in rng.permutation(shard.num_row_groups):
                yield _row_group(shard, int(i), store.uri(files[f]))

    def _shuffled_batches(
        self,
        chunks: Iterator[tuple[np.ndarray, np.ndarray]],
        rng: np.random.Generator,
        meta: DatasetMeta,
    ) -> Iterator[Batch]:
        # Let the buffer grow to twice its size, shuffle it, emit the first half as batches, keep the rest:
        # every row is copied a bounded number of times, and rows mix across row groups and shards.
        keep = max(self.shuffle_buffer, self.batch_size)
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        held = 0
        for x, y in chunks:
            xs.append(x)
            ys.append(y)
            held += len(y)
            if held >= 2 * keep:
                x_all, y_all = self._shuffle(xs, ys, rng)
                n_out = (held - keep) // self.batch_size * self.batch_size
                yield from self._batches(x_all[:n_out], y_all[:n_out], meta)
                xs, ys, held = [x_all[n_out:]], [y_all[n_out:]], held - n_out
        if held:
            x_all, y_all = self._shuffle(xs, ys, rng)
            n_out = held // self.batch_size * self.batch_size if self.drop_last else held
            yield from self._batches(x_all[:n_out], y_all[:n_out], meta)

    @staticmethod
    def _shuffle(
        xs: list[np.ndarray], ys: list[np.ndarray], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        perm = rng.permutation(sum(len(y) for y in ys))
        return np.concatenate(xs)[perm], np.concatenate(ys)[perm]

    def _batches(self, x: np.ndarray, y: np.ndarray, meta: DatasetMeta) -> Iterator[Batch]:
        for start in range(0, len(y), self.batch_size):
            end = start + self.batch_size
            x_batch = meta.to_model_space(x[start:end])
            yield torch.from_numpy(x_batch).view(-1, *meta.shape), torch.from_numpy(y[start:end])
