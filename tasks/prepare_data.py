"""Stage `prepare_data`: a source dataset -> split, shuffled Parquet shards plus a manifest in the store.

Output layout (complete only once _MANIFEST.json exists, written last by `run_stage`)::

    train/part-00000.parquet ...   val/part-00000.parquet ...   _dataset.json   _preview.png   _MANIFEST.json

_preview.png shows the first training samples (in stored order, which the seed shuffles): a grid of up to
8x8 images, or a scatter plot of 2-D points; other shapes get none.

Each split is a directory of Parquet files only, and the sidecars start with "_", so pyarrow, pandas,
Ray Data, DuckDB or Spark read a split directory (or the whole output, with its `split` column) as is.

Parquet schema of every shard:

    x      fixed_size_binary[D] (uint8)          one sample flattened, D = prod(shape)
           or fixed_size_list<float32>[D]
    label  int64                                 class index, -1 where the source has no labels
    split  string                                "train" or "val"

Images (and other uint8 sources) are stored as their raw uint8 bytes, one binary value per sample: the
loader maps them to [-1, 1] as it reads. Float sources are stored as float32, already in model space.
The schema metadata key ``fdm.dataset`` (and _dataset.json, which adds the file list per split) holds
JSON with ``shape`` ([C, H, W] or [D]), ``x_dtype``, ``num_classes``, ``class_names``, ``normalization``
(``{"from": [lo, hi], "to": [-1, 1]}``, or null where values are stored as given) and ``source``.

Split and row order follow a seeded hash of each sample's stable id (path, or index in the source): the
``round(n * val_fraction)`` samples with the smallest hashes form val, each split is cut into shards in
hash order, so rows within a shard are shuffled by the seed. No global permutation is held in memory
(`tasks.hash_order`), and the same config gives the same shards byte for byte on one node or several
(Parquet stores no timestamps).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from infra.store import S3Settings, StoreError
from tasks.data_sources import (
    DataError,
    SourcePlan,
    decode_unit,
    digits_images,
    in_model_space,
    plan_source,
    sample_hashes,
    toy2d,
)
from tasks.hash_order import HashSpill
from tasks.plots import grid_png
from tasks.stage import StageContext, StageResult
from tasks.stages.prepare_data import RAY_DATA_KINDS, DataConfig, DigitsSource, Toy2DSource

__all__ = ["DATASET_META_NAME", "PREVIEW_NAME", "DataError", "prepare_data", "split_indices"]

DATASET_META_NAME = "_dataset.json"
PREVIEW_NAME = "_preview.png"
PREVIEW_IMAGES = 8  # an 8 x 8 grid, of fewer images where they are large:
PREVIEW_VALUES = 1 << 22  # at most this many values (16 MiB as float32) drawn, whatever the image size
PREVIEW_POINTS = 2000
SCHEMA_META_KEY = b"fdm.dataset"
SPLITS = ("train", "val")
_CHUNK = 4096  # rows of an in-memory source spilled at a time


def split_indices(n: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The split rule for a source of `n` indexed samples, each split's indices in stored (hash) order."""
    h = sample_hashes([str(i) for i in range(n)], seed)
    order = np.lexsort((h[:, 1], h[:, 0]))
    n_val = round(n * val_fraction)
    return {"train": order[n_val:], "val": order[:n_val]}


def _in_memory(cfg: DataConfig, spill_dir: str) -> tuple[SourcePlan, HashSpill]:
    """The generated toy2d and the packaged digits sources, spilled in the stage's own process."""
    src = cfg.source
    if isinstance(src, Toy2DSource):
        x, labels = toy2d(src, cfg.seed), np.full(src.n, -1, np.int64)
        plan = SourcePlan([], [2], "float32", None)
    else:
        assert isinstance(src, DigitsSource)
        x, labels = digits_images(src)
        if x.dtype != np.uint8:  # resized: no longer whole numbers
            x = in_model_space(x, (0.0, 16.0))
        plan = SourcePlan([], list(x.shape[1:]), x.dtype.name, (0.0, 16.0), [str(i) for i in range(10)], 10)
    spill = HashSpill(spill_dir, plan.dtype, math.prod(plan.shape))
    for start in range(0, len(x), _CHUNK):
        stop = min(start + _CHUNK, len(x))
        h = sample_hashes([str(i) for i in range(start, stop)], cfg.seed)
        spill.add(h[:, 0], h[:, 1], labels[start:stop], x[start:stop].reshape(stop - start, -1))
    return plan, spill


