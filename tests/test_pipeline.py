"""End to end on a local Ray cluster, a temporary sqlite MLflow and a temporary store: the toy2d pipeline,
its MLflow record, the stage cache, re-running one round, and config errors."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from pipelines.cli import main
from pipelines.config import load_config
from pipelines.plan import plan
from pipelines.runner import rerun_stage, run_pipeline

CONFIG = Path(__file__).resolve().parent.parent / "pipelines" / "configs" / "toy2d.yaml"
SMALL = [
    "train.steps=300",
    "train.checkpoint_every=100",
    "distill.start_steps=8",
    "distill.end_steps=2",
    "distill.round.updates=40",
    "distill.round.final_updates=40",
    "evaluate.num_samples=300",
    "evaluate.batch_size=300",
    "evaluate.samplers=[{method: heun, steps: 8}]",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def overrides(workdir: Path) -> list[str]:
    return [*SMALL, f"store.root={workdir / 'store'}", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}"]


@pytest.fixture(scope="module")
def first_run(ray_local: None, overrides: list[str]):
    cfg = load_config(CONFIG, overrides)
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
        "distill_1",
        "evaluate_1",
        "distill_2",
        "evaluate_2",
    ]
    assert {o.status for o in run.outcomes.values()} == {"done"}, {
        n: o.error for n, o in run.outcomes.items()
    }
    final = run.outcomes["evaluate_2"].result
    assert final.metrics["quality"] < 1.0  # sliced Wasserstein of the 2-step student to held-out data
    assert run.outcomes["distill_2"].result.info["steps"] == 2


def test_mlflow_holds_parent_and_one_child_per_stage(first_run) -> None:
    cfg, run = first_run
    client = MlflowClient(cfg.tracking.uri.replace("sqlite:///", "sqlite:///"))
    parent = client.get_run(run.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.process"] == "edm"
    tags = parent.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"].startswith("fdm run")
    assert len(tags["mlflow.source.git.commit"].removesuffix("+dirty")) == 40
    assert "Final student: distill_2, 2 sampling steps." in tags["mlflow.note.content"]
    curve = client.get_metric_history(run.run_id, "sw")  # the parent's quality against sampling steps
    assert sorted(m.step for m in curve) == [2, 4, 8]
    parent_files = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config.yaml", "summary.json", "quality_vs_steps.png"} <= parent_files
    children = {c.data.tags["stage"]: c for c in _children(client, run.run_id)}
    assert set(children) == set(run.outcomes)
    names = {c.info.run_name for c in children.values()}
    assert {"distill_8to4", "distill_4to2", "evaluate_4", "evaluate_base_heun8"} <= names
    base = children["train_base"]
    assert base.data.params["train.steps"] == parent.data.params["train.steps"] == "300"  # one name
    assert (
        base.data.tags["cached"] == "false" and base.data.tags["key"] == run.outcomes["train_base"].spec.key
    )
    losses = client.get_metric_history(base.info.run_id, "train/loss")
    assert len(losses) >= 3 and 0 not in {m.step for m in losses}  # by real step, no step-0 duplicate
    version = base.data.tags["output_version"]
    assert base.data.tags["output_uri"].endswith(f"{run.outcomes['train_base'].spec.out_root}/{version}")
    ev = children["evaluate_1"]
    assert ev.data.tags["round"] == "1" and ev.data.tags["steps"] == "4"
    assert {"quality", "sw", "nfe", "seconds_per_sample"} <= set(ev.data.metrics)  # one key set for all
    assert ev.data.params["evaluate.samplers"] == '[{"method": "euler", "steps": 4}]'  # what ran
    assert ev.data.tags["sampler"] == "euler" and ev.data.tags["nfe"] == "4"
    history = client.get_metric_history(ev.info.run_id, "sw")
    assert [m.step for m in history] == [4]  # at its sampling steps, never at a made-up step 0
    assert {"samples_euler4.png", "metrics.json"} <= {a.path for a in client.list_artifacts(ev.info.run_id)}
    model_files = {a.path for a in client.list_artifacts(children["distill_1"].info.run_id)}
    assert "model.json" in model_files and "weights.safetensors" not in model_files


def test_second_run_is_all_cache_hits_without_ray(first_run, overrides: list[str]) -> None:
    """A fully cached run decides every hit from manifests in the driver: no Ray task, no Ray start."""
    run = run_pipeline(load_config(CONFIG, overrides), console=Console(quiet=True))
    assert {o.status for o in run.outcomes.values()} == {"cached"}
    assert not run.used_ray
    assert run.outcomes["evaluate_2"].result.metrics == first_run[1].outcomes["evaluate_2"].result.metrics


def test_changing_distillation_reuses_data_and_base(first_run, overrides: list[str]) -> None:
    cfg = load_config(CONFIG, [*overrides, "distill.round.lr=2e-3"])
    run = run_pipeline(cfg, console=Console(quiet=True))
    status = {n: o.status for n, o in run.outcomes.items()}
    assert status["prepare_data"] == status["train_base"] == status["evaluate_base"] == "cached"
    assert status["distill_1"] == status["distill_2"] == "done"


def test_rerun_recomputes_only_that_round(first_run) -> None:
    cfg, run = first_run
    again = rerun_stage(cfg.tracking.uri, run.run_id, "distill_2", console=Console(quiet=True))
    status = {n: o.status for n, o in again.outcomes.items()}
    assert status == {
        "prepare_data": "cached",
        "train_base": "cached",
        "distill_1": "cached",
        "distill_2": "done",
    }
    client = MlflowClient(cfg.tracking.uri)
    reruns = [c for c in _children(client, run.run_id) if c.data.tags.get("rerun") == "True"]
    assert [c.data.tags["stage"] for c in reruns if c.data.tags["cached"] == "false"] == ["distill_2"]

    downstream = rerun_stage(
        cfg.tracking.uri, run.run_id, "distill_2", downstream=True, console=Console(quiet=True)
    )
    assert downstream.outcomes["distill_2"].status == downstream.outcomes["evaluate_2"].status == "done"


def test_stages_command_shows_past_run(first_run, capsys: pytest.CaptureFixture) -> None:
    cfg, run = first_run
    assert main(["stages", run.run_id, "--tracking-uri", cfg.tracking.uri]) == 0
    out = capsys.readouterr().out
    assert "distill_2" in out and "evaluate_base" in out


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("bogus.key=1", "bogus: unknown key"),
        ("train.steps=many", "train.steps"),
        ("distill.end_steps=64", "distill.end_steps"),
        ("distill.round.weighting=bad", "distill.round.weighting"),
        ("data.source.toy=spiral", "data.source.toy2d.toy"),
        ("distill.end_steps=1", "distill.end_steps: a 1-step student"),
    ],
)
def test_config_errors_exit_2_naming_the_field(
    override: str, path: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["run", str(CONFIG), "--set", override]) == 2
    assert path in capsys.readouterr().out.replace("\n", " ")


def test_missing_config_and_unknown_rerun_stage_exit_2(first_run, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "no/such.yaml"]) == 2
    cfg, run = first_run
    assert main(["rerun", run.run_id, "--stage", "distill_9", "--tracking-uri", cfg.tracking.uri]) == 2
    assert "distill_9" in capsys.readouterr().out


def test_picard_evaluation_option_matches_sequential(first_run, overrides: list[str]) -> None:
    """Evaluating with ParaDiGMS gives the sequential quality (same noise) and records its iterations."""
    cfg = load_config(CONFIG, [*overrides, "distill.enabled=false", "evaluate.picard={window: 4, tol: 0.01}"])
    run = run_pipeline(cfg, console=Console(quiet=True))
    picard, seq = (
        run.outcomes["evaluate_base"].result.metrics,
        first_run[1].outcomes["evaluate_base"].result.metrics,
    )
    assert run.outcomes["train_base"].status == "cached"
    assert 0 < picard["parallel_iterations"] <= 8  # never more than the sequential depth
    assert picard["quality"] == pytest.approx(seq["quality"], rel=0.05)
