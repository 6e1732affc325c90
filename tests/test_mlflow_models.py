"""Models and datasets the MLflow way, on a real sqlite store and a real `mlflow models serve` on 127.0.0.1:
every model stage logs a pyfunc model, the final student is registered with alias `candidate`, loads with
`mlflow.pyfunc.load_model`, samples through `fdm sample`, and serves; datasets are logged as run inputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
from conftest import TOY2D, tiny_toy2d
from mlflow.tracking import MlflowClient
from rich.console import Console

from pipelines.cli import main
from pipelines.config import load_config
from pipelines.rerun import load_run_config
from pipelines.runner import run_pipeline
from tasks.distillation.schedule import first_teacher

# Every stage for a few steps: a 20-step base model, one 4 -> 2 round of 5 updates, Heun at 4 steps on 64
# samples.
FEW_STEPS = (
    "train.steps=20",
    "distill.round.updates=5",
    "distill.round.final_updates=5",
    "evaluate.num_samples=64",
    "evaluate.batch_size=64",
    "evaluate.samplers=[{method: heun, steps: 4}]",
)
NAME = "fdm-toy2d-student"


@pytest.fixture(scope="module")
def pipeline(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    work = tmp_path_factory.mktemp("models")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = load_config(TOY2D, tiny_toy2d(work, *FEW_STEPS))
    run = run_pipeline(cfg, console=Console(quiet=True))
    assert not run.failed, [o.error for o in run.failed]
    return uri, run


def test_model_stages_log_pyfunc_models_and_the_final_student_is_registered(pipeline) -> None:
    uri, run = pipeline
    client = MlflowClient(uri)
    for name in ("train_base", "distill_4to2"):
        child = client.get_run(run.outcomes[name].result.run_id)
        assert child.data.tags["fdm.model_uri"].startswith("models:/")
    version = client.get_model_version_by_alias(NAME, "candidate")
    assert version.tags["fdm.key"] == run.outcomes["distill_4to2"].spec.key
    assert version.tags["fdm.steps"] == "2"
    assert client.get_run(run.run_id).data.tags["fdm.registered_model"] == f"models:/{NAME}/{version.version}"


def test_registered_student_loads_and_samples(pipeline, tmp_path: Path) -> None:
    uri, _ = pipeline
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")
    out = model.predict(pd.DataFrame([{"num": 5, "seed": 0}]))
    assert out.shape == (5, 2) and np.isfinite(out).all()
    again = model.predict(pd.DataFrame([{"num": 5, "seed": 0}]))
    np.testing.assert_array_equal(out, again)  # the seed fixes the samples
    npz = tmp_path / "s.npz"
    args = ["sample", "--checkpoint", f"models:/{NAME}@candidate", "--tracking-uri", uri, "--num", "5"]
    assert main([*args, "--out", str(npz)]) == 0
    np.testing.assert_allclose(np.load(npz)["samples"], out, atol=1e-6)


def test_a_round_records_its_teacher_as_a_model_input(pipeline) -> None:
    uri, run = pipeline
    client = MlflowClient(uri)
    base, student = (client.get_run(run.outcomes[n].result.run_id) for n in ("train_base", "distill_4to2"))
    teacher_model = base.data.tags["fdm.model_uri"].removeprefix("models:/")
    assert [m.model_id for m in student.inputs.model_inputs] == [teacher_model]
    assert student.data.tags["fdm.input.teacher"] == run.outcomes["train_base"].result.digest[:16]


def test_datasets_are_logged_as_run_inputs(pipeline) -> None:
    uri, run = pipeline
    client = MlflowClient(uri)
    digest = run.outcomes["prepare_data"].result.digest[:36]
    for run_id in (
        run.run_id,
        run.outcomes["train_base"].result.run_id,
        run.outcomes["evaluate_2"].result.run_id,
    ):
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert [d.dataset.digest for d in inputs] == [digest], run_id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_registered_student_serves_on_loopback(pipeline) -> None:
    uri, _ = pipeline
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@candidate"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    # MLflow starts `uvicorn` by name: the environment's bin directory must be on PATH, as when activated.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.time() < deadline, "mlflow models serve did not come up in 120 s"
                time.sleep(1)
        body = json.dumps({"dataframe_records": [{"num": 3, "seed": 1}]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        predictions = np.array(json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"])
        assert predictions.shape == (3, 2) and np.isfinite(predictions).all()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_parent_run_carries_the_final_models_numbers_and_what_ran(pipeline) -> None:
    """Plain metric names are the final (2-step) student's, logged once; the base model's are `base/...`;
    the curve runs from the base model's 4-step point through the student; params say what was requested
    and what ran; the driver's start is an ISO time; the description names a run that exists."""
    uri, run = pipeline
    client = MlflowClient(uri)
    parent = client.get_run(run.run_id)
    final, base = (run.outcomes[n].result for n in ("evaluate_2", "evaluate_base"))
    metrics = parent.data.metrics
    assert metrics["sw"] == final.metrics["quality"] and metrics["nfe"] == 2.0
    assert metrics["final_sampling_steps"] == 2.0
    assert metrics["base/sw"] == base.metrics["quality"] and metrics["base/nfe"] == base.metrics["nfe"]
    assert metrics["sw_ratio_to_base"] == pytest.approx(final.metrics["quality"] / base.metrics["quality"])
    assert len(client.get_metric_history(run.run_id, "sw")) == 1  # a one-value summary, logged once
    teacher = base.info["by_sampler"][first_teacher(load_run_config(uri, run.run_id)[0]).tag]["quality"]
    curve = {m.step: m.value for m in client.get_metric_history(run.run_id, "sw_by_sampling_steps")}
    assert curve == {4: teacher, 2: final.metrics["quality"]}
    params = parent.data.params
    assert params["requested.resources.train.num_cpus"] == "1.0"
    assert params["resolved.device"] == "cpu" and params["resolved.resources.train.num_gpus"] == "0"
    assert params["resolved.ray"] == "local" and params["resolved.resources.train.num_cpus"] == "1.0"
    assert "resources.train.num_gpus" not in params  # a request is named as one
    started = datetime.fromisoformat(parent.data.tags["fdm.driver_started"])
    # the driver is this test process: the tag is its start (not the run's), which came before the run
    assert parent.data.tags["fdm.driver_pid"] == str(os.getpid())
    assert abs(started.timestamp() - psutil.Process().create_time()) < 1
    assert started.timestamp() <= parent.info.start_time / 1000
    note = parent.data.tags["mlflow.note.content"]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}'")
    assert "Final student: distill_4to2, 2 sampling steps (logged model `student-2`)" in note
    assert "distill_4to2" in {c.info.run_name for c in children}


