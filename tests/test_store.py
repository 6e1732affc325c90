"""Artifact store and manifests, on a local directory and on S3 served by moto over HTTP."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.manifest import (
    MANIFEST_NAME,
    CorruptOutputError,
    IncompleteOutputError,
    clear_output,
    current_version,
    is_complete,
    read_verified,
    verify,
    write_manifest,
)
from infra.store import LocalStore, NotFoundError, S3Settings, S3Store, StoreError, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_server")
    return open_store(request.getfixturevalue("s3_root"), S3Settings(endpoint))


def flip_byte(store, path: str, offset: int = 10) -> None:
    data = bytearray(store.read_bytes(path))
    data[offset] ^= 0xFF
    store.write_bytes(path, bytes(data))


def test_bytes_round_trip_and_listing(store):
    store.write_bytes("a/b/one.bin", b"1")
    store.write_bytes("a/two.bin", b"22")
    store.write_bytes("ab/three.bin", b"333")
    store.write_bytes("a/two.bin", b"two")  # overwrite
    assert store.read_bytes("a/two.bin") == b"two"
    assert store.exists("a/b/one.bin") and not store.exists("a/b") and not store.exists("nope")
    assert store.list("a") == ["a/b/one.bin", "a/two.bin"]  # "ab/" is not under "a/"
    assert store.list() == ["a/b/one.bin", "a/two.bin", "ab/three.bin"]
    assert store.list("missing") == []
    assert store.uri("a//./two.bin") == f"{store.root_uri}/a/two.bin"


def test_missing_file_and_escaping_path(store):
    with pytest.raises(NotFoundError, match=re.escape(store.uri("x/nope.bin"))):
        store.read_bytes("x/nope.bin")
    with pytest.raises(NotFoundError, match=re.escape(store.uri("x/nope.bin"))):
        store.open_input("x/nope.bin")
    with pytest.raises(StoreError, match=r"\.\."):
        store.read_bytes("../outside")


def test_open_input_and_arrow_path_serve_parquet(store):
    table = pa.table({"v": list(range(100))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    store.write_bytes("t/data.parquet", sink.getvalue().to_pybytes())
    with store.open_input("t/data.parquet") as f:
        assert pq.ParquetFile(f).read().equals(table)
    fs, path = store.arrow_path("t")
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_dir_upload_download_delete(store, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "sub" / "leaf.txt").write_text("leaf")
    store.upload_dir(src, "up")
    assert store.list("up") == ["up/sub/leaf.txt", "up/top.txt"]
    store.download_dir("up", tmp_path / "dst")
    assert (tmp_path / "dst" / "sub" / "leaf.txt").read_text() == "leaf"
    assert (tmp_path / "dst" / "top.txt").read_text() == "top"
    store.write_bytes("keep.txt", b"k")
    store.delete_prefix("up")
    store.delete("keep.txt")
    store.delete("keep.txt")  # deleting an absent file is fine
    assert store.list() == []


def test_store_pickles_by_uri(store):
    clone = pickle.loads(pickle.dumps(store))
    store.write_bytes("p.txt", b"p")
    assert type(clone) is type(store) and clone.read_bytes("p.txt") == b"p"


def test_open_store_schemes_and_env_endpoint(tmp_path, monkeypatch):
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    monkeypatch.setenv("FDM_S3_ENDPOINT_URL", "http://127.0.0.1:1")
    s3 = open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Store) and s3.endpoint_url == "http://127.0.0.1:1"
    assert s3.uri("x") == "s3://bucket/some/prefix/x"
    with pytest.raises(StoreError, match="gs://"):
        open_store("gs://bucket")


def test_local_write_is_atomic(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    store.write_bytes("f.bin", b"old")

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match=f"{tmp_path}/f.bin: disk gone"):
        store.write_bytes("f.bin", b"new")
    assert store.read_bytes("f.bin") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no temp file left behind


def test_manifest_round_trip(store):
    store.write_bytes("out/a.bin", b"alpha")
    store.write_bytes("out/sub/b.bin", b"beta")
    m = write_manifest(store, "out", {"stage": "unit", "key": "k1"}, rows={"a.bin": 5})
    assert store.exists(f"out/{MANIFEST_NAME}")
    assert sorted(m.files) == ["a.bin", "sub/b.bin"]
    assert m.files["a.bin"].rows == 5 and m.files["sub/b.bin"].rows is None
    assert {"stage", "key", "time", "host", "code_version"} <= set(m.producer)
    assert verify(store, "out") == m
    assert is_complete(store, "out")
    assert read_verified(store, "out", "sub/b.bin") == b"beta"


def test_digests_do_not_depend_on_time(store):
    store.write_bytes("out/a.bin", b"alpha")
    first = write_manifest(store, "out", {"stage": "unit", "time": "t0"})
    second = write_manifest(store, "out", {"stage": "unit", "time": "t1"})
    assert first.files == second.files and first.producer["time"] != second.producer["time"]


def test_flipped_byte_is_refused(store):
    store.write_bytes("ckpt/model.bin", bytes(range(64)))
    write_manifest(store, "ckpt", {"stage": "unit"})
    flip_byte(store, "ckpt/model.bin")
    with pytest.raises(CorruptOutputError, match=re.escape(store.uri("ckpt/model.bin"))):
        read_verified(store, "ckpt", "model.bin")
    with pytest.raises(CorruptOutputError, match=r"ckpt/model\.bin"):
        verify(store, "ckpt")
    assert not is_complete(store, "ckpt")


def test_incomplete_outputs(store):
    store.write_bytes("out/a.bin", b"alpha")
    with pytest.raises(IncompleteOutputError, match=MANIFEST_NAME):
        verify(store, "out")
    write_manifest(store, "out", {"stage": "unit"})
    store.delete("out/a.bin")
    with pytest.raises(IncompleteOutputError, match=r"out/a\.bin"):
        verify(store, "out")
    with pytest.raises(IncompleteOutputError, match=r"out/a\.bin"):
        read_verified(store, "out", "a.bin")
    assert not is_complete(store, "out")


def test_clear_output_removes_manifest_and_files(store):
    store.write_bytes("out/a.bin", b"alpha")
    write_manifest(store, "out", {"stage": "unit"})
    clear_output(store, "out")
    assert store.list("out") == [] and not is_complete(store, "out")


def test_a_key_directory_is_read_through_its_current_pointer(tmp_path: Path) -> None:
    """`stages/<kind>/<key>` (what users copy from the store) resolves to the version CURRENT names; a
    version directory resolves to itself; anything else stays as given (its reader names what is missing)."""
    store = open_store(str(tmp_path))
    for version, text in (("v1", b"old"), ("v2", b"new")):
        store.write_bytes(f"stages/k/KEY/{version}/a.txt", text)
        write_manifest(store, f"stages/k/KEY/{version}", {"stage": "k"})
    store.write_bytes("stages/k/KEY/CURRENT", b"v2")
    assert current_version(store, "stages/k/KEY") == "stages/k/KEY/v2"
    assert current_version(store, "stages/k/KEY/v1") == "stages/k/KEY/v1"
    assert read_verified(store, current_version(store, "stages/k/KEY"), "a.txt") == b"new"
    assert current_version(store, "stages/k/NONE") == "stages/k/NONE"