def _streamed(cfg: DataConfig, s3: S3Settings | None, spill_dir: str) -> tuple[SourcePlan, HashSpill, int]:
    """A file source through Ray Data: units read, decoded and validated by tasks spread over the nodes,
    rows spilled here as blocks arrive. Returns the plan, the spill and how many nodes decoded."""
    import ray
    import ray.data

    from infra.ray_runtime import init_ray

    plan = plan_source(cfg, s3)
    spill = HashSpill(spill_dir, plan.dtype, math.prod(plan.shape))
    nodes: set[str] = set()
    started = init_ray()
    try:
        data_ctx = ray.data.DataContext.get_current()
        data_ctx.enable_progress_bars = False
        limits = data_ctx.execution_options.resource_limits
        data_ctx.execution_options.resource_limits = limits.copy(
            object_store_memory=cfg.memory_budget_mb << 20
        )
        units = ray.data.from_items(
            [{"unit": json.dumps(u)} for u in plan.units], override_num_blocks=len(plan.units)
        )
        rows = units.map_batches(
            decode_unit,
            batch_size=1,
            fn_kwargs={"s3": s3, "seed": cfg.seed},
        )  # Ray Data's default scheduling strategy, SPREAD, places the tasks across the nodes
        for block in rows.iter_batches(batch_size=None, batch_format="numpy"):
            if "error" in block:  # a worker's DataError or StoreError, raised here as itself
                error = DataError if block["error_type"][0] == "DataError" else StoreError
                raise error(str(block["error"][0]))
            spill.add(block["h1"], block["h2"], block["label"], block["x"])
            nodes.update(np.unique(block["node"]).tolist())
    finally:
        if started:
            ray.shutdown()
    return plan, spill, len(nodes)


def _shard_bytes(
    x: np.ndarray, labels: np.ndarray, split: str, schema: pa.Schema, row_group_rows: int
) -> pa.Buffer:
    """One shard as Parquet bytes; nothing in it depends on time, so equal inputs give equal bytes.
    uint8 samples are one fixed-size binary value each: no list levels to build, so writing a row group
    costs about its own size in memory (a list<uint8> column costs several times that)."""
    x_type = schema.field("x").type
    x = np.ascontiguousarray(x).reshape(len(x), -1)
    if pa.types.is_fixed_size_binary(x_type):
        x_col = pa.FixedSizeBinaryArray.from_buffers(x_type, len(x), [None, pa.py_buffer(x)])
    else:  # wraps the numpy buffer: no copy
        x_col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x_type.list_size)
    table = pa.Table.from_arrays(
        [x_col, pa.array(labels, pa.int64()), pa.array([split] * len(x), pa.string())], schema=schema
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_rows, use_dictionary=["label", "split"])
    return sink.getvalue()


def _write_shards(
    rows: Iterator[np.ndarray], n_val: int, cfg: DataConfig, schema: pa.Schema, ctx: StageContext
) -> dict[str, list[str]]:
    """Cut the hash-ordered records into val (the first n_val) and train, and each into shards of
    `shard_rows`; holds at most one bucket and one unfinished shard per split."""
    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    pending: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}

    def flush(split: str, final: bool) -> None:
        held = np.concatenate(pending[split]) if pending[split] else None
        while held is not None and (len(held) >= cfg.shard_rows or (final and len(held))):
            shard, held = held[: cfg.shard_rows], held[cfg.shard_rows :]
            name = f"{split}/part-{len(files[split]):05d}.parquet"
            data = _shard_bytes(shard["x"], shard["label"], split, schema, cfg.row_group_rows)
            ctx.output_path(name).write_bytes(memoryview(data))
            del data
            pa.default_memory_pool().release_unused()  # hand the shard's pages back between shards
            files[split].append(name)
        pending[split] = [] if held is None or not len(held) else [held]

    seen = 0
    for rec in rows:
        cut = min(max(n_val - seen, 0), len(rec))
        seen += len(rec)
        for split, part in (("val", rec[:cut]), ("train", rec[cut:])):
            if len(part):
                pending[split].append(part)
                if sum(len(p) for p in pending[split]) >= cfg.shard_rows:
                    flush(split, final=False)
    for split in SPLITS:
        flush(split, final=True)
    return files


