"""Stage `prepare_data`: a source dataset -> split, shuffled Parquet shards plus a manifest in the store.

Output layout (complete only once _MANIFEST.json exists, written last by `run_stage`)::

    train/part-00000.parquet ...   val/part-00000.parquet ...   _dataset.json   _MANIFEST.json

Each split is a directory of Parquet files only, and the sidecars start with "_", so pyarrow, pandas,
Ray Data, DuckDB or Spark read a split directory (or the whole output, with its `split` column) as is.

Parquet schema of every shard:

    x      fixed_size_list<float32>[D]   one sample flattened, D = prod(shape); images mapped to [-1, 1]
    label  int64                         class index, -1 where the source has no labels
    split  string                        "train" or "val"

The schema metadata key ``fdm.dataset`` (and _dataset.json, which adds the file list per split) holds
JSON with ``shape`` ([C, H, W] or [D]), ``num_classes``, ``class_names``, ``normalization``
(``{"from": [lo, hi], "to": [-1, 1]}``, or null where values are stored as given) and ``source``.
Rows are written in a seeded random order, so re-running with the same inputs and config reproduces
every file byte for byte (Parquet stores no timestamps).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import posixpath
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from infra.store import ArtifactStore, NotFoundError, open_store
from tasks.stage import BadInputError, StageContext, StageResult
from tasks.stages.prepare_data import (
    Cifar10Source,
    DataConfig,
    DigitsSource,
    ImageFolderSource,
    NpySource,
    Toy2DSource,
)

DATASET_META_NAME = "_dataset.json"
SCHEMA_META_KEY = b"fdm.dataset"
SPLITS = ("train", "val")
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataError(BadInputError):
    """Unusable input data; the message names the offending file or folder."""


@dataclass
class _Samples:
    """A loaded source: samples in source order, before normalisation."""

    x: np.ndarray  # [N, *shape]
    labels: np.ndarray  # int64 [N], -1 where unlabelled
    value_range: tuple[float, float] | None  # mapped to [-1, 1]; None: stored as given
    class_names: list[str] = field(default_factory=list)
    num_classes: int = 0


def _read(store: ArtifactStore, path: str) -> bytes:
    try:
        return store.read_bytes(path)
    except NotFoundError as err:
        raise DataError(f"{store.uri(path)}: file not found") from err


def _file_store(uri: str, endpoint_url: str | None) -> tuple[ArtifactStore, str]:
    """The store holding a single file, and the file's name in it."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    return open_store(parent or ".", endpoint_url), name


def _toy2d(src: Toy2DSource, seed: int) -> _Samples:
    from sklearn import datasets  # imported here: sklearn adds ~1 s to every Ray worker's start otherwise

    rng = np.random.default_rng([seed, 1])
    n = src.n
    if src.toy == "eight_gaussians":
        angles = np.arange(8) * np.pi / 4
        centers = 4 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        x = (centers[rng.integers(0, 8, n)] + 0.5 * rng.standard_normal((n, 2))) / 1.414
    elif src.toy == "two_moons":
        x = datasets.make_moons(n, noise=0.1, random_state=seed)[0] * 2 + np.array([-1.0, -0.2])
    elif src.toy == "checkerboard":
        x1 = rng.random(n) * 4 - 2
        x2 = rng.random(n) - rng.integers(0, 2, n) * 2 + np.floor(x1) % 2
        x = np.stack([x1, x2], axis=1) * 2
    else:
        x = datasets.make_swiss_roll(n, noise=1.0, random_state=seed)[0][:, [0, 2]] / 5
    return _Samples(x=x.astype(np.float32), labels=np.full(n, -1, np.int64), value_range=None)


def _digits(src: DigitsSource) -> _Samples:
    from sklearn.datasets import load_digits  # lazily, as in _toy2d

    digits = load_digits()
    x = digits.images.astype(np.float32)  # [N, 8, 8], background 0
    if src.pad_to is not None:
        lo = (src.pad_to - 8) // 2
        x = np.pad(x, ((0, 0), (lo, src.pad_to - 8 - lo), (lo, src.pad_to - 8 - lo)))
    if src.resize_to is not None:
        size = (src.resize_to, src.resize_to)
        x = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BILINEAR)) for im in x])
    return _Samples(
        x=x[:, None],
        labels=digits.target.astype(np.int64),
        value_range=(0.0, 16.0),
        class_names=[str(i) for i in range(10)],
        num_classes=10,
    )