def test_logged_models_are_named_by_role_and_carry_their_evaluation(pipeline) -> None:
    """`base` and `student-2`, each with its headline evaluation linked (metrics and dataset), files at
    fixed paths; search_logged_models ordered by NFE finds the final student, the registered version; whose
    description names the pipeline run, the steps and the metric with its ratio to the base model's."""
    uri, run = pipeline
    client = MlflowClient(uri)
    exp = client.get_run(run.run_id).info.experiment_id
    mlflow.set_tracking_uri(uri)
    models = {m.name: m for m in mlflow.search_logged_models(experiment_ids=[exp], output_format="list")}
    assert set(models) == {"base", "student-2"}
    student = models["student-2"].tags
    assert student["mlflow.source.name"] == "fdm stage distill_4to2"  # "Logged from", not a worker script
    assert student["mlflow.note.content"].startswith("Student sampling in 2 steps, distilled from the 4-step")
    digest = run.outcomes["prepare_data"].result.digest[:36]
    for name, stage in (("base", "evaluate_base"), ("student-2", "evaluate_2")):
        sw = [m for m in models[name].metrics if m.key == "sw"]
        assert [m.value for m in sw] == [run.outcomes[stage].result.metrics["quality"]], name  # headline only
        assert (sw[0].dataset_name, sw[0].dataset_digest) == ("prepare_data", digest)
    files = {f.path for f in mlflow.artifacts.list_artifacts(f"{models['base'].artifact_location}/artifacts")}
    assert files == {"artifacts/weights"}
    weights = mlflow.artifacts.list_artifacts(f"{models['base'].artifact_location}/artifacts/weights")
    assert {"weights/model.json", "weights/weights.safetensors"} <= {f.path for f in weights}
    (best,) = mlflow.search_logged_models(
        experiment_ids=[exp],
        filter_string="name LIKE 'student-%'",
        datasets=[{"dataset_name": "prepare_data", "dataset_digest": digest}],
        order_by=[{"field_name": "metrics.nfe", "ascending": True}],
        max_results=1,
        output_format="list",
    )
    assert best.model_id == models["student-2"].model_id
    version = client.get_model_version_by_alias(NAME, "candidate")
    assert version.source == f"models:/{best.model_id}"
    ratio = client.get_run(run.run_id).data.metrics["sw_ratio_to_base"]
    assert version.description.startswith(f"Final student of pipeline run {run.run_id}: stage `distill_4to2`")
    assert (
        "2 sampling steps" in version.description and f"{ratio:.2f}x the base model's" in version.description
    )
