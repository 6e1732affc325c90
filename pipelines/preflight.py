"""Checks a run makes before it starts Ray or creates an MLflow run, each failing with one line that names
the config field and the path or value at fault (the CLI exits 2):

- the tracking URI is usable: a sqlite or file store's directory exists and is writable; an http(s)
  server answers (any HTTP status) within a few seconds;
- the store root is writable (a probe file is written and deleted) and, when local, has
  `store.min_free_mb` free;
- every stage still to compute asks for no more CPUs or GPUs than the embedded local cluster has, so a
  stage never waits forever for resources that cannot appear;
- on a joined multi-node cluster, no store or tracking path is local to this machine (`node_local`), and
  every stage still to compute asks for resources some node has (`check_joined`).

It imports neither Ray nor MLflow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from infra.secrets import scrub
from infra.store import LocalStore, StoreError, open_store
from pipelines.config import PipelineConfig
from tasks.graph import StageSpec

PROBE = ".fdm-probe"
HTTP_TIMEOUT_S = 5.0


class PreflightError(Exception):
    """The run cannot start; the message (one line) names the field and what is wrong."""


def _writable_dir(field: str, directory: Path) -> None:
    """`directory` exists, is a directory, and a file can be created in it (a probe: root ignores modes)."""
    if not directory.exists():
        raise PreflightError(f"{field}: directory {directory} does not exist")
    if not directory.is_dir():
        raise PreflightError(f"{field}: {directory} is not a directory")
    probe = directory / f"{PROBE}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PreflightError(f"{field}: cannot write in {directory} ({err.strerror or err})") from None


def check_tracking(uri: str) -> None:
    """The MLflow tracking URI can be written (sqlite, file) or answers (http, https)."""
    field = "tracking.uri"
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :]).expanduser()
        if db.exists() and not db.is_file():
            raise PreflightError(f"{field}: {db} is not a file")
        _writable_dir(field, db.absolute().parent)
    elif uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HTTP_TIMEOUT_S):
                pass
        except urllib.error.HTTPError:
            pass  # the server answered
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise PreflightError(f"{field}: {scrub(uri)} does not answer ({reason})") from None
    elif uri.startswith("file://") or "://" not in uri:
        path = Path(uri.removeprefix("file://")).expanduser().absolute()
        _writable_dir(field, path if path.is_dir() else path.parent)


def _local_root(root: str) -> Path:
    """The local directory of a store root, created if missing; a file in the way is named."""
    path = Path(root.removeprefix("file://")).expanduser().absolute()
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise PreflightError(f"store.root: {parent} is a file, not a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PreflightError(f"store.root: cannot create {path} ({err.strerror or err})") from None
    return path


def check_store(cfg: PipelineConfig) -> None:
    """The store root takes a write (a probe file, deleted) and, if local, has min_free_mb free."""
    root = cfg.store.root
    if not root.startswith("s3://"):
        _local_root(root)
    try:
        store = open_store(root, cfg.store.s3_settings())
        probe = f"{PROBE}-{uuid.uuid4().hex}"
        store.write_bytes(probe, b"")
        store.delete(probe)
    except StoreError as err:
        raise PreflightError(f"store.root: {scrub(str(err))}") from None
    if isinstance(store, LocalStore):
        free_mb = shutil.disk_usage(store.root).free / 2**20
        if free_mb < cfg.store.min_free_mb:
            raise PreflightError(
                f"store.root: {store.root} has {free_mb:.0f} MB free, less than store.min_free_mb "
                f"({cfg.store.min_free_mb:g} MB)"
            )


def local_gpus() -> int:
    """GPUs the embedded cluster would see (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`), without torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def check_resources(stages: list[StageSpec], cpus: float, gpus: float) -> None:
    """Each stage's request fits a cluster of `cpus` CPUs and `gpus` GPUs (GPU requests count only when
    there are GPUs: without any, stages run on CPU)."""
    for spec in stages:
        group = f"resources.{spec.decl.resources}"
        need = spec.resources.get("num_cpus", 1)
        if need > cpus:
            raise PreflightError(
                f"{group}.num_cpus: {spec.name} asks for {need:g} CPUs, the local Ray cluster has {cpus:g}"
            )
        need = spec.resources.get("num_gpus", 0)
        if gpus and need > gpus:
            raise PreflightError(
                f"{group}.num_gpus: {spec.name} asks for {need:g} GPUs, the local Ray cluster has {gpus:g}"
            )


def check_local_resources(stages: list[StageSpec]) -> None:
    """check_resources against the embedded cluster `init_ray` starts: every CPU, every visible GPU."""
    check_resources(stages, float(os.cpu_count() or 1), float(local_gpus()))


def node_local(cfg: PipelineConfig) -> list[str]:
    """The settings of `cfg` that name paths on a machine's own disk (absolute or not): the store root, a
    sqlite or file tracking store. On a multi-node cluster each node would read and write its own."""
    found = []
    uri = cfg.tracking.uri
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        found.append(f"tracking.uri={uri}")
    if "://" not in cfg.store.root or cfg.store.root.startswith("file://"):
        found.append(f"store.root={cfg.store.root}")
    return found


def check_joined(cfg: PipelineConfig, pending: list[StageSpec], allow_local: bool) -> None:
    """On a joined cluster, before anything runs: with more than one node, every node must reach the store
    and the tracking store (no local path, unless `allow_local`: the user knows it is shared); every stage
    still to compute must ask for resources some node has (or an autoscaler can add). PreflightError
    (exit 2) names what is wrong."""
    from infra.placement import Unplaceable, alive_nodes, check

    nodes = alive_nodes()
    local = node_local(cfg)
    if len(nodes) > 1 and local and not allow_local:
        raise PreflightError(
            f"{' and '.join(local)}: a path on this machine's disk, but the cluster has {len(nodes)} nodes, "
            "whose workers would each write their own copy. Store in S3 (--set store.root=s3://BUCKET/fdm) "
            "or on a filesystem every node mounts at the same path, and track to a server (`fdm "
            "tracking-server`, then --set tracking.uri=http://HEAD:5000); --allow-local runs anyway when "
            "the path is shared"
        )
    gpus = any(n.get("GPU", 0) > 0 for n in nodes)
    for spec in pending:
        coordinates = spec.decl.coordinates and spec.decl.coordinates(
            spec.decl.config.model_validate(spec.config)
        )
        if coordinates:
            continue  # its workers ask for the stage's resources, through Ray Train
        bundle = {"CPU": spec.resources["num_cpus"]}
        if gpus and spec.resources["num_gpus"]:
            bundle["GPU"] = spec.resources["num_gpus"]
        try:
            check(f"stage {spec.name} (resources.{spec.decl.resources})", [bundle])
        except Unplaceable as err:
            raise PreflightError(str(err)) from None
