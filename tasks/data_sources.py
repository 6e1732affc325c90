"""Sources of the prepare_data stage: each is planned on the driver (cheap: listings, headers, metadata)
into a `SourcePlan` of small read units, and each unit is read, decoded and validated by `decode_unit`
inside Ray Data's `map_batches`, on whichever node runs it.

Every sample carries a stable id (its path, or its index in the source) and a 128-bit seeded hash of that
id (`sample_hashes`): the hash, not the order in which Ray Data delivers blocks, decides a sample's split,
shard and row, so any partitioning on any number of nodes gives the same shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import posixpath
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from infra.store import ArtifactStore, NotFoundError, S3Settings, StoreError, open_store
from tasks.stage import BadInputError
from tasks.stages.prepare_data import (
    Cifar10Source,
    DataConfig,
    DigitsSource,
    ImageFolderSource,
    NpySource,
    ParquetSource,
    Toy2DSource,
)

IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CHANNELS = {"RGB": 3, "L": 1}


class DataError(BadInputError):
    """Unusable input data; the message names the offending file or folder."""


@dataclass
class SourcePlan:
    """What the driver learned about a source before reading it: the read units (picklable dicts, one
    per Ray Data task), the sample shape, the stored dtype and what normalisation maps it to [-1, 1]."""

    units: list[dict[str, Any]]
    shape: list[int]
    dtype: str  # "uint8" (raw values, normalised on load) or "float32" (stored in model space)
    value_range: tuple[float, float] | None  # of the raw values; None: stored as given
    class_names: list[str] = field(default_factory=list)
    num_classes: int = 0


def sample_hashes(ids: list[str], seed: int) -> np.ndarray:
    """uint64 [n, 2]: a seeded 128-bit hash of each stable id (the split and row order follow it)."""
    key = str(seed).encode()
    digests = b"".join(hashlib.blake2b(i.encode(), digest_size=16, key=key).digest() for i in ids)
    return np.frombuffer(digests, "<u8").reshape(len(ids), 2)


def in_model_space(x: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """Values mapped from `value_range` to [-1, 1] as float32 (as given where the range is None)."""
    if value_range is None:
        return x.astype(np.float32)
    lo, hi = value_range
    return ((x.astype(np.float64) - lo) * (2.0 / (hi - lo)) - 1.0).astype(np.float32)


@cache
def _store(root: str, s3: S3Settings | None) -> ArtifactStore:
    """One store per worker process and root: S3 clients are slow to create."""
    return open_store(root, s3)


def _read(store: ArtifactStore, path: str) -> bytes:
    try:
        return store.read_bytes(path)
    except NotFoundError as err:
        raise DataError(f"{store.uri(path)}: file not found") from err


def _open_file(store: ArtifactStore, path: str) -> Any:
    try:
        return store.open_input(path)
    except NotFoundError as err:
        raise DataError(f"{store.uri(path)}: file not found") from err


BLOCK_BYTES = 4 << 20  # decoded bytes per Ray Data block when block_rows is not set


def _chunks(n: int, block_rows: int | None, sample_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of one read task each: `block_rows`, or about BLOCK_BYTES of decoded samples."""
    size = block_rows or min(max(BLOCK_BYTES // sample_bytes, 16), 8192)
    return [(start, min(start + size, n)) for start in range(0, n, size)]


# --- in-memory sources (generated or shipped with a package): no Ray Data needed ----------------------


def toy2d(src: Toy2DSource, seed: int) -> np.ndarray:
    """FFJORD's 2-D toy distributions, float32 [n, 2]."""
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
    return x.astype(np.float32)


def digits_images(src: DigitsSource) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits [N, 1, H, W] (values 0..16: uint8 unless resized, then float32) and labels."""
    from sklearn.datasets import load_digits  # lazily, as in toy2d

    data = load_digits()
    x = data.images.astype(np.float32)  # [N, 8, 8], background 0
    if src.pad_to is not None:
        lo = (src.pad_to - 8) // 2
        x = np.pad(x, ((0, 0), (lo, src.pad_to - 8 - lo), (lo, src.pad_to - 8 - lo)))
    if src.resize_to is not None:
        size = (src.resize_to, src.resize_to)
        x = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BILINEAR)) for im in x])
    else:
        x = x.astype(np.uint8)  # whole numbers 0..16: exact in uint8
    return x[:, None], data.target.astype(np.int64)


# --- planning (driver) -------------------------------------------------------------------------------


def _decode_image(data: bytes, uri: str, mode: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert(mode)  # decodes fully, so truncated files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{uri}: unreadable image ({err})") from err


def _image_plan(src: ImageFolderSource, block_rows: int | None, s3: S3Settings | None) -> SourcePlan:
    store = open_store(src.path, s3)
    files = [p for p in store.list() if posixpath.splitext(p)[1].lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{store.uri()}: no image files found (folder missing or empty)")
    with_classes = any("/" in p for p in files)
    stray = next((p for p in files if with_classes and "/" not in p), None)
    if stray is not None:
        raise DataError(f"{store.uri(stray)}: image outside a class sub-folder next to class sub-folders")
    class_names = sorted({p.split("/", 1)[0] for p in files}) if with_classes else []
    class_index = {name: i for i, name in enumerate(class_names)}
    labels = [class_index[p.split("/", 1)[0]] if with_classes else -1 for p in files]
    if src.resize_to is not None:
        size = (src.resize_to, src.resize_to)
    else:  # the first file in listing order is the reference every other image must match
        size = _decode_image(_read(store, files[0]), store.uri(files[0]), src.mode).size
    common = {"kind": "image_folder", "root": src.path, "mode": src.mode, "resize_to": src.resize_to}
    common["size"], common["reference"] = list(size), store.uri(files[0])
    units = [
        {**common, "paths": files[a:b], "labels": labels[a:b]}
        for a, b in _chunks(len(files), block_rows, CHANNELS[src.mode] * size[0] * size[1])
    ]
    shape = [CHANNELS[src.mode], size[1], size[0]]
    return SourcePlan(units, shape, "uint8", (0.0, 255.0), class_names, len(class_names))


def _cifar_plan(src: Cifar10Source) -> SourcePlan:
    units = [{"kind": "cifar10", "root": src.path, "name": name} for name in src.batches]
    return SourcePlan(units, [3, 32, 32], "uint8", (0.0, 255.0), list(CIFAR10_CLASSES), 10)


def _array_header(f: Any, uri: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, offset of the data) of an .npy stream positioned at its start."""
    try:
        version = np.lib.format.read_magic(f)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        shape, fortran, dtype = read_header.get(version, np.lib.format.read_array_header_2_0)(f)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{uri}: unreadable array file ({err})") from err
    return shape, dtype, fortran, f.tell()


def _npz_member(f: Any, key: str, uri: str) -> zipfile.ZipInfo:
    try:
        names = {n.removesuffix(".npy"): n for n in zipfile.ZipFile(f).namelist()}
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataError(f"{uri}: unreadable array file ({err})") from err
    if key not in names:
        raise DataError(f"{uri}: no array {key!r} (has {sorted(names)})")
    return zipfile.ZipFile(f).getinfo(names[key])


def _open_array(store: ArtifactStore, name: str, key: str | None) -> Any:
    """A readable stream of the .npy data: the file itself, or member `key` of an .npz."""
    f = _open_file(store, name)
    if key is None:
        return f
    return zipfile.ZipFile(f).open(_npz_member(f, key, store.uri(name)))


def _is_npz(store: ArtifactStore, name: str) -> bool:
    with _open_file(store, name) as f:
        return f.read(2) == b"PK"


def _npy_plan(src: NpySource, block_rows: int | None, s3: S3Settings | None) -> SourcePlan:
    parent, _, name = src.path.rstrip("/").rpartition("/")
    store = open_store(parent or ".", s3)
    uri = store.uri(name)
    npz = _is_npz(store, name)
    if not npz and src.labels_key is not None:
        raise DataError(f"{uri}: labels_key needs an .npz file")
    x_key = src.x_key if npz else None
    compressed = (
        npz and _npz_member(_open_file(store, name), src.x_key, uri).compress_type != zipfile.ZIP_STORED
    )
    with _open_array(store, name, x_key) as f:
        shape, dtype, fortran, offset = _array_header(f, uri)
        size = f.seek(0, io.SEEK_END)
    n = shape[0] if shape else 0
    if len(shape) not in (2, 3, 4) or n == 0 or not np.issubdtype(dtype, np.number):
        raise DataError(f"{uri}: array is {dtype} {list(shape)}, expected [N, D], [N, H, W] or [N, C, H, W]")
    if np.issubdtype(dtype, np.complexfloating):
        raise DataError(f"{uri}: array holds complex or non-finite values")
    if size < offset + dtype.itemsize * int(np.prod(shape)):
        raise DataError(f"{uri}: unreadable array file (truncated: {size} bytes for {dtype} {list(shape)})")
    if fortran:
        raise DataError(f"{uri}: array is stored in Fortran order; save it C-ordered (np.ascontiguousarray)")
    labels = np.full(n, -1, np.int64)
    if src.labels_key is not None:
        with _open_array(store, name, src.labels_key) as f:
            try:
                labels = np.load(f, allow_pickle=False)
            except (ValueError, OSError, EOFError) as err:
                raise DataError(f"{uri}: unreadable array {src.labels_key!r} ({err})") from err
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < -1:
            raise DataError(f"{uri}: labels are {labels.dtype} {list(labels.shape)}, expected {n} ints >= -1")
    uint8 = dtype == np.uint8
    value_range = src.value_range or ((0.0, 255.0) if uint8 else None)
    common = {"kind": "npy", "root": parent or ".", "name": name, "key": x_key, "offset": offset}
    common |= {"dtype": dtype.str, "row_shape": list(shape[1:]), "value_range": value_range}
    # A compressed member cannot be read from the middle: one unit reads it from the start.
    units = [
        {**common, "start": a, "stop": b, "labels": labels[a:b].tolist()}
        for a, b in ([(0, n)] if compressed else _chunks(n, block_rows, int(np.prod(shape[1:])) * 4))
    ]
    sample_shape = [1, *shape[1:]] if len(shape) == 3 else list(shape[1:])
    num_classes = int(labels.max()) + 1 if n else 0
    return SourcePlan(units, sample_shape, "uint8" if uint8 else "float32", value_range, [], num_classes)


def _parquet_files(store: ArtifactStore, src: ParquetSource) -> list[str]:
    if src.path.endswith(".parquet"):
        return [""]
    names = store.list()
    data = [p for p in names if not posixpath.basename(p).startswith(("_", "."))]
    stray = next((p for p in data if not p.endswith(".parquet")), None)
    if stray is not None:
        raise DataError(f"{store.uri(stray)}: not a .parquet file in a Parquet source folder")
    if not data:
        raise DataError(f"{store.uri()}: no .parquet files found (folder missing or empty)")
    return data


def _parquet_plan(src: ParquetSource, s3: S3Settings | None) -> SourcePlan:
    store = open_store(src.path, s3)
    files = _parquet_files(store, src)
    units, labels, first_x = [], [], None
    for name in files:
        uri = store.uri(name)
        try:
            pf = pq.ParquetFile(_open_file(store, name))
            schema = pf.schema_arrow
            if src.x_column not in schema.names:
                raise DataError(f"{uri}: no column {src.x_column!r} (has {schema.names})")
            if src.label_column is not None:
                if src.label_column not in schema.names:
                    raise DataError(f"{uri}: no column {src.label_column!r} (has {schema.names})")
                labels.append(pf.read(columns=[src.label_column]).column(0).to_numpy(zero_copy_only=False))
            if first_x is None and pf.metadata.num_rows:
                first_x = pf.read_row_group(0, columns=[src.x_column]).column(0)[0]
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{uri}: not a readable Parquet file ({err})") from err
        offset = 0
        for g in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            units.append({"name": name, "row_group": g, "first_row": offset})
            offset += rows
    if first_x is None:
        raise DataError(f"{store.uri()}: the Parquet source has no rows")
    y = np.concatenate(labels) if labels else np.empty(0, np.int64)
    if len(y) and (not np.issubdtype(y.dtype, np.integer) or y.min() < -1):
        raise DataError(f"{store.uri()}: column {src.label_column!r} is {y.dtype}, expected ints >= -1")
    common: dict[str, Any] = {"kind": "parquet", "root": src.path, "x_column": src.x_column}
    common |= {"label_column": src.label_column, "mode": src.mode, "resize_to": src.resize_to}
    num_classes = int(y.max()) + 1 if len(y) else 0
    if isinstance(first_x, pa.BinaryScalar | pa.LargeBinaryScalar | pa.StructScalar):
        ref = store.uri(units[0]["name"]) + ":0"
        encoded = first_x["bytes"].as_py() if isinstance(first_x, pa.StructScalar) else first_x.as_py()
        size = (src.resize_to,) * 2 if src.resize_to else _decode_image(encoded, ref, src.mode).size
        common |= {"images": True, "size": list(size), "reference": ref}
        shape = [CHANNELS[src.mode], size[1], size[0]]
        return SourcePlan([{**common, **u} for u in units], shape, "uint8", (0.0, 255.0), [], num_classes)
    if not isinstance(first_x, pa.ListScalar | pa.LargeListScalar | pa.FixedSizeListScalar):
        raise DataError(
            f"{store.uri(units[0]['name'])}: column {src.x_column!r} is {first_x.type}, "
            "expected encoded images (binary) or a list of numbers"
        )
    width = len(first_x.values)
    shape = list(src.shape) if src.shape is not None else [width]
    if int(np.prod(shape)) != width:
        raise DataError(
            f"{store.uri(units[0]['name'])}: rows hold {width} values, shape {shape} needs "
            f"{int(np.prod(shape))}"
        )
    uint8 = first_x.type.value_type == pa.uint8()
    value_range = src.value_range or ((0.0, 255.0) if uint8 else None)
    common |= {"images": False, "width": width, "uint8": uint8, "value_range": value_range}
    plan_units = [{**common, **u} for u in units]
    return SourcePlan(plan_units, shape, "uint8" if uint8 else "float32", value_range, [], num_classes)


def plan_source(cfg: DataConfig, s3: S3Settings | None) -> SourcePlan:
    """The read units of a Ray Data source, checked as far as listings, headers and metadata allow."""
    src = cfg.source
    if isinstance(src, ImageFolderSource):
        return _image_plan(src, cfg.block_rows, s3)
    if isinstance(src, Cifar10Source):
        store = open_store(src.path, s3)
        missing = next((n for n in src.batches if not store.exists(n)), None)
        if missing is not None:
            raise DataError(f"{store.uri(missing)}: file not found")
        return _cifar_plan(src)
    if isinstance(src, NpySource):
        return _npy_plan(src, cfg.block_rows, s3)
    if isinstance(src, ParquetSource):
        return _parquet_plan(src, s3)
    raise TypeError(f"{src.kind} is an in-memory source")


# --- reading a unit (Ray Data worker) ----------------------------------------------------------------


def _fit(img: Image.Image, unit: dict[str, Any], uri: str) -> np.ndarray:
    """An image resized to `resize_to`, or checked against the reference size; as uint8 [C, H, W]."""
    if unit["resize_to"] is not None:
        img = img.resize((unit["resize_to"], unit["resize_to"]), Image.Resampling.BICUBIC)
    elif list(img.size) != unit["size"]:
        w, h = unit["size"]
        raise DataError(
            f"{uri}: image is {img.size[0]}x{img.size[1]}, expected {w}x{h} like {unit['reference']} "
            "(or set resize_to)"
        )
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _image_unit(unit: dict[str, Any], s3: S3Settings | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    store = _store(unit["root"], s3)
    with ThreadPoolExecutor(max_workers=8) as pool:  # hides per-object latency on S3
        blobs = list(pool.map(lambda p: _read(store, p), unit["paths"]))
    x = np.stack(
        [
            _fit(_decode_image(b, store.uri(p), unit["mode"]), unit, store.uri(p))
            for p, b in zip(unit["paths"], blobs)
        ]
    )
    return unit["paths"], x, np.asarray(unit["labels"], np.int64)


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


def cifar_batch(data: bytes, uri: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: uint8 [N, 3, 32, 32] and int64 labels, checked."""
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


def _cifar_unit(unit: dict[str, Any], s3: S3Settings | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    store = _store(unit["root"], s3)
    x, labels = cifar_batch(_read(store, unit["name"]), store.uri(unit["name"]))
    return [f"{unit['name']}:{i}" for i in range(len(x))], x, labels


def _npy_unit(unit: dict[str, Any], s3: S3Settings | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    store = _store(unit["root"], s3)
    uri = store.uri(unit["name"])
    dtype, start, stop = np.dtype(unit["dtype"]), unit["start"], unit["stop"]
    row = dtype.itemsize * int(np.prod(unit["row_shape"]))
    with _open_array(store, unit["name"], unit["key"]) as f:
        f.seek(unit["offset"] + start * row)
        data = f.read((stop - start) * row)
    if len(data) != (stop - start) * row:
        raise DataError(f"{uri}: unreadable array file (truncated at row {start})")
    x = np.frombuffer(data, dtype).reshape(stop - start, *unit["row_shape"])
    if np.issubdtype(dtype, np.floating) and not np.isfinite(x).all():
        raise DataError(f"{uri}: array holds complex or non-finite values")
    if dtype != np.uint8:
        x = in_model_space(x, unit["value_range"])
    return [str(i) for i in range(start, stop)], x, np.asarray(unit["labels"], np.int64)


def _parquet_unit(unit: dict[str, Any], s3: S3Settings | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    store = _store(unit["root"], s3)
    uri = store.uri(unit["name"])
    columns = [unit["x_column"]] + ([unit["label_column"]] if unit["label_column"] else [])
    try:
        table = pq.ParquetFile(_open_file(store, unit["name"])).read_row_group(
            unit["row_group"], columns=columns
        )
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{uri}: unreadable row group {unit['row_group']} ({err})") from err
    n, first = table.num_rows, unit["first_row"]
    ids = [f"{unit['name']}:{first + i}" for i in range(n)]
    col = table.column(0).combine_chunks()
    if unit["images"]:
        blobs = (col.field("bytes") if pa.types.is_struct(col.type) else col).to_pylist()
        x = np.stack(
            [
                _fit(_decode_image(b, f"{uri}:{first + i}", unit["mode"]), unit, f"{uri}:{first + i}")
                for i, b in enumerate(blobs)
            ]
        )
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != unit["width"])
        if bad.size:
            raise DataError(
                f"{uri}:{first + bad[0]}: row holds {lengths[bad[0]]} values, expected {unit['width']}"
            )
        values = col.flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
        if not unit["uint8"]:
            if not np.isfinite(values.astype(np.float64)).all():
                raise DataError(f"{uri}: column {unit['x_column']!r} holds non-finite values")
            values = in_model_space(values, unit["value_range"])
        x = values.astype(np.uint8) if unit["uint8"] else values
    labels = (
        table.column(1).to_numpy(zero_copy_only=False).astype(np.int64)
        if unit["label_column"]
        else np.full(n, -1, np.int64)
    )
    return ids, x, labels


_READERS = {"image_folder": _image_unit, "cifar10": _cifar_unit, "npy": _npy_unit, "parquet": _parquet_unit}


def decode_unit(batch: dict[str, np.ndarray], s3: S3Settings | None, seed: int) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function: read, decode and validate one unit (a JSON row from `plan_source`)
    into rows (hash, label, x [n, D], node). A DataError, or a store's error naming the object, comes back
    as a one-row block {"error": message, "error_type": name}, so the driver raises the same error."""
    import ray

    unit = json.loads(batch["unit"][0])
    try:
        ids, x, labels = _READERS[unit["kind"]](unit, s3)
    except (DataError, StoreError) as err:
        kind = "DataError" if isinstance(err, DataError) else "StoreError"
        return {"error": np.asarray([str(err)]), "error_type": np.asarray([kind])}
    h = sample_hashes(ids, seed)
    node = ray.get_runtime_context().get_node_id()
    return {
        "h1": h[:, 0],
        "h2": h[:, 1],
        "label": labels,
        "x": x.reshape(len(x), -1),
        "node": np.full(len(x), node),
    }
