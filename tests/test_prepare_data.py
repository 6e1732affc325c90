"""prepare_data -> Parquet + manifest -> loader, for every source kind, on local paths and on S3 (moto)."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from sklearn.datasets import load_digits

from infra.manifest import (
    MANIFEST_NAME,
    CorruptOutputError,
    is_complete,
    read_manifest,
    verify,
    write_manifest,
)
from infra.store import ArtifactStore, S3Settings, open_store
from tasks import prepare_data as prep
from tasks.dataset import ParquetBatches, dataset_meta, load_split
from tasks.plots import grid_png
from tasks.prepare_data import DataError
from tasks.registry import STAGES
from tasks.stage import StageContext, StageResult, run_stage
from tasks.stages.prepare_data import CIFAR10_TRAIN_BATCHES, DataConfig


@dataclass
class Place:
    """Where a test keeps its source files and stage outputs: a local dir or an S3 prefix."""

    root: str
    endpoint: str | None

    @property
    def s3(self) -> S3Settings:
        return S3Settings(self.endpoint)

    @property
    def store(self) -> ArtifactStore:
        return open_store(self.root, self.s3)

    def ctx(self, out: str = "stages/prepare_data/k") -> StageContext:
        return StageContext(store_uri=self.root, out_prefix=out, key="k", s3=self.s3)


def prepare_data(cfg: DataConfig, ctx: StageContext) -> StageResult:
    """The stage function through the edge that persists its outputs, as the executor calls it."""
    return run_stage(STAGES["prepare_data"], cfg, ctx)


@pytest.fixture(scope="module", autouse=True)
def _ray_for_data(s3_server, ray_local):
    """One local Ray for the module's Ray Data stages, started once the fake S3 credentials are set, so its
    workers inherit them."""


@pytest.fixture
def local(tmp_path) -> Place:
    return Place(str(tmp_path / "store"), None)


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path) -> Place:
    if request.param == "local":
        return Place(str(tmp_path / "store"), None)
    return Place(request.getfixturevalue("s3_root"), request.getfixturevalue("s3_server"))


def to_model_space(x: np.ndarray, hi: float) -> np.ndarray:
    return (x.astype(np.float64) * (2 / hi) - 1).astype(np.float32)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_cifar(store: ArtifactStore, prefix: str, per_batch: int = 4, seed: int = 0) -> tuple:
    """Tiny batches in the CIFAR-10 python format; returns (x uint8 [N, 3, 32, 32], labels)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for name in CIFAR10_TRAIN_BATCHES:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        store.write_bytes(f"{prefix}/{name}", pickle.dumps(batch, protocol=2))
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.extend(labels)
    return np.concatenate(xs), np.asarray(ys)


