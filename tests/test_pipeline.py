"""End to end on a local Ray cluster, a temporary sqlite MLflow and a temporary store: the toy2d pipeline,
its MLflow record, the stage cache, re-running one round, and config errors."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_TOY2D, TOY2D, tiny_toy2d
from mlflow.tracking import MlflowClient
from rich.console import Console
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fdm_core.training import TrainState
from infra.manifest import MANIFEST_NAME, check_present, read_manifest, seal_dir
from infra.store import open_store
from pipelines.cli import main
from pipelines.config import load_config, parse_config
from pipelines.plan import plan
from pipelines.rerun import rerun_stage
from pipelines.runner import run_pipeline
from tasks.checkpoints import latest_training_checkpoint, load_model, save_training_checkpoint

# Two rounds (8 -> 4 -> 2) of 40 updates after a 300-step base model checkpointed every 100 steps, evaluated
# by Heun at 8 steps on 300 samples: what this module's tests, and test_examples.py's runs, need of toy2d.
TWO_ROUNDS = (
    "train.steps=300",
    "train.checkpoint_every=100",
    "distill.start_steps=8",
    "distill.round.updates=40",
    "distill.round.final_updates=40",
    "evaluate.num_samples=300",
    "evaluate.batch_size=300",
    "evaluate.samplers=[{method: heun, steps: 8}]",
)
SMALL = [*TINY_TOY2D, *TWO_ROUNDS]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def overrides(workdir: Path) -> list[str]:
    return tiny_toy2d(workdir, *TWO_ROUNDS)


@pytest.fixture(scope="module")
def first_run(ray_local: None, overrides: list[str]):
    cfg = load_config(TOY2D, overrides)
    return cfg, run_pipeline(cfg, console=Console(quiet=True))


def _children(client: MlflowClient, run_id: str):
    exp = client.get_run(run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")


def test_pipeline_completes_every_stage(first_run) -> None:
    cfg, run = first_run
    names = [s.name for s in plan(cfg)]
    assert names == [
        "prepare_data",
        "train_base",
        "evaluate_base",
        "distill_8to4",
        "evaluate_4",
        "distill_4to2",
        "evaluate_2",
    ]
    assert {o.status for o in run.outcomes.values()} == {"done"}, {
        n: o.error for n, o in run.outcomes.items()
    }
    final = run.outcomes["evaluate_2"].result
    assert final.metrics["quality"] < 1.0  # sliced Wasserstein of the 2-step student to held-out data
    assert run.outcomes["distill_4to2"].result.info["steps"] == 2


def test_mlflow_holds_parent_and_one_child_per_stage(first_run) -> None:
    cfg, run = first_run
    client = MlflowClient(cfg.tracking.uri.replace("sqlite:///", "sqlite:///"))
    parent = client.get_run(run.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.process"] == "edm"
    tags = parent.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"].startswith("fdm run")
    assert len(tags["mlflow.source.git.commit"].removesuffix("+dirty")) == 40
    assert (
        "Final student: distill_4to2, 2 sampling steps (logged model `student-2`)."
        in tags["mlflow.note.content"]
    )
    curve = client.get_metric_history(run.run_id, "sw_by_sampling_steps")  # quality against sampling steps
    assert sorted(m.step for m in curve) == [2, 4, 8]  # the base model's 8-step start, then each student
    final = run.outcomes["evaluate_2"].result.metrics["quality"]
    assert [m.value for m in client.get_metric_history(run.run_id, "sw")] == [final]  # the final model's
    parent_files = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config.yaml", "summary.json", "quality_vs_steps.png"} <= parent_files
    children = {c.data.tags["stage"]: c for c in _children(client, run.run_id)}
    assert set(children) == set(run.outcomes)
    assert all(c.info.run_name == stage for stage, c in children.items())  # one name for run, tag, table
    assert {"distill_8to4", "distill_4to2", "evaluate_4", "evaluate_2", "evaluate_base"} <= set(children)
    base = children["train_base"]
    assert base.data.params["train.steps"] == parent.data.params["train.steps"] == "300"  # one name
    assert (
        base.data.tags["cached"] == "false" and base.data.tags["key"] == run.outcomes["train_base"].spec.key
    )
    losses = client.get_metric_history(base.info.run_id, "train/loss")
    assert len(losses) >= 3 and 0 not in {m.step for m in losses}  # by real step, no step-0 duplicate
    version = base.data.tags["output_version"]
    assert base.data.tags["output_uri"].endswith(f"{run.outcomes['train_base'].spec.out_root}/{version}")
    ev = children["evaluate_4"]
    assert ev.data.tags["round"] == "1" and ev.data.tags["steps"] == "4"
    assert {"quality", "sw", "nfe", "seconds_per_sample"} <= set(ev.data.metrics)  # one key set for all
    assert ev.data.params["evaluate.samplers"] == '[{"method": "euler", "steps": 4}]'  # what ran
    assert ev.data.tags["sampler"] == "euler" and ev.data.tags["nfe"] == "4"
    history = client.get_metric_history(ev.info.run_id, "sw")
    assert [m.step for m in history] == [4]  # at its sampling steps, never at a made-up step 0
    assert {"samples_euler4.png", "metrics.json"} <= {a.path for a in client.list_artifacts(ev.info.run_id)}
    model_files = {a.path for a in client.list_artifacts(children["distill_8to4"].info.run_id)}
    assert "model.json" in model_files and "weights.safetensors" not in model_files


def test_prepare_data_child_run_shows_the_dataset(first_run, tmp_path: Path) -> None:
    """The data's child run holds the dataset card (the stored _dataset.json) and the preview scatter plot;
    the manifest stays in the store."""
    cfg, run = first_run
    client = MlflowClient(cfg.tracking.uri)
    data = run.outcomes["prepare_data"].result
    files = {a.path for a in client.list_artifacts(data.run_id)}
    assert {"_dataset.json", "_preview.png"} <= files and MANIFEST_NAME not in files
    store = open_store(data.outputs["dataset"])
    for name in ("_dataset.json", "_preview.png"):
        logged = Path(client.download_artifacts(data.run_id, name, str(tmp_path))).read_bytes()
        assert logged == store.read_bytes(name)
    assert json.loads(store.read_bytes("_dataset.json"))["splits"]["train"]["rows"] == 3000  # 4000, 1/4 val


def test_second_run_is_all_cache_hits_without_ray(first_run, overrides: list[str]) -> None:
    """A fully cached run decides every hit from manifests in the driver: no Ray task, no Ray start."""
    run = run_pipeline(load_config(TOY2D, overrides), console=Console(quiet=True))
    assert {o.status for o in run.outcomes.values()} == {"cached"}
    assert not run.used_ray
    assert run.outcomes["evaluate_2"].result.metrics == first_run[1].outcomes["evaluate_2"].result.metrics


def _ratios(run) -> dict[int, float]:
    """Each student's quality ÷ the base model's headline quality, by student steps."""
    base = run.outcomes["evaluate_base"].result.metrics["quality"]
    return {
        o.spec.steps: o.result.metrics["quality"] / base
        for o in run.outcomes.values()
        if o.spec.kind == "evaluate" and o.spec.round and o.result and "quality" in o.result.metrics
    }


def test_a_tripped_quality_gate_stops_halving_and_keeps_the_last_passing_student(
    first_run, overrides: list[str], tmp_path: Path
) -> None:
    """A gate just above the 4-step student's quality ratio, and a 2-step round of a single update (a
    student that has not learned its grid): the 2-step student is not kept, the 1-step round never runs,
    the reason is in the stage table, the stage's and the parent's MLflow tags and summary.json, and the
    4-step student is the final (registered) model."""
    gate = _ratios(first_run[1])[4] * 1.001
    cfg = load_config(
        TOY2D,
        [
            *overrides,
            "distill.end_steps=1",
            "distill.rounds.2.final_updates=1",
            f"distill.quality_gate={gate:.6f}",
        ],
    )
    console = Console(record=True, width=250)
    run = run_pipeline(cfg, console=console)
    assert _ratios(run)[2] > gate, f"a 1-update 2-step student should break the gate {gate}: {_ratios(run)}"
    status = {n: o.status for n, o in run.outcomes.items()}
    assert status["distill_8to4"] == status["evaluate_4"] == "cached"  # the gate is not part of a key
    assert status["distill_4to2"] == status["evaluate_2"] == "done"
    assert status["distill_2to1"] == status["evaluate_1"] == "skipped"
    reason = run.outcomes["distill_2to1"].result.info["skipped"]
    assert reason.startswith("quality gate: evaluate_2 sw ") and reason.endswith("halving stops")
    printed = console.export_text()
    assert reason in printed
    assert "final model: distill_8to4 (4 steps); halving stopped: quality gate: evaluate_2" in printed

    client = MlflowClient(cfg.tracking.uri)
    tags = client.get_run(run.run_id).data.tags
    assert tags["fdm.final_model"] == "distill_8to4" and tags["fdm.final_steps"] == "4"
    assert tags["fdm.student_steps"] == "4,2"
    assert tags["fdm.halving_stopped"].startswith("quality gate: evaluate_2 sw ")
    assert "the 2-step student is not kept" in tags["fdm.halving_stopped"]
    assert (
        "Final student: distill_8to4, 4 sampling steps (logged model `student-4`)."
        in tags["mlflow.note.content"]
    )
    children = {c.data.tags["stage"]: c for c in _children(client, run.run_id)}
    assert children["distill_2to1"].data.tags["skip_reason"] == reason
    summary = yaml.safe_load(
        Path(client.download_artifacts(run.run_id, "summary.json", str(tmp_path))).read_text()
    )
    assert summary["distillation"]["final_model"] == {"stage": "distill_8to4", "steps": 4}
    assert [s["passed_gate"] for s in summary["distillation"]["students"]] == [True, False]
    version = client.get_model_version_by_alias(f"{cfg.tracking.experiment}-student", "candidate")
    assert version.tags["fdm.key"] == run.outcomes["distill_8to4"].spec.key


def test_a_gate_that_never_trips_runs_every_round(first_run, overrides: list[str]) -> None:
    """Down to 1 step with a gate no student breaks: every round runs and the 1-step student is final."""
    cfg = load_config(TOY2D, [*overrides, "distill.end_steps=1", "distill.quality_gate=1000"])
    run = run_pipeline(cfg, console=Console(quiet=True))
    assert {o.status for o in run.outcomes.values()} <= {"cached", "done"}
    assert run.outcomes["distill_2to1"].status == "done" and run.outcomes["evaluate_1"].result.info
    tags = MlflowClient(cfg.tracking.uri).get_run(run.run_id).data.tags
    assert tags["fdm.final_model"] == "distill_2to1" and tags["fdm.student_steps"] == "4,2,1"
    assert tags["fdm.halving_stopped"] == "reached end_steps 1"


def test_changing_distillation_reuses_data_and_base(first_run, overrides: list[str]) -> None:
    cfg = load_config(TOY2D, [*overrides, "distill.round.lr=2e-3"])
    run = run_pipeline(cfg, console=Console(quiet=True))
    status = {n: o.status for n, o in run.outcomes.items()}
    assert status["prepare_data"] == status["train_base"] == status["evaluate_base"] == "cached"
    assert status["distill_8to4"] == status["distill_4to2"] == "done"


def _record(client: MlflowClient, run_id: str, tmp: Path) -> dict:
    """Everything a user sees of a run: status, times, metrics, params, tags, artifacts (with summary.json's
    text) and its child runs."""
    run = client.get_run(run_id)
    dst = tmp / run_id
    dst.mkdir(exist_ok=True)
    return {
        "info": (run.info.status, run.info.start_time, run.info.end_time),
        "metrics": run.data.metrics,
        "params": run.data.params,
        "tags": run.data.tags,
        "artifacts": sorted((a.path, a.file_size) for a in client.list_artifacts(run_id)),
        "summary": Path(client.download_artifacts(run_id, "summary.json", str(dst))).read_text(),
        "children": sorted(
            (c.info.run_id, c.info.status, c.info.end_time, sorted(c.data.tags.items()), c.data.metrics)
            for c in _children(client, run_id)
        ),
    }


def _current(store, spec) -> str:
    return store.read_bytes(f"{spec.out_root}/CURRENT").decode()


def _new_run_id(out: str) -> str:
    return re.search(r"MLflow run id: ([0-9a-f]{32})", out).group(1)


def test_forced_rerun_recomputes_from_scratch_as_a_new_run(
    first_run, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`fdm rerun --stage distill_4to2`: a new parent run tagged fdm.rerun_of, the round recomputed from
    scratch although a stale checkpoint of its key is in the store (exactly the loss and weights of the first,
    from-scratch run), the checkpoint gone afterwards, the previous versions kept, and a recomputation whose
    files differ from the current version reported; the original run's record is untouched."""
    cfg, run = first_run
    client = MlflowClient(cfg.tracking.uri)
    before = _record(client, run.run_id, tmp_path)
    store = open_store(cfg.store.root)
    spec = run.outcomes["distill_4to2"].spec
    first_version = _current(store, spec)
    first = read_manifest(store, f"{spec.out_root}/{first_version}")

    # A stale checkpoint of the key, halfway through the round with other weights: resuming would show.
    model, _ = load_model(store, f"{spec.out_root}/{first_version}")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    checkpoints = f"checkpoints/distill_round/{spec.key}"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    save_training_checkpoint(store, checkpoints, model, None, opt, TrainState(step=20))
    assert latest_training_checkpoint(store, checkpoints).step == 20
    # A current version from the same inputs whose weights differ (as a non-deterministic stage makes).
    planted = "19990101T000000-planted"
    local = tmp_path / "planted"
    store.download_dir(f"{spec.out_root}/{first_version}", local)
    (local / MANIFEST_NAME).unlink()
    weights = st_load((local / "weights.safetensors").read_bytes())
    (local / "weights.safetensors").write_bytes(st_save({k: v + 1 for k, v in weights.items()}))
    seal_dir(store, local, f"{spec.out_root}/{planted}", first.producer, first.result, first.inputs)
    store.write_bytes(f"{spec.out_root}/CURRENT", planted.encode())

    argv = ["rerun", run.run_id, "--stage", "distill_4to2", "--tracking-uri", cfg.tracking.uri]
    assert main(argv) == 0
    out = capsys.readouterr().out
    new_id = _new_run_id(out)
    assert new_id != run.run_id and f"a re-run of {run.run_id}" in out
    exp = client.get_run(run.run_id).info.experiment_id
    db = cfg.tracking.uri.removeprefix("sqlite:///")
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in out
    assert f"#/experiments/{exp}/runs/{new_id}" in out
    assert f"distill_4to2: the recomputed output differs from the previous version {planted}" in out

    # From scratch: the first run's weights and loss exactly; then the checkpoints are gone.
    version = _current(store, spec)
    assert version not in (first_version, planted)
    again = read_manifest(store, f"{spec.out_root}/{version}")
    assert again.files["weights.safetensors"].sha256 == first.files["weights.safetensors"].sha256
    assert again.result["metrics"]["distill/loss"] == first.result["metrics"]["distill/loss"]
    assert again.result["metrics"]["resumed_from"] == 0.0
    assert store.list(checkpoints) == []
    # Never overwritten in place: every version is still complete.
    for v in (first_version, planted, version):
        check_present(store, f"{spec.out_root}/{v}")

    # The new run: upstream logged as cached child runs linking the outputs they reuse.
    parent = client.get_run(new_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["fdm.rerun_of"] == run.run_id
    assert parent.data.tags["fdm.rerun_stage"] == "distill_4to2"
    old = {c.data.tags["stage"]: c.data.tags for c in _children(client, run.run_id)}
    children = {c.data.tags["stage"]: c.data.tags for c in _children(client, new_id)}
    assert set(children) == {"prepare_data", "train_base", "distill_8to4", "distill_4to2"}
    for name in ("prepare_data", "train_base", "distill_8to4"):
        assert children[name]["cached"] == "true"
        assert children[name]["output_uri"] == old[name]["output_uri"]
        assert children[name]["output_version"] == old[name]["output_version"]
    d2 = children["distill_4to2"]
    assert d2["cached"] == "false" and d2["rerun"] == "True" and d2["output_version"] == version
    assert d2["fdm.output_differs"] == "true" and d2["fdm.previous_version"] == planted
    assert old["distill_4to2"]["output_version"] == first_version
    assert _record(client, run.run_id, tmp_path) == before


def test_failed_rerun_with_a_per_round_setting_leaves_the_original_alone(
    first_run, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`fdm rerun --set distill.rounds.2.lr=...` changes round 2 only (its key; round 1 stays cached); the
    re-run fails (a non-finite loss) as its own FAILED run, and the original run's record is as it was."""
    cfg, run = first_run
    client = MlflowClient(cfg.tracking.uri)
    before = _record(client, run.run_id, tmp_path)
    store = open_store(cfg.store.root)
    current = _current(store, run.outcomes["distill_4to2"].spec)
    argv = ["rerun", run.run_id, "--stage", "distill_4to2", "--tracking-uri", cfg.tracking.uri]
    assert main([*argv, "--set", "distill.rounds.2.lr=1e30"]) == 1
    out = capsys.readouterr().out
    assert "stage distill_4to2 failed" in out and "non-finite loss" in out
    new_id = _new_run_id(out)
    parent = client.get_run(new_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["fdm.rerun_of"] == run.run_id
    assert parent.data.tags["fdm.rerun_set"] == "distill.rounds.2.lr=1e30"
    assert parent.data.params["distill.rounds.2.lr"] == "1e+30"
    children = {c.data.tags["stage"]: c for c in _children(client, new_id)}
    assert children["distill_8to4"].data.tags["cached"] == "true"
    assert children["distill_4to2"].info.status == "FAILED"
    assert children["distill_4to2"].data.tags["key"] != run.outcomes["distill_4to2"].spec.key
    assert _record(client, run.run_id, tmp_path) == before
    assert _current(store, run.outcomes["distill_4to2"].spec) == current


def test_rerun_downstream_trains_every_round_against_the_new_teacher(first_run) -> None:
    """With --downstream, every round and evaluation below the re-run round consumed the new outputs: the
    input digests recorded in their manifests are those of the outputs this re-run made."""
    cfg, run = first_run
    store = open_store(cfg.store.root)
    d1 = run.outcomes["distill_8to4"].spec
    old_teacher = read_manifest(store, f"{d1.out_root}/{_current(store, d1)}")
    again = rerun_stage(
        cfg.tracking.uri, run.run_id, "distill_8to4", downstream=True, console=Console(quiet=True)
    )
    status = {n: o.status for n, o in again.outcomes.items()}
    assert status == {
        "prepare_data": "cached",
        "train_base": "cached",
        "distill_8to4": "done",
        "evaluate_4": "done",
        "distill_4to2": "done",
        "evaluate_2": "done",
    }, {n: o.error for n, o in again.outcomes.items()}

    def manifest(name: str):
        spec = again.outcomes[name].spec
        return read_manifest(store, f"{spec.out_root}/{_current(store, spec)}")

    new_teacher = manifest("distill_8to4")
    assert new_teacher.digest == again.outcomes["distill_8to4"].result.digest != old_teacher.digest
    assert manifest("distill_4to2").inputs["teacher"] == new_teacher.digest
    assert manifest("evaluate_4").inputs["model"] == new_teacher.digest
    assert manifest("evaluate_2").inputs["model"] == manifest("distill_4to2").digest
    assert manifest("distill_4to2").digest == again.outcomes["distill_4to2"].result.digest


def test_stages_command_shows_past_run(first_run, capsys: pytest.CaptureFixture) -> None:
    cfg, run = first_run
    assert main(["stages", run.run_id, "--tracking-uri", cfg.tracking.uri]) == 0
    out = capsys.readouterr().out
    assert "distill_4to2" in out and "evaluate_base" in out


def test_per_round_settings_in_yaml_change_only_that_round_and_below() -> None:
    """`distill.rounds: {2: {updates: 500}}` applies to round 2 alone, on top of `distill.round`: its key
    and its evaluation's change, nothing else's."""
    raw = yaml.safe_load(TOY2D.read_text())
    raw["distill"]["rounds"] = {2: {"updates": 500}}
    before = {s.name: s for s in plan(load_config(TOY2D))}
    after = {s.name: s for s in plan(parse_config(raw))}
    assert {n for n in before if before[n].key != after[n].key} == {
        "distill_8to4",
        "evaluate_4",
    }  # toy2d: 16->4
    assert after["distill_8to4"].config["updates"] == 500
    assert after["distill_16to8"].config == before["distill_16to8"].config
    assert {k: v for k, v in after["distill_8to4"].config.items() if k != "updates"} == {
        k: v for k, v in before["distill_8to4"].config.items() if k != "updates"
    }


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("bogus.key=1", "bogus: unknown key"),
        ("train.steps=many", "train.steps"),
        ("distill.end_steps=64", "distill.end_steps"),
        ("distill.round.weighting=bad", "distill.round.weighting"),
        ("data.source.toy=spiral", "data.source.toy2d.toy"),
        ("distill.quality_gate=0", "distill.quality_gate: Input should be greater than 0"),
        ("distill.rounds.2.updatez=5", "distill.rounds.2.updatez: unknown key"),
        ("distill.rounds.9.lr=0.1", "distill.rounds.9: no such round"),
        ("distill.rounds.1.lr=-1", "distill.rounds.1.lr: Input should be greater than 0"),
    ],
)
def test_config_errors_exit_2_naming_the_field(
    override: str, path: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["run", str(TOY2D), "--set", override]) == 2
    assert path in capsys.readouterr().out.replace("\n", " ")


def test_missing_config_and_unknown_rerun_stage_exit_2(first_run, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "no/such.yaml"]) == 2
    cfg, run = first_run
    assert main(["rerun", run.run_id, "--stage", "distill_9", "--tracking-uri", cfg.tracking.uri]) == 2
    assert "distill_9" in capsys.readouterr().out


def test_picard_evaluation_option_matches_sequential(first_run, overrides: list[str]) -> None:
    """Evaluating with ParaDiGMS gives the sequential quality (same noise) and records its iterations."""
    cfg = load_config(TOY2D, [*overrides, "distill.enabled=false", "evaluate.picard={window: 4, tol: 0.01}"])
    run = run_pipeline(cfg, console=Console(quiet=True))
    picard, seq = (
        run.outcomes["evaluate_base"].result.metrics,
        first_run[1].outcomes["evaluate_base"].result.metrics,
    )
    assert run.outcomes["train_base"].status == "cached"
    assert 0 < picard["parallel_iterations"] <= 8  # never more than the sequential depth
    assert picard["quality"] == pytest.approx(seq["quality"], rel=0.05)
