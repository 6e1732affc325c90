"""One artifact-store interface over a local directory and an ``s3://bucket/prefix`` root.

Stages read and write through this, so the same code runs on a laptop and on a cluster with S3.
Paths are relative to the store root and '/'-separated; writes are atomic (a reader sees the old
object or the whole new one, never a partial file).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # boto3 and pyarrow load on first S3 or Arrow use: a cache check needs neither
    import pyarrow.fs as pafs

ENDPOINT_ENV_VARS = ("FDM_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3: the endpoint (None: env FDM_S3_ENDPOINT_URL or AWS_ENDPOINT_URL, else AWS itself),
    seconds to connect, seconds to wait for a response, and how many times a transient error (throttling,
    5xx, reset, timeout) is retried with backoff. A silent endpoint fails after about (retries + 1) x
    read_timeout. The driver builds them from `store.*` and passes them, as a value, to every stage."""

    endpoint_url: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 2


class StoreError(Exception):
    """Base class of artifact-store errors; messages name the offending URI."""


class NotFoundError(StoreError, FileNotFoundError):
    """A file the caller asked for is not in the store."""


class StoreIOError(StoreError, OSError):
    """A filesystem error (disk full, read-only, a file in the way) naming the path; still an OSError,
    with the original errno."""


@contextmanager
def _os_errors(uri: str) -> Iterator[None]:
    """Local filesystem errors (disk full, read-only, a file where a directory should be) as StoreError
    naming the path: "No space left on device" alone does not say where."""
    try:
        yield
    except StoreError:
        raise
    except OSError as err:
        wrapped = StoreIOError(f"{uri}: {err.strerror or err}")
        wrapped.errno = err.errno
        raise wrapped from err


