"""Manifests: a directory of outputs is complete only once its _MANIFEST.json is written, last.

The manifest lists every file with its size and sha256 (plus row counts of Parquet files) and who
produced it; a stage output's manifest also holds the stage's result and the digests of the inputs it
consumed, so everything served from a cache is covered by it. File digests depend only on file contents;
the production time lives in the manifest alone, so a deterministic stage reproduces the same digests.
The name starts with "_" so Parquet readers (pyarrow, pandas, Ray Data, DuckDB, Spark) skip it.
The manifest protects its own content too: it records the sha256 of its canonical JSON (every field but
that digest), so an edited value in it (a result, a listed digest) reads as corruption, not as a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from infra.store import ArtifactStore, NotFoundError, StoreError

MANIFEST_NAME = "_MANIFEST.json"
CURRENT = "CURRENT"  # in a key's directory: the name of its current complete version
MANIFEST_FORMAT = 3
# Format 2 manifests carry no self digest; they are still read, unprotected, so old stores stay cached.
_SELF_DIGEST_SINCE = 3
_CHUNK = 1 << 20


class IncompleteOutputError(StoreError):
    """The output has no manifest, or a file its manifest lists is missing."""


class CorruptOutputError(StoreError):
    """A file's size or sha256 differs from its manifest entry: `uri` names the file, `expected` and
    `actual` its sha256 (or size) by the manifest and as read."""

    def __init__(self, message: str, uri: str = "", expected: str = "", actual: str = "") -> None:
        super().__init__(message, uri, expected, actual)  # all in args: it pickles across Ray
        self.uri, self.expected, self.actual = uri, expected, actual

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class FileEntry:
    """One listed file: name relative to the output prefix, size in bytes, sha256 hex digest."""

    name: str
    size: int
    sha256: str
    rows: int | None = None


@dataclass(frozen=True)
class Manifest:
    """What an output directory holds and who produced it."""

    files: dict[str, FileEntry]
    producer: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    def _doc(self) -> dict[str, Any]:
        doc = {
            "format": self.format,
            "producer": self.producer,
            "files": [asdict(e) for e in sorted(self.files.values(), key=lambda e: e.name)],
            "inputs": self.inputs,
        }
        if self.result is not None:
            doc["result"] = self.result
        return doc

    def to_json(self) -> bytes:
        doc = self._doc()
        if self.format >= _SELF_DIGEST_SINCE:
            doc["content_sha256"] = _content_sha256(doc)
        return json.dumps(doc, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse a manifest; ManifestTamperedError if its content differs from its recorded digest."""
        doc = json.loads(data)
        recorded = doc.pop("content_sha256", None)
        if doc["format"] >= _SELF_DIGEST_SINCE:
            actual = _content_sha256(doc)
            if recorded != actual:
                raise ManifestTamperedError(str(recorded), actual)
        files = {e["name"]: FileEntry(**e) for e in doc["files"]}
        return cls(
            files=files,
            producer=doc.get("producer", {}),
            result=doc.get("result"),
            inputs=doc.get("inputs", {}),
            format=doc["format"],
        )

    @property
    def digest(self) -> str:
        """The output's identity: sha256 of its manifest, which covers every file and the result."""
        return hashlib.sha256(self.to_json()).hexdigest()

    def check(self, name: str, data: bytes, uri: str) -> bytes:
        """Return `data` if it matches the entry for `name`, else raise CorruptOutputError naming `uri`."""
        entry = self.files.get(name)
        if entry is None:
            raise IncompleteOutputError(f"{uri}: not listed in the manifest")
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != entry.size:
            raise CorruptOutputError(
                f"{uri}: size {len(data)} != {entry.size} in the manifest", uri, entry.sha256, digest
            )
        if digest != entry.sha256:
            raise CorruptOutputError(
                f"{uri}: sha256 {digest} != {entry.sha256} in the manifest", uri, entry.sha256, digest
            )
        return data


class ManifestTamperedError(ValueError):
    """A manifest's content differs from the digest it recorded of itself when it was written."""

    def __init__(self, recorded: str, actual: str) -> None:
        super().__init__(recorded, actual)
        self.recorded, self.actual = recorded, actual


def _content_sha256(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, indent=2, sort_keys=True).encode()).hexdigest()


def _join(prefix: str, name: str) -> str:
    return posixpath.join(prefix, name) if prefix else name


