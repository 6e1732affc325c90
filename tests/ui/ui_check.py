"""`make ui-check`: the MLflow UI as users see it, in headless Chromium (not part of `make test`).

Runs a tiny toy2d pipeline into a scratch store (`.ui-check/run/`), starts `mlflow ui` on 127.0.0.1 on
it, and has `check.mjs` open the links the product prints and the README documents: the runs view with the
stage runs folded under the pipeline run, the pipeline run with the final model's metric, the logged
student with its linked metrics, the registered model with its alias, and the one click that makes
model-training mode stick. Screenshots and what each page showed go to `.ui-check/screenshots/`.
The browser is npm's `@sparticuz/chromium` (the binary ships inside the package), driven by
`puppeteer-core`; `make ui-check` installs both into tests/ui/node_modules.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient
from rich.console import Console

from infra.tracking import MODEL_TRAINING, ui_path
from pipelines.config import load_config
from pipelines.runner import run_pipeline

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent.parent / "pipelines" / "configs" / "toy2d.yaml"
TINY = [
    "train.steps=200",
    "distill.start_steps=4",
    "distill.end_steps=2",
    "distill.round.updates=20",
    "distill.round.final_updates=20",
    "evaluate.num_samples=200",
    "evaluate.batch_size=200",
    "evaluate.samplers=[{method: heun, steps: 4}]",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(tracking_uri: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow ui` on 127.0.0.1:`port` serving `tracking_uri`, up (its /health answers) within 300 s."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    bindir = str(Path(sys.executable).parent)  # mlflow starts uvicorn by name, as in an activated venv
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                stop(server)
                raise RuntimeError(f"mlflow ui did not come up on port {port}; see {log}") from None
            time.sleep(1)


def stop(server: subprocess.Popen) -> None:
    """Stop `mlflow ui` and every process it started (its own process group: uvicorn, its job consumers,
    which outlive a SIGTERM to the group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=20)
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def plan(client: MlflowClient, run_id: str, base: str) -> list[dict]:
    """The pages to open and what each must show, from the run's record read through MLflow's client."""
    parent = client.get_run(run_id)
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}'")
    stages = sorted(c.data.tags["stage"] for c in children)
    final_name = parent.data.tags["fdm.final_model"]
    final_run = next(c for c in children if c.info.run_name == final_name)
    metric = next(k for k in ("fid", "fd", "sw") if k in parent.data.metrics)
    final_value = repr(parent.data.metrics[metric])
    model_id = final_run.data.tags["fdm.model_uri"].removeprefix("models:/")
    model = client.get_logged_model(model_id)
    registered = parent.data.tags["fdm.registered_model"].removeprefix("models:/")
    name, version = registered.rsplit("/", 1)
    genai = ["Evaluation runs", "No data available"]  # what the GenAI layout shows instead of the runs
    return [
        {
            "name": "1-runs-view",
            "url": base + ui_path(exp),
            "expand": parent.info.run_name,
            "expect": ["Run Name", parent.info.run_name, *stages],
            "absent": genai,
        },
        {
            "name": "2-pipeline-run",
            "url": base + ui_path(exp, run_id),
            "expect": [
                "Model metrics",
                f"Final student: {final_name}",
                metric,
                final_value,
                f"base/{metric}",
                f"{metric}_ratio_to_base",
            ],
            "absent": genai,
        },
        {
            "name": "3-final-stage-run",
            "url": base + ui_path(exp, final_run.info.run_id),
            "expect": ["Model metrics", final_name, model.name],
            "absent": genai,
        },
        {
            "name": "4-logged-model",
            "url": f"{base}#/experiments/{exp}/models/{model_id}?{MODEL_TRAINING}",
            "expect": [
                model.name,
                metric,
                final_value,
                "prepare_data",
                f"evaluate_{final_run.data.tags['steps']}",
            ],
        },
        {
            "name": "5-registered-model",
            "url": f"{base}#/models/{name}?{MODEL_TRAINING}",
            "expect": [name, f"Version {version}", "@ candidate"],
        },
        {
            "name": "6-registered-version",
            "url": f"{base}#/models/{name}/versions/{version}?{MODEL_TRAINING}",
            "expect": [f"Final student of pipeline run {run_id}", model.name, "@ candidate"],
        },
        {
            # A browser that never chose: one click on "Model training" on the start page, then the plain
            # experiment URL (no workflowType) opens on the runs.
            "name": "7-one-click-sticks",
            "fresh": True,
            "url": base + "#/",
            "click": "Model training",
            "then": f"{base}#/experiments/{exp}",
            "expect": ["Run Name", parent.info.run_name],
            "absent": genai,
        },
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".ui-check", help="scratch directory (run store, screenshots)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out / "run", ignore_errors=True)
    shutil.rmtree(out / "screenshots", ignore_errors=True)
    (out / "run").mkdir(parents=True)
    uri = f"sqlite:///{out / 'run' / 'mlflow.db'}"
    cfg = load_config(CONFIG, [*TINY, f"store.root={out / 'run' / 'store'}", f"tracking.uri={uri}"])
    run = run_pipeline(cfg, console=Console(width=160))
    if run.failed:
        print(f"ui-check: the pipeline failed: {[o.error for o in run.failed]}")
        return 1
    port = _free_port()
    server = start_ui(uri, port, out / "mlflow-ui.log")
    try:
        pages = plan(MlflowClient(uri), run.run_id, f"http://127.0.0.1:{port}/")
        plan_file = out / "plan.json"
        plan_file.write_text(json.dumps({"pages": pages}, indent=2))
        shots = out / "screenshots"
        done = subprocess.run(["node", str(HERE / "check.mjs"), str(plan_file), str(shots)], cwd=HERE)
    finally:
        stop(server)
    print(f"ui-check: screenshots and page texts in {shots}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
