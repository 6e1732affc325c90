"""On a real 3-node Ray cluster (the `multinode` fixture: a CPU-0 head and 2 worker nodes on 127.0.0.1,
S3 store, `fdm tracking-server`): `fdm submit` runs the pipeline as a Ray Job, and a driver joining through
RAY_ADDRESS can create actors. Drivers run as separate processes, as a user's would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LOOPBACK_ENV, MultiNode, free_port
from mlflow.tracking import MlflowClient
from test_submit import CONFIG, TINY, TINY_STAGES, _sets

from pipelines.submit import REPO_ROOT, mlflow_run_id

pytestmark = pytest.mark.cluster
FDM = [sys.executable, "-m", "pipelines.cli"]


def fdm(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run the `fdm` command line in a new process (this working copy); its exit code and output."""
    proc = subprocess.run(
        [*FDM, *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


def children(tracking: str, run_id: str) -> list:
    client = MlflowClient(tracking)
    exp = client.get_run(run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")


JOIN_AND_CREATE_AN_ACTOR = """
import ray
from infra.ray_runtime import ProgressBoard, init_ray
init_ray(None)
board = ProgressBoard.remote()
board.report.remote("stage", state="running")
print("snapshot", ray.get(board.snapshot.remote(), timeout=60)["stage"]["state"])
"""


def test_a_driver_joining_through_ray_address_creates_actors(multinode: MultiNode, tmp_path: Path) -> None:
    """As a Ray Job's driver joins: RAY_ADDRESS set, no RAY_AUTH_MODE, and a token file in ~/.ray (which
    once switched the driver to token mode against this token-less cluster: its first actor never ran)."""
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 32)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(RAY_ADDRESS=multinode.gcs, HOME=str(tmp_path), PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", JOIN_AND_CREATE_AN_ACTOR], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "snapshot running" in proc.stdout


def test_submit_runs_the_pipeline_on_the_multinode_cluster(multinode: MultiNode) -> None:
    """`fdm submit` of toy2d with an s3:// store and the tracking server: exit 0, one FINISHED child run
    per stage."""
    code, out = fdm(["submit", CONFIG, "--address", multinode.job_api, *_sets([*TINY, *multinode.overrides])])
    assert code == 0, out[-4000:]
    run_id = mlflow_run_id(out)
    runs = children(multinode.tracking, run_id)
    assert {c.data.tags["stage"] for c in runs} == TINY_STAGES
    assert all(c.info.status == "FINISHED" for c in runs)


def stage_runs(tracking: str, run_id: str, stage: str) -> list:
    return sorted(
        (c for c in children(tracking, run_id) if c.data.tags.get("stage") == stage),
        key=lambda c: c.info.start_time,
    )


def test_a_local_store_on_several_nodes_exits_2_unless_allowed(multinode: MultiNode, tmp_path: Path) -> None:
    """A local store root and sqlite tracking on a 3-node cluster: refused at once, naming both settings
    and what to use; --allow-local (this machine's disk is shared by its nodes) runs, each stage tagged with
    the node it ran on and its attempt."""
    local = [*TINY, f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    code, out = fdm(["run", CONFIG, "--address", multinode.gcs, *_sets(local)])
    assert code == 2, out[-3000:]
    text = " ".join(out.split())
    assert "store.root=" in text and "tracking.uri=sqlite" in text and "3 nodes" in text
    assert "s3://" in text and "shared" in text and "--allow-local" in text and "Traceback" not in text

    code, out = fdm(["run", CONFIG, "--address", multinode.gcs, "--allow-local", *_sets(local)])
    assert code == 0, out[-3000:]
    run_id = mlflow_run_id(out)
    tracking = f"sqlite:///{tmp_path / 'm.db'}"
    workers = {n.node_id for n in multinode.workers.values()}
    for c in children(tracking, run_id):
        assert c.data.tags["fdm.node_id"] in workers and c.data.tags["fdm.node_ip"] == "127.0.0.1"
        assert c.data.tags["fdm.attempt"] == "1"
    code, out = fdm(["stages", run_id, "--tracking-uri", tracking])
    assert code == 0 and "attempt" in out and "node" in out


INFEASIBLE = """
import time
import ray
from infra.placement import Unplaceable
from infra.ray_evaluator import RayEvaluator
from infra.ray_runtime import init_ray
init_ray(None)
def factory():
    return None
@ray.remote(num_cpus=1)
class Holder:  # one CPU of a worker node in use while the "busy" request waits
    def ping(self):
        return True
holder = Holder.remote()
ray.get(holder.ping.remote())
for label, kwargs in [
    ("spread", dict(actors=3, strategy="STRICT_SPREAD", num_cpus=0.5)),
    ("gpu", dict(actors=1, num_gpus=1)),
    ("busy", dict(actors=2, strategy="STRICT_SPREAD", num_cpus=2, ready_timeout_s=3)),
]:
    t0 = time.monotonic()
    try:
        RayEvaluator(factory, **kwargs)
    except Unplaceable as err:
        print(label, round(time.monotonic() - t0, 1), err, flush=True)
"""


def test_placement_that_cannot_happen_fails_at_once_naming_request_and_cluster(multinode: MultiNode) -> None:
    """STRICT_SPREAD over 3 nodes when 2 can hold actors, and a GPU on this CPU-only cluster, fail at once;
    2 whole nodes while an actor holds a CPU of one fails after its timeout; each line names the request and
    the nodes. A stage asking for more CPUs than any node has stops `fdm run` with exit 2 before it runs."""
    proc = subprocess.run(
        [sys.executable, "-c", INFEASIBLE],
        env={**os.environ, "RAY_ADDRESS": multinode.gcs, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert set(lines) == {"spread", "gpu", "busy"}, proc.stdout + proc.stderr[-3000:]
    for line in lines.values():
        assert float(line.split()[1]) < 60
        assert "3 alive nodes" in line and "CPU: 2" in line and "node_w1: 1" in line, line
    assert "3 x {'CPU': 0.5} (STRICT_SPREAD)" in lines["spread"] and "never" in lines["spread"]
    assert "'GPU': 1" in lines["gpu"] and "never" in lines["gpu"]
    assert "not placed within 3 s" in lines["busy"] and "placement_timeout" in lines["busy"]

    fresh = f"store.root={multinode.store_root}-unplaceable"  # nothing cached: every stage still to run
    overrides = [*TINY, *multinode.overrides, fresh, "resources.train.num_cpus=3"]
    code, out = fdm(["run", CONFIG, "--address", multinode.gcs, *_sets(overrides)])
    assert code == 2, out[-3000:]
    text = " ".join(out.split())
    assert "stage train_base (resources.train): 1 x {'CPU': 3" in text and "3 alive nodes" in text


def test_losing_the_train_base_node_resumes_on_the_other_from_the_last_checkpoint(
    multinode: MultiNode,
) -> None:
    """Fault: the worker node running train_base is killed (remove_node, not graceful) mid-interval after
    its second checkpoint. The stage is retried on the other node from the store's checkpoint: at most one
    checkpoint interval is redone, the pipeline exits 0, and the killed attempt's child run is KILLED with
    the reason."""
    every = 200
    overrides = [*TINY, *multinode.overrides, "train.steps=3000", f"train.checkpoint_every={every}"]
    overrides += ["train.log_every=10"]
    proc = subprocess.Popen(
        [*FDM, "run", CONFIG, "--address", multinode.gcs, *_sets(overrides)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = MlflowClient(multinode.tracking)
    lost, run_id = None, None
    try:
        deadline = time.monotonic() + 240
        while lost is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                filter_string="tags.stage = 'train_base' and attributes.status = 'RUNNING'",
            )
            for run in runs:
                steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
                if max(steps, default=0) >= 2 * every + every // 2:  # mid-interval, 2 checkpoints in
                    node = run.data.tags["fdm.node_id"]
                    lost = next(name for name, n in multinode.workers.items() if n.node_id == node)
                    run_id = run.data.tags["mlflow.parentRunId"]
                    multinode.remove_worker(lost)
                    break
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
        if lost:
            multinode.add_worker(lost)  # back to two workers for the tests after this one
    assert lost, "train_base never reached its second checkpoint"
    assert proc.returncode == 0, out[-4000:]
    killed, finished = stage_runs(multinode.tracking, run_id, "train_base")
    assert (killed.info.status, finished.info.status) == ("KILLED", "FINISHED")
    assert (killed.data.tags["fdm.attempt"], finished.data.tags["fdm.attempt"]) == ("1", "2")
    assert "was lost" in killed.data.tags["fdm.end_reason"]
    assert finished.data.tags["fdm.node_id"] != killed.data.tags["fdm.node_id"]
    reached = max(m.step for m in client.get_metric_history(killed.info.run_id, "train/loss"))
    resumed = int(finished.data.metrics["resumed_from"])
    assert resumed >= 2 * every and resumed % every == 0
    assert reached - resumed <= every  # at most one checkpoint interval redone
    assert finished.data.metrics["steps"] == 3000
    code, table = fdm(["stages", run_id, "--tracking-uri", multinode.tracking])
    assert code == 0 and table.count("train_base") == 2 and "killed" in table and "was lost" in table


PICARD_WITH_A_LOST_NODE = """
import sys, time
from pathlib import Path
import ray, torch
from fdm_core.networks import MLP
from fdm_core.picard import parallel_sample
from fdm_core.precond import Denoiser
from fdm_core.processes import make_process
from fdm_core.samplers import get_sigmas
from fdm_core.samplers import sample
from infra.ray_evaluator import RayEvaluator
from infra.ray_runtime import init_ray
from infra.store import S3Settings, open_store
from tasks.checkpoints import load_model, model_spec, write_model
from tasks.sample import StepFactory

root, endpoint, go, tol = sys.argv[1], S3Settings(sys.argv[2] or None), Path(sys.argv[3]), 0.1
init_ray(None)
torch.manual_seed(0)
net = MLP(dim=2, hidden=32, depth=2, emb_dim=16)
torch.nn.init.normal_(net.out.weight, std=0.3)
denoiser = Denoiser(net, make_process("edm", fdm=True))
spec = model_spec(denoiser, data_shape=[2])
uri = write_model(open_store(root, endpoint), "models/toy", denoiser, spec, {})
model, _ = load_model(open_store(uri, endpoint), "")
sigmas = get_sigmas("karras", 64, 0.002, 80.0)
x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)) * 80.0
reference = sample(model, x, sigmas, "ddpm", torch.Generator().manual_seed(1))
with RayEvaluator(StepFactory(uri, endpoint), actors=2, strategy="SPREAD", num_cpus=0.5) as evaluator:
    noise = torch.Generator().manual_seed(1)
    expected, _ = parallel_sample(model, x, sigmas, "ddpm", 16, tol, noise, evaluator)
    nodes = ray.get([a.node.remote() for a in evaluator.actors])
    calls = 0
    def losing(*args):
        global calls
        calls += 1
        if calls == 3:  # mid-sampling: the test kills the first actor's node, then lets it go on
            print("LOSE", nodes[0], flush=True)
            while not go.exists():
                time.sleep(0.1)
        return evaluator(*args)
    out, stats = parallel_sample(model, x, sigmas, "ddpm", 16, tol, torch.Generator().manual_seed(1), losing)
print("CALLS", calls, stats.parallel_iterations, flush=True)
print("DEVIATION", float((out - reference).abs().max()), float((out - expected).abs().max()), flush=True)
"""


def test_losing_a_picard_actors_node_mid_sampling_keeps_the_samples(
    multinode: MultiNode, tmp_path: Path
) -> None:
    """Fault: mid-sampling, the node holding one of 2 Picard actors (SPREAD over the 2 workers) is killed.
    Ray places its bundle again on the node left and restarts the actor there (reloading its model from
    S3); until it answers, its chunks go to the actor left: the samples are those of the run without the
    fault, and within the Picard tolerance (0.1) of the sequential sampler's."""
    go = tmp_path / "go"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PICARD_WITH_A_LOST_NODE,
            f"{multinode.store_root}-picard",
            multinode.s3,
            str(go),
        ],
        env={**os.environ, "RAY_ADDRESS": multinode.gcs, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lost = None
    try:
        for line in proc.stdout:
            if line.startswith("LOSE"):
                node = line.split()[1]
                lost = next(name for name, n in multinode.workers.items() if n.node_id == node)
                multinode.remove_worker(lost)
                go.touch()
                break
        out = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
        if lost:
            multinode.add_worker(lost)
    assert lost and proc.returncode == 0, out[-4000:]
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:5] in ("CALLS", "DEVIA")}
    calls, iterations = lines["CALLS"]
    assert int(calls) == int(iterations) > 3
    to_sequential, to_unfaulted = map(float, lines["DEVIATION"])
    assert to_sequential < 0.1 and to_unfaulted < 1e-5


@pytest.fixture
def ray_start_head(tmp_path: Path) -> Iterator[str]:
    """A head started by `ray start --head` on 127.0.0.1 (under RAY_TMPDIR, as a user's would be), found
    by a plain `ray.init()` through the ray_current_cluster file; stopped through its process group."""
    port = free_port()
    env = {**os.environ, **LOOPBACK_ENV, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    args = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}"]
    args += ["--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"]
    log = (tmp_path / "head.log").open("wb")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    gcs = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(
            [ray_bin, "status", f"--address={gcs}"], env=env, capture_output=True
        ).returncode:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
            time.sleep(1)
        yield gcs
    finally:
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait_s)
        log.close()


def test_fdm_run_without_an_address_starts_its_own_ray_beside_a_running_head(
    ray_start_head: str, tmp_path: Path
) -> None:
    """With a `ray start` head running and neither --address nor RAY_ADDRESS, `fdm run` starts its own
    embedded Ray (address="local"): exit 0, no traceback, and no driver ever joined the head."""
    local = [*TINY, f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    code, out = fdm(["run", CONFIG, *_sets(local)], env={"RAY_ADDRESS": ""})
    assert code == 0 and "Traceback" not in out, out[-3000:]
    count = "import ray; ray.init(address='%s'); print('drivers', len(ray._private.state.jobs()))"
    proc = subprocess.run(
        [sys.executable, "-c", count % ray_start_head],
        env={**os.environ, **LOOPBACK_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "drivers 1" in proc.stdout, proc.stdout + proc.stderr[-2000:]  # this one only