def _decode_image(data: bytes, uri: str, mode: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert(mode)  # decodes fully, so truncated files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{uri}: unreadable image ({err})") from err


def _image_folder(src: ImageFolderSource, endpoint_url: str | None) -> _Samples:
    store = open_store(src.path, endpoint_url)
    files = [p for p in store.list() if posixpath.splitext(p)[1].lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{store.uri()}: no image files found (folder missing or empty)")
    with_classes = any("/" in p for p in files)
    stray = next((p for p in files if with_classes and "/" not in p), None)
    if stray is not None:
        raise DataError(f"{store.uri(stray)}: image outside a class sub-folder next to class sub-folders")
    class_names = sorted({p.split("/", 1)[0] for p in files}) if with_classes else []
    class_index = {name: i for i, name in enumerate(class_names)}

    images, first = [], None
    with ThreadPoolExecutor(max_workers=8) as pool:  # hides per-object latency on S3
        for path, data in zip(files, pool.map(lambda p: _read(store, p), files)):
            img = _decode_image(data, store.uri(path), src.mode)
            if src.resize_to is not None:
                img = img.resize((src.resize_to, src.resize_to), Image.Resampling.BICUBIC)
            elif first is None:
                first = (path, img.size)
            elif img.size != first[1]:
                raise DataError(
                    f"{store.uri(path)}: image is {img.size[0]}x{img.size[1]}, expected "
                    f"{first[1][0]}x{first[1][1]} like {store.uri(first[0])} (or set resize_to)"
                )
            arr = np.asarray(img, dtype=np.uint8)
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    labels = [class_index[p.split("/", 1)[0]] if with_classes else -1 for p in files]
    return _Samples(
        x=np.stack(images),
        labels=np.asarray(labels, np.int64),
        value_range=(0.0, 255.0),
        class_names=class_names,
        num_classes=len(class_names),
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a batch file cannot run arbitrary code."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data batch")
        return super().find_class(module, name)


def _cifar_batch(data: bytes, uri: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
        x, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise DataError(f"{uri}: not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from err
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise DataError(f"{uri}: b'data' is {x.dtype} {list(x.shape)}, expected uint8 [N, 3072]")
    if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{uri}: b'labels' has shape {list(labels.shape)}, expected {len(x)} integers")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{uri}: labels outside 0..9")
    return x.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar10(src: Cifar10Source, endpoint_url: str | None) -> _Samples:
    store = open_store(src.path, endpoint_url)
    parts = [_cifar_batch(_read(store, name), store.uri(name)) for name in src.batches]
    return _Samples(
        x=np.concatenate([p[0] for p in parts]),
        labels=np.concatenate([p[1] for p in parts]),
        value_range=(0.0, 255.0),
        class_names=list(CIFAR10_CLASSES),
        num_classes=10,
    )


def _npy(src: NpySource, endpoint_url: str | None) -> _Samples:
    store, name = _file_store(src.path, endpoint_url)
    uri = store.uri(name)
    try:
        loaded = np.load(io.BytesIO(_read(store, name)), allow_pickle=False)
        arrays = loaded if isinstance(loaded, np.ndarray) else {k: loaded[k] for k in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{uri}: unreadable array file ({err})") from err
    if isinstance(arrays, np.ndarray):
        if src.labels_key is not None:
            raise DataError(f"{uri}: labels_key needs an .npz file")
        x, labels = arrays, None
    else:
        missing = [k for k in (src.x_key, src.labels_key) if k is not None and k not in arrays]
        if missing:
            raise DataError(f"{uri}: no array {missing[0]!r} (has {sorted(arrays)})")
        x, labels = arrays[src.x_key], arrays.get(src.labels_key or "")
    if x.ndim not in (2, 3, 4) or len(x) == 0 or not np.issubdtype(x.dtype, np.number):
        raise DataError(
            f"{uri}: array is {x.dtype} {list(x.shape)}, expected [N, D], [N, H, W] or [N, C, H, W]"
        )
    if np.issubdtype(x.dtype, np.complexfloating) or not np.isfinite(x).all():
        raise DataError(f"{uri}: array holds complex or non-finite values")
    if labels is None:
        labels = np.full(len(x), -1, np.int64)
    elif labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < -1:
        raise DataError(
            f"{uri}: labels are {labels.dtype} {list(labels.shape)}, expected {len(x)} ints >= -1"
        )
    value_range = src.value_range or ((0.0, 255.0) if x.dtype == np.uint8 else None)
    return _Samples(
        x=x[:, None] if x.ndim == 3 else x,
        labels=labels.astype(np.int64),
        value_range=value_range,
        num_classes=int(labels.max()) + 1 if labels.size else 0,
    )


def _load_source(cfg: DataConfig, endpoint_url: str | None) -> _Samples:
    """Read the configured source into memory (in source order)."""
    src = cfg.source
    if isinstance(src, Toy2DSource):
        return _toy2d(src, cfg.seed)
    if isinstance(src, DigitsSource):
        return _digits(src)
    if isinstance(src, ImageFolderSource):
        return _image_folder(src, endpoint_url)
    if isinstance(src, Cifar10Source):
        return _cifar10(src, endpoint_url)
    return _npy(src, endpoint_url)


def split_indices(n: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded train/val split; each split's indices are in random order (the order rows are written)."""
    perm = np.random.default_rng([seed, 0]).permutation(n)
    n_val = round(n * val_fraction)
    return {"train": perm[n_val:], "val": perm[:n_val]}


def _normalise(x: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    if value_range is None:
        return x.astype(np.float32)
    lo, hi = value_range
    return ((x.astype(np.float64) - lo) * (2.0 / (hi - lo)) - 1.0).astype(np.float32)


def _shard_bytes(
    x: np.ndarray, labels: np.ndarray, split: str, schema: pa.Schema, row_group_rows: int
) -> bytes:
    """One shard as Parquet bytes; nothing in it depends on time, so equal inputs give equal bytes."""
    flat = pa.array(x.reshape(len(x), -1).ravel())
    table = pa.Table.from_arrays(
        [
            pa.FixedSizeListArray.from_arrays(flat, schema.field("x").type.list_size),
            pa.array(labels, pa.int64()),
            pa.array([split] * len(x), pa.string()),
        ],
        schema=schema,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_rows)
    return sink.getvalue().to_pybytes()


def prepare_data(cfg: DataConfig, ctx: StageContext) -> StageResult:
    """Read the source, split it by seed, and stage shuffled Parquet shards and _dataset.json."""
    samples = _load_source(cfg, ctx.endpoint_url)
    shape = list(samples.x.shape[1:])
    splits = split_indices(len(samples.x), cfg.val_fraction, cfg.seed)
    if len(splits["train"]) == 0:
        raise DataError(f"{getattr(cfg.source, 'path', cfg.source.kind)}: no samples left for training")

    vr = samples.value_range
    meta: dict[str, Any] = {
        "shape": shape,
        "num_classes": samples.num_classes,
        "class_names": samples.class_names,
        "normalization": None if vr is None else {"from": list(vr), "to": [-1, 1]},
        "source": cfg.source.model_dump(),
    }
    schema = pa.schema(
        [("x", pa.list_(pa.float32(), math.prod(shape))), ("label", pa.int64()), ("split", pa.string())],
        metadata={SCHEMA_META_KEY: json.dumps(meta, sort_keys=True)},
    )
    files: dict[str, list[str]] = {}
    for split in SPLITS:
        idx = splits[split]
        files[split] = []
        for i, start in enumerate(range(0, len(idx), cfg.shard_rows)):
            take = idx[start : start + cfg.shard_rows]
            name = f"{split}/part-{i:05d}.parquet"
            x = _normalise(samples.x[take], samples.value_range)
            data = _shard_bytes(x, samples.labels[take], split, schema, cfg.row_group_rows)
            ctx.output_path(name).write_bytes(data)
            files[split].append(name)
    meta["splits"] = {s: {"rows": len(splits[s]), "files": files[s]} for s in SPLITS}
    ctx.output_path(DATASET_META_NAME).write_bytes(json.dumps(meta, indent=2, sort_keys=True).encode())
    metrics = {
        "n_train": float(len(splits["train"])),
        "n_val": float(len(splits["val"])),
        "num_classes": float(samples.num_classes),
        "n_shards": float(sum(len(f) for f in files.values())),
    }
    return StageResult(
        stage="prepare_data",
        key=ctx.key,
        metrics=metrics,
        info={"shape": shape, "num_classes": samples.num_classes, "source": cfg.source.kind},
    )
