"""Issue 20, fault by fault, on real components: `fdm run` subprocesses sent SIGTERM/SIGINT or SIGKILL, two
concurrent runs on one store and one sqlite file, a flipped byte in a stored model, preflight failures
(store root a file, read-only, full; tracking unreachable; more CPUs than the machine has), credentials in
URIs, lax or non-text config input, a full disk (a real 1 MiB tmpfs), and a silent S3 endpoint (a TCP
listener on 127.0.0.1 that accepts and never answers)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TOY2D, ray_worker_pid, tiny_toy2d
from mlflow.tracking import MlflowClient

from infra.lease import Lease, acquire_or_wait
from infra.manifest import read_manifest
from infra.secrets import scrub, scrub_tree
from infra.store import LocalStore, S3Settings, StoreError, open_store
from pipelines.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _args(tmp: Path, *extra: str) -> list[str]:
    sets = tiny_toy2d(tmp, "train.steps=100", *extra)
    return ["run", str(TOY2D), *[a for s in sets for a in ("--set", s)]]


def _fdm(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    """`fdm ARGS` as its own process (python -m pipelines.cli), on this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _runs(tmp: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, max_results=1000)


def _wait_for_checkpoint(store_root: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    ckpt = store_root / "checkpoints" / "train_base"
    while time.time() < deadline:
        if any(ckpt.rglob("_MANIFEST.json")):
            return
        if proc.poll() is not None:
            pytest.fail(f"fdm run ended early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("train_base never wrote a checkpoint")


# 1. Interruption ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_the_run_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM/SIGINT during train_base: one line saying what finished and how to resume, exit 128+sig,
    the parent and the running child KILLED, nothing RUNNING; the same command then resumes."""
    args = _args(tmp_path, "train.steps=100000", "train.checkpoint_every=20")
    proc = _fdm(args, tmp_path)
    _wait_for_checkpoint(tmp_path / "store", proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    (line,) = [ln for ln in out.splitlines() if ln.startswith("interrupted by")]
    assert f"interrupted by {sig.name}: 1 of 5 stages finished (prepare_data)" in line
    assert "To resume, run the same `fdm run` command again" in line
    runs = _runs(tmp_path)
    by_stage = {r.data.tags.get("stage", "parent"): r.info.status for r in runs}
    assert by_stage == {"parent": "KILLED", "prepare_data": "FINISHED", "train_base": "KILLED"}, by_stage
    if sig == signal.SIGINT:
        return
    # Resuming: prepare_data served, train_base takes over its dead worker's lease and resumes.
    resumed = _fdm([*_args(tmp_path, "train.steps=60", "train.checkpoint_every=20")], tmp_path)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]


def _kill_session(sid: int, timeout: float = 30) -> None:
    """SIGKILL every process of session `sid` and wait until none is left: a worker that outlived its
    driver would otherwise finish the stage (and drop its checkpoints) under the next run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                        continue  # a zombie: dead already, waiting to be reaped
                    if os.getsid(int(entry.name)) == sid:
                        left.append(int(entry.name))
                        os.kill(int(entry.name), signal.SIGKILL)
                except (OSError, IndexError):  # gone meanwhile
                    continue
        if not left:
            return
        time.sleep(0.2)
    pytest.fail(f"processes of session {sid} outlived SIGKILL: {left}")


def test_killed_driver_is_marked_failed_by_the_next_run(tmp_path: Path) -> None:
    """A driver killed with SIGKILL leaves its runs RUNNING: the next run marks them FAILED (the parent's
    host and pid tags show its driver is gone), takes over the dead worker's lease on train_base at once,
    and resumes it from its checkpoint."""
    args = _args(tmp_path, "train.steps=300", "train.checkpoint_every=20")
    proc = _fdm(args, tmp_path, start_new_session=True)
    _wait_for_checkpoint(tmp_path / "store", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, Ray included
    proc.communicate(timeout=60)
    _kill_session(proc.pid)  # Ray processes that left the process group but not the session
    (dead,) = [r for r in _runs(tmp_path) if "stage" not in r.data.tags]
    assert dead.info.status == "RUNNING"
    assert dead.data.tags["fdm.driver_pid"] == str(proc.pid)
    again = _fdm(args, tmp_path)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    assert f"marked run {dead.info.run_id} FAILED" in out
    runs = {r.info.run_id: r for r in _runs(tmp_path)}
    assert runs[dead.info.run_id].info.status == "FAILED"
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    base = [
        r
        for r in runs.values()
        if r.data.tags.get("stage") == "train_base"
        and r.data.tags.get("mlflow.parentRunId") != dead.info.run_id
    ]
    assert base[0].data.metrics["resumed_from"] >= 20  # the checkpoint of the killed run, not step 0


def test_a_stage_whose_retries_are_used_up_is_failed(tmp_path: Path) -> None:
    """The train_base worker SIGKILLed with no Ray retries left: its child run ends FAILED, not RUNNING."""
    args = _args(tmp_path, "train.steps=100000", "train.checkpoint_every=20", "resources.max_retries=0")
    proc = _fdm(args, tmp_path)
    _wait_for_checkpoint(tmp_path / "store", proc)
    worker = ray_worker_pid("train_base")
    assert worker, "no ray::train_base worker"
    os.kill(worker, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-3000:]
    assert "stage train_base failed" in out
    by_stage = {r.data.tags.get("stage", "parent"): r.info.status for r in _runs(tmp_path)}
    assert by_stage == {"parent": "FAILED", "prepare_data": "FINISHED", "train_base": "FAILED"}, by_stage


# 2. Corruption -----------------------------------------------------------------------------------------


def test_corrupt_model_is_reported_recomputed_from_scratch_and_invalidates_downstream(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A flipped byte in train_base's weights: the run that reads them prints one corruption line (file,
    both sha256, what happens), recomputes train_base from step 0 and every stage below it, including
    evaluate_base whose key did not change, and leaves records that agree."""
    assert main(_args(tmp_path)) == 0
    capsys.readouterr()
    store = LocalStore(tmp_path / "store")
    (key,) = {p.split("/")[2] for p in store.list("stages/train_base")}
    base_root = f"stages/train_base/{key}"
    bad_version = store.read_bytes(f"{base_root}/CURRENT").decode()
    weights = f"{base_root}/{bad_version}/weights.safetensors"
    data = bytearray(store.read_bytes(weights))
    data[len(data) // 2] ^= 0x01
    store.write_bytes(weights, bytes(data))
    old_eval = {p.split("/")[2] for p in store.list("stages/evaluate")}

    # A changed distillation makes distill_4to2 read the teacher's weights.
    assert main(_args(tmp_path, "distill.round.updates=31")) == 0
    out = capsys.readouterr().out.replace("\n", "")
    expected = read_manifest(store, f"{base_root}/{bad_version}").files["weights.safetensors"].sha256
    assert f"corruption: {store.uri(weights)}: sha256 " in out and f"expected {expected}" in out
    assert "train_base quarantined: it is recomputed from scratch" in out
    note = json.loads(store.read_bytes(f"{base_root}/{bad_version}/_CORRUPT.json"))
    assert note["expected_sha256"] == expected and note["detected_by"] == "distill_4to2"

    runs = _runs(tmp_path)
    second = max((r for r in runs if "stage" not in r.data.tags), key=lambda r: r.info.start_time)
    assert second.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == second.info.run_id]
    computed = {
        r.data.tags["stage"]: r
        for r in children
        if r.data.tags["cached"] == "false" and r.info.status == "FINISHED"
    }
    assert set(computed) == {"train_base", "evaluate_base", "distill_4to2", "evaluate_2"}
    assert computed["train_base"].data.metrics["resumed_from"] == 0
    # evaluate_base kept its key, yet missed: its recorded input was the quarantined version.
    assert computed["evaluate_base"].data.tags["key"] in old_eval
    new_version = store.read_bytes(f"{base_root}/CURRENT").decode()
    assert new_version != bad_version
    new_digest = read_manifest(store, f"{base_root}/{new_version}").digest
    for stage, inp in (("evaluate_base", "model"), ("distill_4to2", "teacher")):
        uri = computed[stage].data.tags["output_uri"]
        assert read_manifest(open_store(uri), "").inputs[inp] == new_digest
    # And the next run serves everything from the cache.
    assert main(_args(tmp_path, "distill.round.updates=31")) == 0
    assert "corruption" not in capsys.readouterr().out


# 3. Concurrency ----------------------------------------------------------------------------------------


def test_two_concurrent_runs_compute_each_stage_once(tmp_path: Path) -> None:
    """Two `fdm run` of one config on one store and sqlite file: each stage computed by one of them, the
    other waits on the stage's lease and serves the same output."""
    from infra.tracking import Tracking

    Tracking.setup(f"sqlite:///{tmp_path / 'mlflow.db'}", "fdm-toy2d")  # the db exists before both start
    args = _args(tmp_path, "train.steps=300")
    procs = [_fdm(args, tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    runs = _runs(tmp_path)
    parents = [r for r in runs if "stage" not in r.data.tags]
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    by_stage: dict[str, list] = {}
    for r in runs:
        if "stage" in r.data.tags:
            by_stage.setdefault(r.data.tags["stage"], []).append(r)
    assert len(by_stage) == 5
    for stage, children in by_stage.items():
        assert len(children) == 2, stage
        assert sorted(c.data.tags["cached"] for c in children) == ["false", "true"], stage
        assert len({c.data.tags["output_uri"] for c in children}) == 1, stage
    assert not list((tmp_path / "store").rglob("_LEASE"))


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_root"), S3Settings(request.getfixturevalue("s3_server")))


def test_create_exclusive_and_stale_lease_takeover(store) -> None:
    """O_EXCL locally, a conditional PUT (If-None-Match: *) on moto's S3: one claim wins; a lease whose
    holder process is gone, or whose heartbeat is older than the timeout, is taken over."""
    assert store.create_exclusive("k/_LEASE", b"a")
    assert not store.create_exclusive("k/_LEASE", b"b")
    assert store.read_bytes("k/_LEASE") == b"a"
    first, second = Lease(store, "x/_LEASE", 60), Lease(store, "x/_LEASE", 60)
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    doc = {"host": socket.gethostname(), "pid": int(dead.stdout), "heartbeat": time.time(), "token": "t"}
    store.write_bytes("y/_LEASE", json.dumps(doc).encode())
    assert acquire_or_wait(Lease(store, "y/_LEASE", 60), lambda: None) is None  # taken over at once
    old = {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 61, "token": "t"}
    store.write_bytes("z/_LEASE", json.dumps(old).encode())
    lease = Lease(store, "z/_LEASE", 60)
    assert acquire_or_wait(lease, lambda: None) is None
    assert json.loads(store.read_bytes("z/_LEASE"))["token"] == lease.token


def test_a_waiting_run_serves_the_holders_output(store) -> None:
    """While another holds the lease, the waiter polls; once the output is there it serves it."""
    holder = Lease(store, "w/_LEASE", 60)
    assert holder.acquire()
    box: dict = {}
    timer = threading.Timer(1.0, lambda: (box.update(done="output"), holder.release()))
    timer.start()
    waits: list = []
    got = acquire_or_wait(Lease(store, "w/_LEASE", 60), lambda: box.get("done"), waits.append, poll=0.2)
    assert got == "output" and waits and waits[0]["pid"] == os.getpid()


# 4. Preflight ------------------------------------------------------------------------------------------


def _refused(args: list[str], capsys: pytest.CaptureFixture, *expected: str) -> str:
    import ray

    assert main(args) == 2
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cannot start: "), out
    for e in expected:
        assert e in lines[0], lines[0]
    assert not ray.is_initialized()
    return lines[0]


def test_preflight_store_root_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "store").write_text("not a directory")
    _refused(_args(tmp_path), capsys, "store.root:", str(tmp_path / "store"), "is a file")
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was created


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[callable]:
    """mount(options) -> a fresh mount point (tmpfs, or a read-only bind); skipped where mount is denied."""
    points: list[Path] = []

    def mount(*options: str) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        proc = subprocess.run(["mount", *options, str(point)], capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"mount not permitted here: {proc.stderr.strip()}")
        points.append(point)
        return point

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_preflight_read_only_store_root(tmp_path: Path, mounted, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "ro"
    source.mkdir()
    root = mounted("--bind", "-o", "ro", str(source))
    _refused(_args(tmp_path, f"store.root={root}"), capsys, "store.root:", str(root), "Read-only file system")


def test_preflight_too_little_free_space(tmp_path: Path, mounted, capsys: pytest.CaptureFixture) -> None:
    root = mounted("-t", "tmpfs", "-o", "size=1m", "tmpfs")
    _refused(_args(tmp_path, f"store.root={root}"), capsys, "store.root:", "store.min_free_mb (100 MB)")


def test_preflight_more_cpus_than_the_machine(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    n = os.cpu_count() * 2
    _refused(
        _args(tmp_path, f"resources.evaluate.num_cpus={n}"),
        capsys,
        f"resources.evaluate.num_cpus: evaluate_base asks for {n} CPUs, the local Ray cluster has",
    )


def test_preflight_tracking_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _refused(
        [*_args(tmp_path), "--set", f"tracking.uri=sqlite:///{tmp_path / 'no' / 'such' / 'mlflow.db'}"],
        capsys,
        "tracking.uri: directory",
        "does not exist",
    )
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _refused(
        [*_args(tmp_path), "--set", f"tracking.uri=http://user:PW0rd@127.0.0.1:{port}"],
        capsys,
        f"tracking.uri: http://***@127.0.0.1:{port} does not answer",
    )


# 6. Secrets --------------------------------------------------------------------------------------------


def test_scrub_finds_credentials_in_uris() -> None:
    assert scrub("s3 at http://AKIA:s3cr3t@minio:9000/b") == "s3 at http://***@minio:9000/b"
    signed = "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123&x=1"
    assert scrub(signed) == "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&x=1"
    assert (
        scrub("https://acct.blob.core.windows.net/c?sv=1&sig=ZZZ")
        == "https://acct.blob.core.windows.net/c?sv=1&sig=***"
    )
    assert scrub("s3://bucket/prefix and user@example.com") == "s3://bucket/prefix and user@example.com"
    tree = {"store": {"endpoint_url": "http://u:p@h", "aws_secret_access_key": "k"}, "n": 1}
    assert scrub_tree(tree) == {
        "store": {"endpoint_url": "http://***@h", "aws_secret_access_key": "***"},
        "n": 1,
    }


def test_credentials_in_uris_are_recorded_nowhere(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A password and a signature inside the endpoint URL reach no MLflow record (params, tags, config.yaml,
    summary.json: the sqlite file and every artifact file), no store file and no console line."""
    endpoint = "http://fdmuser:PW-5ecret-1@127.0.0.1:9/?X-Amz-Signature=SIG-5ecret-2"
    assert main(_args(tmp_path, f"store.endpoint_url={endpoint}")) == 0
    out = capsys.readouterr()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "summary.json" for p in files)
    for secret in ("PW-5ecret-1", "SIG-5ecret-2"):
        assert secret not in out.out + out.err
        assert not [p for p in files if secret.encode() in p.read_bytes()]
    runs = _runs(tmp_path)
    parent = next(r for r in runs if "stage" not in r.data.tags)
    assert parent.data.params["store.endpoint_url"] == "http://***@127.0.0.1:9/?X-Amz-Signature=***"


# 7. Strict input ---------------------------------------------------------------------------------------


def test_non_text_config_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"name: x\n\xff\xfe\x00\x81 binary")
    assert main(["run", str(binary)]) == 2
    out = capsys.readouterr().out.strip()
    assert out == f"config error: {binary}: not a text file (byte 8 is not UTF-8); expected YAML"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=true", "train.steps: Input should be a valid integer (got True)"),
        ("train.steps=3.5", "train.steps: Input should be a valid integer (got 3.5)"),
        ("train.fdm=1", "train.fdm: Input should be a valid boolean (got 1)"),
        ("train.lr=.inf", "train.lr: Input should be a finite number (got inf)"),
        ("train.lr=.nan", "train.lr: Input should be a finite number (got nan)"),
        ("train.lr='0.1'", "train.lr: Input should be a valid number (got '0.1')"),
    ],
)
def test_lax_values_are_refused(override: str, message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(TOY2D), "--set", override]) == 2
    assert message in capsys.readouterr().out


def test_an_int_is_still_a_float() -> None:
    from pipelines.config import load_config

    assert load_config(TOY2D, ["train.lr=1", "resources.train.num_cpus=2"]).train.lr == 1.0
    assert load_config(TOY2D, ["train.lr=1e-3"]).train.lr == 0.001  # YAML 1.2 floats, not strings


def test_disk_full_names_the_path(mounted) -> None:
    """ENOSPC on a real 1 MiB tmpfs: the store error names the file it was writing."""
    store = LocalStore(mounted("-t", "tmpfs", "-o", "size=1m", "tmpfs"))
    with pytest.raises(StoreError) as err:
        store.write_bytes("stages/x/weights.bin", os.urandom(2 << 20))
    assert str(err.value) == f"{store.root}/stages/x/weights.bin: No space left on device"
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert not [p for p in store.root.rglob("*") if p.is_file()]  # no partial file left


# 8. Bounded S3 waits -----------------------------------------------------------------------------------


@pytest.fixture
def silent_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """http://127.0.0.1:PORT where a TCP listener accepts connections and never answers."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_silent_s3_endpoint_fails_fast_naming_the_object(silent_endpoint: str) -> None:
    """boto3 (writes, reads, listings) and pyarrow (random reads) give up after (retries+1) x read_timeout."""
    settings = S3Settings(silent_endpoint, connect_timeout=1, read_timeout=1, retries=1)
    store = open_store("s3://bucket/prefix", settings)
    for call in (
        lambda: store.write_bytes("a/x.bin", b"1"),
        lambda: store.read_bytes("a/x.bin"),
        lambda: store.list("a"),
        lambda: store.open_input("a/x.bin"),
    ):
        t0 = time.monotonic()
        with pytest.raises(StoreError) as err:
            call()
        assert time.monotonic() - t0 < 20
        assert str(err.value).startswith("s3://bucket/prefix/a") and "\n" not in str(err.value)


def test_fdm_run_on_a_silent_s3_endpoint_exits_2_in_seconds(
    tmp_path: Path, silent_endpoint: str, capsys: pytest.CaptureFixture
) -> None:
    t0 = time.monotonic()
    args = _args(
        tmp_path,
        "store.root=s3://bucket/run",
        f"store.endpoint_url={silent_endpoint}",
        "store.connect_timeout=1",
        "store.read_timeout=1",
        "store.retries=1",
    )
    line = _refused(args, capsys, "store.root: s3://bucket/run/.fdm-probe-", "Read timeout")
    assert time.monotonic() - t0 < 30, line