def write_image_folder(store: ArtifactStore, prefix: str, seed: int = 0) -> tuple:
    """Two class folders of 6x8 RGB PNGs plus a non-image file; returns (x uint8 [N, 3, 6, 8], labels)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, cls in enumerate(["cat", "dog"]):
        for i in range(3):
            pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            store.write_bytes(f"{prefix}/{cls}/{i}.png", png_bytes(pixels))
            xs.append(pixels.transpose(2, 0, 1))
            ys.append(label)
    store.write_bytes(f"{prefix}/README.txt", b"not an image")
    return np.stack(xs), np.asarray(ys)


def write_npz(store: ArtifactStore, name: str, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (15, 5, 5), dtype=np.uint8)
    y = rng.integers(0, 3, 15)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    store.write_bytes(name, buf.getvalue())
    return x[:, None], y


def source_case(kind: str, place: Place) -> tuple[dict, np.ndarray | None, np.ndarray | None, tuple, int]:
    """(source config, expected x in [-1, 1] or None, expected labels, shape, num_classes) per kind."""
    store = place.store
    if kind == "cifar10":
        x, y = write_cifar(store, "src/cifar")
        return {"kind": kind, "path": store.uri("src/cifar")}, to_model_space(x, 255), y, (3, 32, 32), 10
    if kind == "image_folder":
        x, y = write_image_folder(store, "src/images")
        return {"kind": kind, "path": store.uri("src/images")}, to_model_space(x, 255), y, (3, 6, 8), 2
    if kind == "npy":
        x, y = write_npz(store, "src/arrays.npz")
        src = {"kind": kind, "path": store.uri("src/arrays.npz"), "labels_key": "y"}
        return src, to_model_space(x, 255), y, (1, 5, 5), int(y.max()) + 1
    if kind == "digits":
        d = load_digits()
        return {"kind": kind}, to_model_space(d.images[:, None], 16), d.target, (1, 8, 8), 10
    return {"kind": "toy2d", "toy": "two_moons", "n": 60}, None, None, (2,), 0


def sorted_rows(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> np.ndarray:
    """Rows (label, pixels...) in lexicographic order, to compare datasets regardless of order."""
    rows = np.concatenate(
        [np.asarray(y, np.float64)[:, None], np.asarray(x, np.float64).reshape(len(y), -1)], 1
    )
    return rows[np.lexsort(rows.T[::-1])]


def stream_all(uri: str, place: Place, split: str = "train", **kw) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(ParquetBatches(uri, split=split, s3=place.s3, **kw))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.mark.parametrize("kind", ["cifar10", "image_folder", "npy", "digits", "toy2d"])
def test_round_trip(kind, place):
    src, x_expected, y_expected, shape, num_classes = source_case(kind, place)
    cfg = DataConfig(source=src, seed=3, val_fraction=0.2, shard_rows=7, row_group_rows=3)
    if kind == "digits":
        cfg = cfg.model_copy(update={"shard_rows": 500, "row_group_rows": 128})
    result = prepare_data(cfg, place.ctx())

    uri = result.outputs["dataset"]
    assert uri == place.store.uri("stages/prepare_data/k")
    assert result.info["shape"] == list(shape) and result.info["num_classes"] == num_classes
    manifest = verify(open_store(uri, place.s3), "")
    assert manifest.producer["stage"] == "prepare_data" and manifest.producer["key"] == "k"
    meta = dataset_meta(uri, place.s3)
    assert meta.shape == shape and meta.num_classes == num_classes
    n = int(result.metrics["n_train"] + result.metrics["n_val"])
    assert result.metrics["n_val"] == round(0.2 * n) == meta.rows("val")
    assert sum(manifest.files[f].rows for f in meta.files("train")) == meta.rows("train")

    x_train, y_train = stream_all(uri, place, batch_size=5, shuffle_buffer=4, drop_last=False)
    x_val, y_val, _ = load_split(uri, "val", place.s3)
    assert x_train.dtype == torch.float32 and x_train.shape[1:] == shape and y_train.dtype == torch.int64
    assert len(y_train) == meta.rows("train") and len(y_val) == meta.rows("val")
    x_all, y_all = torch.cat([x_train, x_val]), torch.cat([y_train, y_val])
    if x_expected is None:  # toy2d: generated, so compare the loader with the stored split
        x_stored, y_stored, _ = load_split(uri, "train", place.s3)
        np.testing.assert_array_equal(sorted_rows(x_train, y_train), sorted_rows(x_stored, y_stored))
        assert (y_all == -1).all() and torch.isfinite(x_all).all()
    else:
        np.testing.assert_allclose(sorted_rows(x_all, y_all), sorted_rows(x_expected, y_expected), atol=1e-6)


@pytest.mark.parametrize("kind", ["image_folder", "toy2d"])
def test_preview_draws_the_first_training_samples(kind, local):
    """_preview.png, a sealed output, is the grid (images) or scatter plot (2-D points) of the first stored
    training samples as the loader reads them; a source of other vectors gets none."""
    uri = prepare_data(DataConfig(source=source_case(kind, local)[0]), local.ctx()).outputs["dataset"]
    x, _, meta = load_split(uri)
    title = f"{kind}: the first of {meta.rows('train'):,} training samples"
    expected = grid_png(x[: 64 if x.ndim == 4 else 2000], None, 8, title, label="training data")
    assert prep.PREVIEW_NAME in verify(open_store(uri), "").files
    assert open_store(uri).read_bytes(prep.PREVIEW_NAME) == expected

    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 3), np.float32))
    local.store.write_bytes("src/v.npy", buf.getvalue())
    vectors = DataConfig(source={"kind": "npy", "path": local.store.uri("src/v.npy")})
    out = prepare_data(vectors, local.ctx("v")).outputs["dataset"]
    assert prep.PREVIEW_NAME not in verify(open_store(out), "").files


def test_same_inputs_give_same_digests(local):
    write_image_folder(local.store, "src/images")
    cfg = DataConfig(source={"kind": "image_folder", "path": local.store.uri("src/images")}, shard_rows=4)
    prepare_data(cfg, local.ctx("a"))
    prepare_data(cfg, local.ctx("b"))
    prepare_data(cfg.model_copy(update={"seed": 1}), local.ctx("c"))
    a, b, c = (read_manifest(local.store, p) for p in "abc")
    assert a.files == b.files
    assert a.files != c.files  # the seed changes the split and row order


def test_split_directories_read_as_plain_parquet_datasets(local, ray_local):
    """pyarrow, pandas and Ray Data read a split's directory without options: Parquet files only there."""
    import pandas as pd
    import pyarrow.dataset as ds
    import ray.data

    result = prepare_data(DataConfig(source={"kind": "digits"}, shard_rows=500), local.ctx())
    meta = dataset_meta(result.outputs["dataset"])
    for split in ("train", "val"):
        path = f"{result.outputs['dataset']}/{split}"
        rows = meta.rows(split)
        assert ds.dataset(path).count_rows() == rows
        assert len(pd.read_parquet(path)) == rows
        assert ray.data.read_parquet(path).count() == rows
    whole = ds.dataset(result.outputs["dataset"]).to_table(columns=["split"]).column("split").to_pylist()
    assert whole.count("train") == meta.rows("train") and whole.count("val") == meta.rows("val")


