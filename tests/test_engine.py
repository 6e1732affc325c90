"""The pipeline engine on real components: one declaration per stage kind, per-stage code versions (an
edit to tasks/evaluate.py re-runs only the evaluations), cache hits decided from manifests alone, a fully
cached run that never starts Ray or imports torch, and `fdm stages` without torch or Ray."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from benchmarks.pipeline import FEW_STEPS
from infra.manifest import CorruptOutputError, read_manifest
from infra.store import LocalStore
from pipelines.cache import serve
from pipelines.config import load_config
from pipelines.plan import module_closure, plan
from tasks.registry import STAGES

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "pipelines" / "configs" / "digits.yaml"
TINY = [
    *FEW_STEPS,
    "classifier.steps=4",
    "picard.steps=8",
    "picard.window=4",
    "picard.num=4",
    "resources.train.num_cpus=1",
    "resources.evaluate.num_cpus=1",
]
# Runs the pipeline in a fresh interpreter on the project copy it finds first on PYTHONPATH, then prints
# each stage's status and what the run imported.
DRIVER = """
import json, sys
from rich.console import Console
import tasks
from pipelines.config import load_config
from pipelines.runner import run_pipeline
run = run_pipeline(load_config(sys.argv[1], sys.argv[2:]), console=Console(quiet=True))
print(json.dumps({
    "status": {n: o.status for n, o in run.outcomes.items()},
    "errors": {n: o.error for n, o in run.outcomes.items() if o.error},
    "run_id": run.run_id,
    "project": tasks.__file__,
    "imported": sorted(m for m in ("torch", "ray") if m in sys.modules),
}))
"""


def test_every_stage_function_takes_its_declared_inputs() -> None:
    for name, kind in STAGES.items():
        params = inspect.signature(kind.function()).parameters
        assert list(params)[:2] == ["cfg", "ctx"], name
        assert set(params) - {"cfg", "ctx"} == set(kind.inputs), name
        for inp, artifact in kind.inputs.items():
            assert (params[inp].default is None) == artifact.endswith("?"), (name, inp)


def test_stage_code_is_its_own_closure() -> None:
    """A stage's code version covers the modules it imports, not the other stages' modules."""
    evaluate = set(module_closure("tasks.evaluate"))
    assert {"tasks.evaluate", "tasks.stages.evaluate", "fdm_core.samplers"} <= evaluate
    for other in ("tasks.train_base", "tasks.train_classifier", "tasks.prepare_data", "tasks.distill_round"):
        assert "tasks.evaluate" not in module_closure(other)
        assert "tasks.registry" not in module_closure(other)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project's packages, so a test can edit a stage's source."""
    copy = tmp_path_factory.mktemp("project")
    for package in ("fdm_core", "infra", "tasks", "pipelines"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _run(project: Path, work: Path) -> dict:
    args = [*TINY, f"store.root={work / 'store'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    env = {**os.environ, "PYTHONPATH": str(project)}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(DIGITS), *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["project"].startswith(str(project)), out["project"]
    assert not out["errors"], out["errors"]
    return out


@pytest.fixture(scope="module")
def runs(project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The tiny digits pipeline: computed, then after an edit to tasks/evaluate.py, then fully cached."""
    work = tmp_path_factory.mktemp("engine")
    first = _run(project, work)
    evaluate = project / "tasks" / "evaluate.py"
    evaluate.write_text(evaluate.read_text() + "\n# an edit: the evaluation's code changed\n")
    edited = _run(project, work)
    cached = _run(project, work)
    return {"first": first, "edited": edited, "cached": cached, "work": work}


def test_editing_the_evaluation_reruns_only_the_evaluations(runs: dict) -> None:
    assert set(runs["first"]["status"].values()) == {"done"}
    edited = runs["edited"]["status"]
    rerun = {n for n, s in edited.items() if s == "done"}
    assert rerun == {"evaluate_base", "evaluate_2"}, edited
    upstream = ("prepare_data", "train_classifier", "train_base", "distill_4to2")
    assert {edited[n] for n in upstream} == {"cached"}
    assert edited["picard_sample"] == "cached"


def test_fully_cached_run_starts_no_ray_and_imports_no_torch(runs: dict) -> None:
    cached = runs["cached"]
    assert set(cached["status"].values()) == {"cached"}
    assert cached["imported"] == []
    assert runs["first"]["imported"] == ["ray"]  # Ray ran the stages; the driver itself never needs torch


def test_stages_command_imports_no_torch_or_ray(runs: dict) -> None:
    tracking = f"sqlite:///{runs['work'] / 'mlflow.db'}"
    code = (
        "import sys; from pipelines.cli import main; "
        f"rc = main(['stages', '{runs['first']['run_id']}', '--tracking-uri', '{tracking}']); "
        "print('IMPORTED', sorted(m for m in ('torch', 'ray') if m in sys.modules), rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert "IMPORTED [] 0" in proc.stdout, proc.stdout + proc.stderr
    assert "evaluate_2" in proc.stdout and "picard_sample" in proc.stdout


def test_a_cache_hit_reads_manifests_only(runs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deciding a hit reads each key's CURRENT pointer and manifest and lists sizes; no output byte."""
    work = runs["work"]
    cfg = load_config(DIGITS, [*TINY, f"store.root={work / 'store'}"])
    read: list[str] = []
    real = LocalStore.read_bytes

    def spy(self: LocalStore, path: str) -> bytes:
        read.append(path)
        return real(self, path)

    monkeypatch.setattr(LocalStore, "read_bytes", spy)
    store, resolved = LocalStore(work / "store"), {}
    for spec in plan(cfg):
        hit = serve(store, spec, {u: resolved[u] for u in spec.upstream})
        assert hit is not None, spec.name
        resolved[spec.name] = hit
    assert read and all(p.endswith(("/CURRENT", "/_MANIFEST.json")) for p in read), read


def test_a_moved_store_is_all_cache_hits(runs: dict, tmp_path: Path) -> None:
    """Everything recorded in the store is relative to its root: moved, it serves every stage."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(runs["work"] / "store", moved)
    cfg = load_config(DIGITS, [*TINY, f"store.root={moved}"])
    store, resolved = LocalStore(moved), {}
    for spec in plan(cfg):
        hit = serve(store, spec, {u: resolved[u] for u in spec.upstream})
        assert hit is not None, spec.name
        assert hit.output_uri.startswith(str(moved)), hit.outputs
        resolved[spec.name] = hit


def test_an_edited_result_in_a_manifest_is_recomputed(runs: dict, project: Path, tmp_path: Path) -> None:
    """A changed result value inside a version's manifest reads as corruption, not as a cache hit: the next
    run recomputes that evaluation (nothing else) and records the value the stage really produced."""
    work = tmp_path / "work"
    shutil.copytree(runs["work"] / "store", work / "store")
    store = LocalStore(work / "store")
    # The version the cached run served (the project copy's code, not this checkout's, made its key).
    client = MlflowClient(f"sqlite:///{runs['work'] / 'mlflow.db'}")
    parent = client.get_run(runs["cached"]["run_id"])
    child = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'evaluate_2'",
    )[0]
    prefix = Path(child.data.tags["output_uri"]).relative_to(runs["work"] / "store").as_posix()
    out_root = prefix.rsplit("/", 1)[0]
    doc = json.loads(store.read_bytes(f"{prefix}/_MANIFEST.json"))
    true_quality = doc["result"]["metrics"]["quality"]
    doc["result"]["metrics"]["quality"] = true_quality + 1.0
    store.write_bytes(f"{prefix}/_MANIFEST.json", json.dumps(doc, indent=2, sort_keys=True).encode())
    with pytest.raises(CorruptOutputError, match="changed after it was written"):
        read_manifest(store, prefix)

    status = _run(project, work)["status"]
    assert {n for n, s in status.items() if s == "done"} == {"evaluate_2"}, sorted(status.items())
    again = f"{out_root}/{store.read_bytes(f'{out_root}/CURRENT').decode()}"
    assert again != prefix
    assert read_manifest(store, again).result["metrics"]["quality"] == pytest.approx(true_quality)