def _preview(shard: str, plan: SourcePlan, title: str) -> bytes | None:
    """The first training samples of `shard` (a local Parquet file) drawn: a grid of 1- or 3-channel
    images, or a scatter of 2-D points; None for any other shape."""
    if len(plan.shape) == 3 and plan.shape[0] in (1, 3):
        rows = max(1, min(PREVIEW_IMAGES**2, PREVIEW_VALUES // math.prod(plan.shape)))
    elif list(plan.shape) == [2]:
        rows = PREVIEW_POINTS
    else:
        return None
    first = pq.ParquetFile(shard).iter_batches(batch_size=rows, columns=["x"], use_threads=False)
    col = next(first).column("x")
    if pa.types.is_fixed_size_binary(col.type):  # uint8 samples, mapped as the loader maps them
        table = in_model_space(np.arange(256), plan.value_range or (0.0, 255.0))
        x = table[np.frombuffer(b"".join(col.to_pylist()), np.uint8).reshape(len(col), -1)]
    else:
        x = col.flatten().to_numpy().reshape(len(col), -1)
    return grid_png(x.reshape(len(x), *plan.shape), None, PREVIEW_IMAGES, title, label="training data")


def prepare_data(cfg: DataConfig, ctx: StageContext) -> StageResult:
    """Read the source (through Ray Data for files), split it by seeded hash, and stage shuffled Parquet
    shards and _dataset.json."""
    with tempfile.TemporaryDirectory(prefix="fdm-prepare-") as spill_dir:
        n_nodes = 1
        if cfg.source.kind in RAY_DATA_KINDS:
            plan, spill, n_nodes = _streamed(cfg, ctx.s3, spill_dir)
        else:
            plan, spill = _in_memory(cfg, spill_dir)
        n = spill.rows
        n_val = round(n * cfg.val_fraction)
        if n - n_val == 0:
            raise DataError(f"{getattr(cfg.source, 'path', cfg.source.kind)}: no samples left for training")

        vr = plan.value_range
        meta: dict[str, Any] = {
            "shape": plan.shape,
            "x_dtype": plan.dtype,
            "num_classes": plan.num_classes,
            "class_names": plan.class_names,
            "normalization": None if vr is None else {"from": list(vr), "to": [-1, 1]},
            "source": cfg.source.model_dump(),
        }
        width = math.prod(plan.shape)
        x_type = pa.binary(width) if plan.dtype == "uint8" else pa.list_(pa.float32(), width)
        schema = pa.schema(
            [("x", x_type), ("label", pa.int64()), ("split", pa.string())],
            metadata={SCHEMA_META_KEY: json.dumps(meta, sort_keys=True)},
        )
        files = _write_shards(spill.rows_in_order(), n_val, cfg, schema, ctx)
    rows = {"train": n - n_val, "val": n_val}
    meta["splits"] = {s: {"rows": rows[s], "files": files[s]} for s in SPLITS}
    ctx.output_path(DATASET_META_NAME).write_bytes(json.dumps(meta, indent=2, sort_keys=True).encode())
    title = f"{cfg.source.kind}: the first of {rows['train']:,} training samples"
    picture = _preview(str(ctx.output_path(files["train"][0])), plan, title)
    if picture is not None:
        ctx.output_path(PREVIEW_NAME).write_bytes(picture)
    metrics = {
        "n_train": float(rows["train"]),
        "n_val": float(n_val),
        "num_classes": float(plan.num_classes),
        "n_shards": float(sum(len(f) for f in files.values())),
        "n_nodes": float(n_nodes),
    }
    return StageResult(
        stage="prepare_data",
        key=ctx.key,
        metrics=metrics,
        info={"shape": plan.shape, "num_classes": plan.num_classes, "source": cfg.source.kind},
    )
