"""The stage cache and its integrity: which stored output a stage may be served from, and what happens when
a consumer finds an input's bytes differ from its manifest.

A stage is a hit when its key's current output has a complete manifest (every listed file present at its
recorded size) whose recorded input digests equal the current digests of the outputs it consumes; the bytes
are verified when a consumer reads them. A consumer that finds them changed quarantines that input's
version (`_CORRUPT.json` written beside it, the key's CURRENT and checkpoints removed) and fails with
CorruptInputError: the producer is then recomputed from scratch, and everything downstream misses, since
the inputs it recorded no longer match. Torch-free.
"""

from __future__ import annotations

import json
import posixpath
import socket
import uuid
from datetime import datetime, timezone

from infra.manifest import (
    CURRENT,
    CorruptOutputError,
    IncompleteOutputError,
    Manifest,
    check_present,
    read_manifest,
)
from infra.store import ArtifactStore, NotFoundError, StoreError
from tasks.graph import StageSpec
from tasks.stage import StageResult

CORRUPT_NOTE = "_CORRUPT.json"


class CorruptInputError(StoreError):
    """An input's bytes differ from its manifest: `producer` (a stage name) is recomputed from scratch."""

    def __init__(self, message: str, producer: str) -> None:
        super().__init__(message, producer)  # all in args: it pickles across Ray
        self.producer = producer

    def __str__(self) -> str:
        return self.args[0]


def current_output(store: ArtifactStore, spec: StageSpec) -> tuple[str, Manifest] | None:
    """The version directory and manifest of the key's current complete output, or None; a listed file
    that is missing or has the wrong size makes it incomplete (one listing, no file read)."""
    try:
        version = store.read_bytes(posixpath.join(spec.out_root, CURRENT)).decode().strip()
    except NotFoundError:
        return None
    prefix = posixpath.join(spec.out_root, version)
    try:
        return prefix, check_present(store, prefix)
    except (IncompleteOutputError, CorruptOutputError):
        return None


def input_digests(spec: StageSpec, ups: dict[str, StageResult]) -> dict[str, str]:
    """The digests of the outputs this stage consumes, by input name."""
    return {name: ups[stage].digest for name, stage in spec.inputs.items()}


def serve(store: ArtifactStore, spec: StageSpec, ups: dict[str, StageResult]) -> StageResult | None:
    """The stage's result from the cache, if its current output was made from these very inputs."""
    found = current_output(store, spec)
    if found is None:
        return None
    prefix, manifest = found
    if manifest.result is None or manifest.inputs != input_digests(spec, ups):
        return None
    result = StageResult.from_record(manifest.result, store, manifest.digest)
    result.info["output_version"] = posixpath.basename(prefix)
    return result


def new_version() -> str:
    """A fresh, sortable version directory name for one computation of a key."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def differs_from(
    store: ArtifactStore, previous: tuple[str, Manifest] | None, prefix: str, inputs: dict[str, str]
) -> str | None:
    """The previous version's name if it was made from the same inputs yet holds other files (names or
    sha256) than the new output at `prefix`; None when there is none to compare or they are equal."""
    if previous is None or previous[1].inputs != inputs:
        return None
    files = {name: e.sha256 for name, e in read_manifest(store, prefix).files.items()}
    if files == {name: e.sha256 for name, e in previous[1].files.items()}:
        return None
    return posixpath.basename(previous[0])


def corrupt_cause(err: BaseException) -> CorruptOutputError | None:
    """The CorruptOutputError behind `err` (itself, or in its chain of causes), if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, CorruptOutputError) and err.uri:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def quarantine(
    store: ArtifactStore, spec: StageSpec, ups: dict[str, StageResult], err: CorruptOutputError
) -> CorruptInputError | None:
    """Take the input version holding the corrupt file out of service: a `_CORRUPT.json` note beside its
    manifest, its key's CURRENT removed (if it still names it) and its key's checkpoints deleted, so its
    next computation starts from scratch. None if the file belongs to no input of `spec`."""
    for stage in spec.inputs.values():
        up = ups[stage]
        if not err.uri.startswith(up.output_uri.rstrip("/") + "/"):
            continue
        version_dir = up.output_uri[len(store.root_uri) :].strip("/")  # outputs are store.uri(prefix)
        out_root, version = posixpath.split(version_dir)
        note = {
            "file": err.uri,
            "expected_sha256": err.expected,
            "actual_sha256": err.actual,
            "detected_by": spec.name,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
        }
        store.write_bytes(posixpath.join(version_dir, CORRUPT_NOTE), json.dumps(note, indent=2).encode())
        try:
            current = store.read_bytes(posixpath.join(out_root, CURRENT)).decode().strip()
        except NotFoundError:
            current = None
        if current == version:
            store.delete(posixpath.join(out_root, CURRENT))
        store.delete_prefix(posixpath.join("checkpoints", up.stage, up.key))
        return CorruptInputError(
            f"corruption: {err.uri}: sha256 {err.actual}, expected {err.expected} by its manifest; "
            f"{stage} quarantined: it is recomputed from scratch, and every stage downstream of it",
            stage,
        )
    return None