def test_split_is_seeded():
    first, again, other = (prep.split_indices(100, 0.1, s) for s in (0, 0, 1))
    assert all(np.array_equal(first[k], again[k]) for k in ("train", "val"))
    assert set(first["val"]) != set(other["val"])
    assert sorted(np.concatenate([first["train"], first["val"]])) == list(range(100))


def test_digits_pad_and_resize(local):
    cfg = DataConfig(source={"kind": "digits", "pad_to": 16, "resize_to": 32})
    result = prepare_data(cfg, local.ctx())
    x, _, meta = load_split(result.outputs["dataset"], "val")
    assert meta.shape == (1, 32, 32) and x.shape[1:] == (1, 32, 32)
    assert x.min() == -1 and x.max() <= 1 and (x[:, :, :4] == -1).all()  # padding is background


def test_loader_batches_epochs_and_seed(local):
    result = prepare_data(
        DataConfig(source={"kind": "digits"}, shard_rows=300, row_group_rows=64), local.ctx()
    )
    uri, n_train = result.outputs["dataset"], int(result.metrics["n_train"])
    loader = ParquetBatches(uri, batch_size=64, seed=5, epochs=2, shuffle_buffer=200)
    batches = list(loader)
    assert all(len(y) == 64 for _, y in batches) and len(batches) == 2 * (n_train // 64)
    again = list(pickle.loads(pickle.dumps(loader)))  # plain fields: ships into Ray tasks
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = list(ParquetBatches(uri, batch_size=64, seed=6, epochs=1, shuffle_buffer=200))
    assert not torch.equal(batches[0][1], other[0][1])
    half = len(batches) // 2
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(batches[:half], batches[half:]))  # epochs differ
    labels = torch.cat([y for _, y in batches[:half]])
    assert set(labels.tolist()) == set(range(10))