def _clean(path: str) -> str:
    """Normalise a store-relative path ('a//b/./c' -> 'a/b/c') and refuse '..' escaping the root."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StoreError(f"path {path!r} may not contain '..'")
    return "/".join(parts)


class ArtifactStore(ABC):
    """Files under one root URI; all paths are relative to it."""

    root_uri: str

    def __reduce__(self) -> tuple[Any, tuple[str, S3Settings | None]]:
        # Stores pickle by reconstruction (clients are not picklable), so they can enter Ray tasks.
        return open_store, (self.root_uri, getattr(self, "settings", None))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"

    def uri(self, path: str = "") -> str:
        """Full URI of `path` (the root itself for '')."""
        path = _clean(path)
        return f"{self.root_uri}/{path}" if path else self.root_uri

    @abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """Whole content of a file; raises NotFoundError if absent."""

    @abstractmethod
    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomically create or replace a file."""

    @abstractmethod
    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create `path` with `data` only if no such file exists; False if one does (atomic claim)."""

    @abstractmethod
    def exists(self, path: str) -> bool:
        """Whether `path` is a file in the store."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted store-relative paths of all files under the directory `prefix` (recursive)."""

    @abstractmethod
    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Size in bytes of every file under `prefix`, by path (one listing; no file is read)."""

    @abstractmethod
    def upload_dir(self, local_dir: str | os.PathLike[str], prefix: str) -> None:
        """Copy every file under a local directory to `prefix`, keeping relative paths."""

    @abstractmethod
    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> None:
        """Copy every file under `prefix` into a local directory, keeping relative paths."""

    @abstractmethod
    def delete(self, path: str) -> None:
        """Delete one file (no error if it is absent)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every file under the directory `prefix` (no error if there is none)."""

    @abstractmethod
    def arrow_path(self, path: str = "") -> tuple[pafs.FileSystem, str]:
        """A pyarrow FileSystem and the path of `path` in it, for pyarrow readers and writers."""

    def open_input(self, path: str) -> pafs.NativeFile:
        """Seekable file-like object for reading (suits ``pyarrow.parquet.ParquetFile``)."""
        fs, fs_path = self.arrow_path(path)
        try:
            return fs.open_input_file(fs_path)
        except FileNotFoundError as err:
            raise NotFoundError(f"{self.uri(path)}: file not found") from err


class LocalStore(ArtifactStore):
    """A directory on the local filesystem; atomic writes via a temp file and ``os.replace``."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().absolute()
        self.root_uri = str(self.root)

    def _path(self, path: str) -> Path:
        return self.root / _clean(path)

    def read_bytes(self, path: str) -> bytes:
        try:
            return self._path(path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            raise NotFoundError(f"{self.uri(path)}: file not found") from err

    def write_bytes(self, path: str, data: bytes) -> None:
        self._write_atomic(self._path(path), lambda f: f.write(data))

    def create_exclusive(self, path: str, data: bytes) -> bool:
        target = self._path(path)
        with _os_errors(str(target)):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return True

    @staticmethod
    def _write_atomic(target: Path, fill: Any) -> None:
        with _os_errors(str(target)):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    fill(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def exists(self, path: str) -> bool:
        return self._path(path).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(_TMP_PREFIX)
        )

    def sizes(self, prefix: str = "") -> dict[str, int]:
        return {path: self._path(path).stat().st_size for path in self.list(prefix)}

    def upload_dir(self, local_dir: str | os.PathLike[str], prefix: str) -> None:
        src = Path(local_dir)
        for p in sorted(src.rglob("*")):
            if p.is_file():
                with p.open("rb") as fin:
                    target = self._path(posixpath.join(_clean(prefix), p.relative_to(src).as_posix()))
                    self._write_atomic(target, lambda f, fin=fin: shutil.copyfileobj(fin, f))

    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> None:
        base = _clean(prefix)
        for rel in self.list(prefix):
            dest = Path(local_dir) / posixpath.relpath(rel, base or ".")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._path(rel), dest)

    def delete(self, path: str) -> None:
        self._path(path).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        target = self._path(prefix)
        if not target.is_dir():
            return
        if target != self.root:
            shutil.rmtree(target)
            return
        for child in list(target.iterdir()):  # keep the root directory itself
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def arrow_path(self, path: str = "") -> tuple[pafs.FileSystem, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(self._path(path))


@cache
def _s3_client(endpoint_url: str | None, settings: S3Settings) -> Any:
    """One boto3 client per endpoint and settings: clients are thread-safe and slow (~0.1 s) to create."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"max_attempts": settings.retries + 1, "mode": "standard"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


@cache
def _arrow_s3(endpoint_url: str | None, region: str, settings: S3Settings) -> pafs.S3FileSystem:
    """One pyarrow S3 filesystem per endpoint, region and settings, bounded as the boto3 client is."""
    import pyarrow.fs as pafs

    bounds = {
        "connect_timeout": settings.connect_timeout,
        "request_timeout": settings.read_timeout,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=settings.retries + 1),
    }
    if endpoint_url is None:
        return pafs.S3FileSystem(region=region, **bounds)
    scheme, _, host = endpoint_url.partition("://")
    return pafs.S3FileSystem(endpoint_override=host.rstrip("/"), scheme=scheme, region=region, **bounds)


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """botocore and pyarrow failures (timeouts, refused connections, denied requests) as one StoreError
    line naming the object; a missing object as NotFoundError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except StoreError:
        raise
    except ClientError as err:
        if err.response["Error"]["Code"] in ("NoSuchKey", "404"):
            raise NotFoundError(f"{uri}: file not found") from err
        raise StoreError(f"{uri}: {err}") from err
    except FileNotFoundError as err:
        raise NotFoundError(f"{uri}: file not found") from err
    except (BotoCoreError, OSError) as err:
        raise StoreError(f"{uri}: {' '.join(str(err).split())}") from err


class S3Store(ArtifactStore):
    """``s3://bucket/prefix`` through boto3 (writes, listing) and pyarrow's S3FileSystem (random reads).

    An object becomes visible only once its upload completes (single PUT or completed multipart
    upload), which is what makes writes atomic. Credentials come from the standard AWS chain. Every call
    is bounded by the S3Settings in force (connect and read timeouts, retries) and fails as a StoreError
    naming the object.
    """

    def __init__(self, root_uri: str, s3: S3Settings | None = None):
        bucket, _, key_prefix = root_uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise StoreError(f"{root_uri!r}: no bucket in S3 URI")
        self.bucket = bucket
        self.key_prefix = _clean(key_prefix)
        self.root_uri = f"s3://{bucket}/{self.key_prefix}".rstrip("/")
        self.settings = s3 or S3Settings()
        self.endpoint_url = self.settings.endpoint_url

    @property
    def _client(self) -> Any:
        return _s3_client(self.endpoint_url, self.settings)

    @property
    def _arrow_fs(self) -> pafs.S3FileSystem:
        import pyarrow.fs as pafs

        if self.endpoint_url is None:
            with _s3_errors(self.uri()):
                region = pafs.resolve_s3_region(self.bucket)
            return _arrow_s3(None, region, self.settings)
        return _arrow_s3(self.endpoint_url, self._client.meta.region_name or "us-east-1", self.settings)

    def _key(self, path: str) -> str:
        return "/".join(p for p in (self.key_prefix, _clean(path)) if p)

    def _rel(self, key: str) -> str:
        return key[len(self.key_prefix) + 1 :] if self.key_prefix else key

    def read_bytes(self, path: str) -> bytes:
        with _s3_errors(self.uri(path)):
            return self._client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"].read()

    def write_bytes(self, path: str, data: bytes) -> None:
        with _s3_errors(self.uri(path)):
            self._client.put_object(Bucket=self.bucket, Key=self._key(path), Body=data)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """A conditional PUT (If-None-Match: *): S3 refuses it with 412 if the key exists."""
        try:
            with _s3_errors(self.uri(path)):
                self._client.put_object(Bucket=self.bucket, Key=self._key(path), Body=data, IfNoneMatch="*")
        except StoreError as err:
            code = getattr(err.__cause__, "response", {}).get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise
        return True

    def exists(self, path: str) -> bool:
        try:
            with _s3_errors(self.uri(path)):
                self._client.head_object(Bucket=self.bucket, Key=self._key(path))
        except NotFoundError:
            return False
        return True

    def _objects(self, prefix: str) -> dict[str, int]:
        key = self._key(prefix)
        with _s3_errors(self.uri(prefix)):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{key}/" if key else ""
            )
            objects = [(obj["Key"], obj["Size"]) for page in pages for obj in page.get("Contents", [])]
        return {k: size for k, size in objects if not k.endswith("/")}  # skip "directory" markers

    def _keys(self, prefix: str) -> list[str]:
        return list(self._objects(prefix))

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._rel(k) for k in self._keys(prefix))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        return {self._rel(k): size for k, size in sorted(self._objects(prefix).items())}

    def upload_dir(self, local_dir: str | os.PathLike[str], prefix: str) -> None:
        src = Path(local_dir)
        for p in sorted(src.rglob("*")):
            if p.is_file():
                rel = posixpath.join(_clean(prefix), p.relative_to(src).as_posix())
                with _s3_errors(self.uri(rel)):
                    self._client.upload_file(str(p), self.bucket, self._key(rel))

    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> None:
        base = _clean(prefix)
        for rel in self.list(prefix):
            dest = Path(local_dir) / posixpath.relpath(rel, base or ".")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with _s3_errors(self.uri(rel)):
                self._client.download_file(self.bucket, self._key(rel), str(dest))

    def delete(self, path: str) -> None:
        with _s3_errors(self.uri(path)):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(path))

    def delete_prefix(self, prefix: str) -> None:
        keys = self._keys(prefix)
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys per call
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            with _s3_errors(self.uri(prefix)):
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def arrow_path(self, path: str = "") -> tuple[pafs.FileSystem, str]:
        key = self._key(path)
        return self._arrow_fs, f"{self.bucket}/{key}" if key else self.bucket

    def open_input(self, path: str) -> pafs.NativeFile:
        fs, fs_path = self.arrow_path(path)
        with _s3_errors(self.uri(path)):
            return fs.open_input_file(fs_path)


def open_store(root_uri: str, s3: S3Settings | None = None) -> ArtifactStore:
    """The store for a local path, ``file://`` URI or ``s3://bucket/prefix``.

    For S3, `s3` says how to reach it (default: `S3Settings()`); without an endpoint there, the endpoint is
    env ``FDM_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``, else AWS itself.
    """
    if root_uri.startswith("s3://"):
        s3 = s3 or S3Settings()
        if s3.endpoint_url is None:
            endpoint = next((os.environ[v] for v in ENDPOINT_ENV_VARS if os.environ.get(v)), None)
            s3 = replace(s3, endpoint_url=endpoint)
        return S3Store(root_uri, s3)
    if root_uri.startswith("file://"):
        return LocalStore(root_uri.removeprefix("file://"))
    if "://" in root_uri:
        raise StoreError(f"{root_uri!r}: unsupported URI scheme (use a local path or s3://)")
    return LocalStore(root_uri)