def _code_version() -> str:
    try:
        return metadata.version("fdm-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def file_digest(store: ArtifactStore, path: str) -> tuple[int, str]:
    """Size and sha256 of a stored file, streamed in chunks."""
    h, size = hashlib.sha256(), 0
    with store.open_input(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def write_manifest(
    store: ArtifactStore, prefix: str, producer: dict[str, Any], rows: dict[str, int] | None = None
) -> Manifest:
    """Hash every file under `prefix` and write the manifest last, marking the output complete.

    `producer` (e.g. stage, key, config) is completed with time, host and code version unless given.
    """
    rows = rows or {}
    files = {}
    for path in store.list(prefix):
        name = posixpath.relpath(path, prefix) if prefix else path
        if name == MANIFEST_NAME:
            continue
        size, sha = file_digest(store, path)
        files[name] = FileEntry(name, size, sha, rows.get(name))
    unknown = sorted(set(rows) - set(files))
    if unknown:
        raise ValueError(f"{store.uri(_join(prefix, unknown[0]))}: row count given for a file not written")
    manifest = Manifest(files=files, producer=_producer(producer))
    store.write_bytes(_join(prefix, MANIFEST_NAME), manifest.to_json())
    return manifest


def _producer(producer: dict[str, Any]) -> dict[str, Any]:
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "code_version": _code_version(),
        **producer,
    }


def seal_dir(
    store: ArtifactStore,
    local_dir: str | os.PathLike[str],
    prefix: str,
    producer: dict[str, Any],
    result: dict[str, Any] | None = None,
    inputs: dict[str, str] | None = None,
) -> Manifest:
    """Hash the files of a local directory, upload them under `prefix`, then write the manifest, last.

    Digests are taken from the local files, so sealing never reads back from a remote store."""
    import pyarrow.parquet as pq  # here: reading manifests (cache checks) needs no pyarrow

    root = Path(local_dir)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name == MANIFEST_NAME:
            raise ValueError(f"{path}: a stage must not write its own manifest")
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        rows = pq.read_metadata(path).num_rows if name.endswith(".parquet") else None
        files[name] = FileEntry(name, path.stat().st_size, h.hexdigest(), rows)
    store.upload_dir(root, prefix)
    manifest = Manifest(files=files, producer=_producer(producer), result=result, inputs=inputs or {})
    store.write_bytes(_join(prefix, MANIFEST_NAME), manifest.to_json())
    return manifest


def check_present(store: ArtifactStore, prefix: str) -> Manifest:
    """The manifest of `prefix` if every file it lists is there with its recorded size (one listing, no
    file read); IncompleteOutputError or CorruptOutputError naming the first file that is not."""
    manifest = read_manifest(store, prefix)
    sizes = store.sizes(prefix)
    for name, entry in sorted(manifest.files.items()):
        path = _join(prefix, name)
        if path not in sizes:
            raise IncompleteOutputError(f"{store.uri(path)}: listed in the manifest but missing")
        if sizes[path] != entry.size:
            raise CorruptOutputError(
                f"{store.uri(path)}: size {sizes[path]} != {entry.size} in the manifest",
                store.uri(path),
                f"{entry.size} bytes",
                f"{sizes[path]} bytes",
            )
    return manifest


def current_version(store: ArtifactStore, prefix: str) -> str:
    """`prefix` itself if it holds a manifest, else the version its CURRENT pointer names (a stage key's
    directory, `stages/<kind>/<key>`): every reader of an output follows CURRENT the same way."""
    if store.exists(_join(prefix, MANIFEST_NAME)):
        return prefix
    try:
        version = store.read_bytes(_join(prefix, CURRENT)).decode().strip()
    except NotFoundError:
        return prefix  # neither: reading its manifest names what is missing
    return _join(prefix, version)


def read_manifest(store: ArtifactStore, prefix: str) -> Manifest:
    """The manifest of `prefix`; IncompleteOutputError if there is none."""
    path = _join(prefix, MANIFEST_NAME)
    try:
        data = store.read_bytes(path)
    except NotFoundError as err:
        raise IncompleteOutputError(f"{store.uri(path)}: no manifest, the output is incomplete") from err
    try:
        return Manifest.from_json(data)
    except ManifestTamperedError as err:
        raise CorruptOutputError(
            f"{store.uri(path)}: the manifest was changed after it was written (content sha256 "
            f"{err.actual}, recorded {err.recorded})",
            store.uri(path),
            err.recorded,
            err.actual,
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptOutputError(f"{store.uri(path)}: unreadable manifest ({err})") from err


def verify(store: ArtifactStore, prefix: str) -> Manifest:
    """Check every listed file is present with the listed size and sha256; return the manifest."""
    manifest = read_manifest(store, prefix)
    for name, entry in sorted(manifest.files.items()):
        uri = store.uri(_join(prefix, name))
        try:
            size, sha = file_digest(store, _join(prefix, name))
        except NotFoundError as err:
            raise IncompleteOutputError(f"{uri}: listed in the manifest but missing") from err
        if (size, sha) != (entry.size, entry.sha256):
            raise CorruptOutputError(
                f"{uri}: size/sha256 {size}/{sha} != {entry.size}/{entry.sha256}", uri, entry.sha256, sha
            )
    return manifest


def is_complete(store: ArtifactStore, prefix: str) -> bool:
    """Whether `prefix` holds a manifest whose files are all present and intact."""
    try:
        verify(store, prefix)
    except (IncompleteOutputError, CorruptOutputError):
        return False
    return True


def read_verified(store: ArtifactStore, prefix: str, name: str, manifest: Manifest | None = None) -> bytes:
    """Read one file of a complete output, refusing it unless it matches its manifest entry."""
    manifest = manifest or read_manifest(store, prefix)
    path = _join(prefix, name)
    if name not in manifest.files:
        raise IncompleteOutputError(f"{store.uri(path)}: not listed in the manifest")
    try:
        data = store.read_bytes(path)
    except NotFoundError as err:
        raise IncompleteOutputError(f"{store.uri(path)}: listed in the manifest but missing") from err
    return manifest.check(name, data, store.uri(path))


def clear_output(store: ArtifactStore, prefix: str) -> None:
    """Remove an output directory, its manifest first, so a re-run never looks complete midway."""
    store.delete(_join(prefix, MANIFEST_NAME))
    store.delete_prefix(prefix)