def test_flipped_byte_in_shard_is_refused(place):
    result = prepare_data(DataConfig(source={"kind": "digits"}, shard_rows=600), place.ctx())
    store = open_store(result.outputs["dataset"], place.s3)
    data = bytearray(store.read_bytes("train/part-00001.parquet"))
    data[len(data) // 2] ^= 0x01
    store.write_bytes("train/part-00001.parquet", bytes(data))
    shard_uri = re.escape(store.uri("train/part-00001.parquet"))
    with pytest.raises(CorruptOutputError, match=shard_uri):
        list(ParquetBatches(result.outputs["dataset"], s3=place.s3))
    with pytest.raises(CorruptOutputError, match=shard_uri):
        load_split(result.outputs["dataset"], "train", place.s3)
    assert not is_complete(store, "")


def test_corrupt_parquet_with_matching_manifest_names_file(local):
    result = prepare_data(DataConfig(source={"kind": "digits"}), local.ctx())
    store = open_store(result.outputs["dataset"])
    store.write_bytes("val/part-00000.parquet", b"PAR1 this is not parquet PAR1")
    write_manifest(store, "", {"stage": "prepare_data"})  # digests now match the garbage
    with pytest.raises(DataError, match=re.escape(store.uri("val/part-00000.parquet"))):
        load_split(result.outputs["dataset"], "val")


def test_interrupted_stage_leaves_the_earlier_output_intact(place, monkeypatch):
    cfg = DataConfig(source={"kind": "digits"}, shard_rows=400)
    prepare_data(cfg, place.ctx())  # an earlier complete output at the same prefix
    store, out = place.store, "stages/prepare_data/k"
    before = read_manifest(store, out)
    calls = []
    real = prep._shard_bytes

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("worker killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "_shard_bytes", fail_on_third)
    with pytest.raises(OSError, match="worker killed"):
        prepare_data(cfg, place.ctx())
    # The failed stage wrote only to its local staging directory: the store still holds the old output.
    assert verify(store, out) == before
    assert len(list(ParquetBatches(store.uri(out), s3=place.s3))) > 0


def assert_refused(place: Place, cfg: DataConfig, names: str) -> None:
    with pytest.raises(DataError, match=re.escape(names)) as info:
        prepare_data(cfg, place.ctx())
    assert not place.store.exists(f"stages/prepare_data/k/{MANIFEST_NAME}")
    return info.value


def test_bad_images(place):
    store = place.store
    write_image_folder(store, "src/images")
    folder = {"kind": "image_folder", "path": store.uri("src/images")}
    store.write_bytes("src/images/dog/big.png", png_bytes(np.zeros((6, 9, 3), np.uint8)))
    err = assert_refused(place, DataConfig(source=folder), store.uri("src/images/dog/big.png"))
    assert "9x6" in str(err)
    # resize_to makes differently sized images acceptable
    assert prepare_data(DataConfig(source={**folder, "resize_to": 4}), place.ctx()).info["shape"] == [3, 4, 4]
    store.delete(f"stages/prepare_data/k/{MANIFEST_NAME}")
    store.write_bytes("src/images/dog/big.png", b"\x89PNG garbage")
    assert_refused(place, DataConfig(source=folder), store.uri("src/images/dog/big.png"))
    good = store.read_bytes("src/images/cat/0.png")
    store.write_bytes("src/images/dog/big.png", good[: len(good) // 2])  # truncated
    assert_refused(place, DataConfig(source=folder), store.uri("src/images/dog/big.png"))


def test_missing_and_empty_folders(place, tmp_path):
    store = place.store
    missing = store.uri("src/nowhere")
    assert_refused(place, DataConfig(source={"kind": "image_folder", "path": missing}), missing)
    assert_refused(place, DataConfig(source={"kind": "cifar10", "path": missing}), f"{missing}/data_batch_1")
    assert_refused(place, DataConfig(source={"kind": "npy", "path": f"{missing}/x.npy"}), f"{missing}/x.npy")
    store.write_bytes("src/empty/notes.txt", b"no images here")
    empty = store.uri("src/empty")
    assert_refused(place, DataConfig(source={"kind": "image_folder", "path": empty}), empty)


def test_bad_cifar_batches(place):
    store = place.store
    write_cifar(store, "src/cifar")
    cfg = DataConfig(source={"kind": "cifar10", "path": store.uri("src/cifar")})
    bad = store.uri("src/cifar/data_batch_3")
    whole = store.read_bytes("src/cifar/data_batch_3")
    store.write_bytes("src/cifar/data_batch_3", whole[: len(whole) // 2])  # truncated pickle
    assert_refused(place, cfg, bad)
    wrong = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    store.write_bytes("src/cifar/data_batch_3", pickle.dumps(wrong))
    assert "3072" in str(assert_refused(place, cfg, bad))
    store.write_bytes("src/cifar/data_batch_3", pickle.dumps({b"data": Exploit()}))
    assert "not allowed" in str(assert_refused(place, cfg, bad))


class Exploit:
    """A pickle that would run code when loaded by a plain unpickler."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_bad_arrays(local):
    store = local.store
    arrays = {"vector": np.zeros(10), "nan": np.full((3, 2), np.nan)}
    for name, arr in arrays.items():
        buf = io.BytesIO()
        np.save(buf, arr)
        store.write_bytes(f"src/{name}.npy", buf.getvalue())
        assert_refused(local, DataConfig(source={"kind": "npy", "path": store.uri(f"src/{name}.npy")}), name)
    store.write_bytes("src/cut.npy", store.read_bytes("src/nan.npy")[:60])
    assert_refused(local, DataConfig(source={"kind": "npy", "path": store.uri("src/cut.npy")}), "cut.npy")
    write_npz(store, "src/a.npz")
    src = {"kind": "npy", "path": store.uri("src/a.npz"), "labels_key": "labels"}
    assert "'labels'" in str(assert_refused(local, DataConfig(source=src), store.uri("src/a.npz")))


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"source": {"kind": "toy2d", "toy": "spiral"}}, "toy"),
        ({"source": {"kind": "digits"}, "val_fraction": 1.0}, "val_fraction"),
        ({"source": {"kind": "digits"}, "shards": 3}, "shards"),
        ({"source": {"kind": "cifar10", "path": "x", "colour": True}}, "colour"),
        ({"source": {"kind": "npy", "path": "x", "value_range": [1, 0]}}, "value_range"),
        ({"source": {"kind": "tfrecord"}}, "kind"),
    ],
)
def test_config_errors_name_the_field(config, field):
    with pytest.raises(ValidationError, match=field):
        DataConfig.model_validate(config)


def test_refuses_to_clear_the_store_root(local):
    with pytest.raises(ValueError, match="out_prefix"):
        prepare_data(DataConfig(source={"kind": "digits"}), local.ctx(out="/"))


def shard_digests(place: Place, prefix: str) -> dict[str, str]:
    return {name: f.sha256 for name, f in read_manifest(place.store, prefix).files.items() if "/" in name}


def test_same_shards_whatever_the_partitioning(place):
    """Two runs, with different Ray Data blocks (so different tasks and arrival order), give the same
    shard bytes: split and row order follow the seeded hash of each file's path, not the partitioning."""
    write_image_folder(place.store, "src/images")
    src = {"kind": "image_folder", "path": place.store.uri("src/images")}
    cfg = DataConfig(source=src, val_fraction=0.3, shard_rows=2, row_group_rows=1, block_rows=1)
    prepare_data(cfg, place.ctx("a"))
    prepare_data(cfg.model_copy(update={"block_rows": 4}), place.ctx("b"))
    assert shard_digests(place, "a") == shard_digests(place, "b")
    assert len(shard_digests(place, "a")) == 3  # 4 train rows in 2 shards, 2 val rows in 1
    meta = dataset_meta(place.store.uri("a"), place.s3)
    assert meta.x_dtype == "uint8" and meta.normalization == {"from": [0.0, 255.0], "to": [-1, 1]}


def test_images_are_stored_as_uint8(local):
    """The shards hold the raw bytes (uint8); the loader maps them to [-1, 1]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x, _ = write_image_folder(local.store, "src/images")
    cfg = DataConfig(source={"kind": "image_folder", "path": local.store.uri("src/images")}, val_fraction=0)
    uri = prepare_data(cfg, local.ctx()).outputs["dataset"]
    shard = pq.read_table(f"{uri}/train/part-00000.parquet")
    assert shard.schema.field("x").type == pa.binary(3 * 6 * 8)  # one value of D uint8 per sample
    assert sorted(shard.column("x").to_pylist()) == sorted(bytes(im) for im in x)


def test_loaded_digits_equal_todays_normalised_values(local):
    """Digits are stored as uint8 now; a loaded batch equals the float32 values stage version 3 stored,
    (x - 0) * (2 / 16) - 1 computed in float64, exactly."""
    uri = prepare_data(DataConfig(source={"kind": "digits"}, val_fraction=0.1), local.ctx()).outputs[
        "dataset"
    ]
    meta = dataset_meta(uri)
    assert meta.x_dtype == "uint8"
    todays = ((load_digits().images.astype(np.float64) - 0.0) * (2.0 / 16.0) - 1.0).astype(np.float32)
    x, y = next(iter(ParquetBatches(uri, batch_size=64, seed=1)))
    assert x.dtype == torch.float32 and x.shape == (64, 1, 8, 8)
    by_image = {(int(label), bytes(im)): None for im, label in zip(todays, load_digits().target)}
    assert all((int(label), bytes(im.numpy())) in by_image for im, label in zip(x[:, 0], y))
    x_val, y_val, _ = load_split(uri, "val")
    assert all((int(label), bytes(im.numpy())) in by_image for im, label in zip(x_val[:, 0], y_val))


def test_parquet_source(place):
    """A Parquet source: encoded images in a binary column (as image datasets ship) or numbers in a list
    column, with labels; sidecars skipped, a stray file refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (9, 4, 5, 3), dtype=np.uint8)
    labels = np.arange(9) % 3
    table = pa.table({"image": [png_bytes(p) for p in pixels], "y": labels})
    for i, part in enumerate((table.slice(0, 5), table.slice(5))):
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink, row_group_size=2)
        place.store.write_bytes(f"src/pq/part-{i}.parquet", sink.getvalue().to_pybytes())
    place.store.write_bytes("src/pq/_SUCCESS", b"")
    src = {"kind": "parquet", "path": place.store.uri("src/pq"), "x_column": "image", "label_column": "y"}
    result = prepare_data(DataConfig(source=src, val_fraction=0), place.ctx("p"))
    x, y, meta = load_split(result.outputs["dataset"], "train", place.s3)
    assert meta.shape == (3, 4, 5) and meta.num_classes == 3
    expected = to_model_space(pixels.transpose(0, 3, 1, 2), 255)
    np.testing.assert_array_equal(sorted_rows(x, y), sorted_rows(expected, labels))

    values = rng.standard_normal((6, 2)).astype(np.float32)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": pa.array(list(values), pa.list_(pa.float32()))}), sink)
    place.store.write_bytes("src/vec.parquet", sink.getvalue().to_pybytes())
    vec = {"kind": "parquet", "path": place.store.uri("src/vec.parquet")}
    result = prepare_data(DataConfig(source=vec, val_fraction=0), place.ctx("v"))
    x, y, meta = load_split(result.outputs["dataset"], "train", place.s3)
    assert meta.x_dtype == "float32" and meta.shape == (2,) and (y == -1).all()
    np.testing.assert_array_equal(sorted_rows(x, y), sorted_rows(values, -np.ones(6)))

    place.store.write_bytes("src/pq/notes.txt", b"stray")
    assert_refused(place, DataConfig(source=src), place.store.uri("src/pq/notes.txt"))


# Run in a fresh process (its own one-CPU Ray), so that the peaks read from /proc are this stage's alone.
MEMORY_RUN = r"""
import json, os, sys

import ray
from ray._private import ray_constants

from benchmarks.peak_memory import ray_peak_rss
from tasks.registry import STAGES
from tasks.stage import StageContext, run_stage
from tasks.stages.prepare_data import DataConfig

ray_constants.ENABLE_RAY_CLUSTER = False  # loopback only, as infra.ray_runtime starts it
# A small object store: each process's RSS counts the store's pages it has touched.
ray.init(
    address="local",
    num_cpus=1,
    object_store_memory=150 * 2**20,
    include_dashboard=False,
    logging_level="ERROR",
    log_to_driver=False,
)
folder, store = sys.argv[1:3]
source = {"kind": "image_folder", "path": folder}
cfg = DataConfig(source=source, shard_rows=64, block_rows=64, memory_budget_mb=64)
result = run_stage(STAGES["prepare_data"], cfg, StageContext(store_uri=store, out_prefix="out", key="k"))

print(json.dumps({"metrics": result.metrics, "peaks": ray_peak_rss(os.getpid())}))
"""


@pytest.mark.slow
def test_large_image_folder_is_prepared_under_a_memory_cap(tmp_path):
    """20,000 PNGs of 256x256 RGB (3.9 GB decoded as uint8) are prepared with the peak RSS of the driver
    and all Ray workers together (the sum of each process's own peak, so an upper bound; about 1 GB of it
    is the imports of Ray Data in each process) under 1.75 GiB: the stage streams, it never holds the
    dataset."""
    n, side, cap = 20_000, 256, 1.75 * 2**30
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    distinct = []
    for k in range(50):  # a few distinct images written many times: files are quick to make
        pixels = np.empty((side, side, 3), np.uint8)
        pixels[...] = ramp[None, :, None]
        pixels[k, :, k % 3] = 255 - k
        distinct.append(png_bytes(pixels))
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:05d}.png").write_bytes(distinct[i % len(distinct)])
    decoded = n * side * side * 3
    assert cap < decoded / 2

    run = subprocess.run(
        [sys.executable, "-c", MEMORY_RUN, str(folder), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["metrics"]["n_train"] + report["metrics"]["n_val"] == n
    total = sum(report["peaks"].values())
    assert total < cap, {k: v >> 20 for k, v in report["peaks"].items()}
    print(f"peak RSS, MiB: {total >> 20} in all;", {k: v >> 20 for k, v in report["peaks"].items()})


# A head with no CPUs and two one-CPU worker nodes (the shape of ray_cluster.yaml), in a fresh process.
THREE_NODES_RUN = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from tasks.registry import STAGES
from tasks.stage import StageContext, run_stage
from tasks.stages.prepare_data import DataConfig

folder, store = sys.argv[1:3]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
for _ in range(2):
    cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
cfg = DataConfig(source={"kind": "image_folder", "path": folder}, block_rows=100, shard_rows=500)
result = run_stage(STAGES["prepare_data"], cfg, StageContext(store_uri=store, out_prefix="three", key="k"))
ray.shutdown()
cluster.shutdown()
print(json.dumps(result.metrics))
"""


@pytest.mark.slow
def test_three_nodes_give_the_shards_of_one(local, tmp_path):
    """The same folder on a 3-node cluster (both worker nodes decode) and on this module's one-node Ray
    gives identical shards."""
    rng = np.random.default_rng(0)
    for i in range(2_000):
        local.store.write_bytes(
            f"src/images/{i:04d}.png", png_bytes(rng.integers(0, 256, (8, 8, 3), np.uint8))
        )
    folder = local.store.uri("src/images")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # every node on 127.0.0.1
    run = subprocess.run(
        [sys.executable, "-c", THREE_NODES_RUN, folder, local.root],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["n_nodes"] == 2
    cfg = DataConfig(source={"kind": "image_folder", "path": folder}, block_rows=100, shard_rows=500)
    assert prepare_data(cfg, local.ctx("one")).metrics["n_nodes"] == 1
    assert shard_digests(local, "three") == shard_digests(local, "one")
    assert len(shard_digests(local, "one")) == 5  # 1,900 train rows in 4 shards, 100 val rows in 1
