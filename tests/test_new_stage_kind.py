"""A new stage kind is one function plus one declaration, with no edit under pipelines/: this module declares
`sample_grid` (the final model's samples, drawn), registers it, and the planner, the config, the executor,
the cache and MLflow take it as they take the built-in kinds."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TOY2D, TOY2D, tiny_toy2d
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, Field
from rich.console import Console

from pipelines.config import ConfigError, load_config
from pipelines.plan import plan
from pipelines.runner import run_pipeline
from tasks.registry import STAGES, registered
from tasks.stage import STRICT, AutoNode, StageContext, StageKind, StageResult

ROOT = Path(__file__).resolve().parent.parent


class SampleGridConfig(BaseModel):
    """How many samples of the final model to draw, with how many Euler steps."""

    model_config = STRICT
    num: int = Field(64, ge=1)
    steps: int = Field(4, ge=1)
    seed: int = 0


def sample_grid(cfg: SampleGridConfig, ctx: StageContext, model: str) -> StageResult:
    """The stage function: sample `model` and draw the samples (a scatter plot, the data being 2-D)."""
    from matplotlib.figure import Figure

    from tasks.sample import draw_samples
    from tasks.sample_options import SampleConfig

    samples, _ = draw_samples(
        SampleConfig(sampler="euler", steps=cfg.steps, num=cfg.num, seed=cfg.seed), model
    )
    points = samples.numpy()
    fig = Figure(figsize=(4, 4))
    fig.subplots().scatter(points[:, 0], points[:, 1], s=4)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    ctx.output_path("grid.png").write_bytes(buf.getvalue())
    np.save(ctx.output_path("samples.npy"), points)
    return StageResult(stage="sample_grid", key=ctx.key, metrics={"spread": float(points.std())})


SAMPLE_GRID = StageKind(
    name="sample_grid",
    config=SampleGridConfig,
    run=f"{__name__}:sample_grid",
    inputs={"model": "model"},  # fed by the stage answering to `model`: the pipeline's final model
    output="samples",
    resources="sample",
    headline="spread",
    version="1",
    auto=AutoNode("sample_grid", "a drawing of the final model's samples"),
)


@pytest.fixture(scope="module")
def sample_grid_kind() -> Iterator[StageKind]:
    """`sample_grid` registered, and a local Ray whose workers import this module (as a plugin's workers
    import its installed package)."""
    import ray

    from infra.ray_runtime import init_ray

    with pytest.MonkeyPatch.context() as mp, registered(SAMPLE_GRID) as kind:
        mp.setenv(
            "PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
        )
        if ray.is_initialized():
            ray.shutdown()
        init_ray(num_cpus=2)
        yield kind
        ray.shutdown()


def test_a_registered_kind_is_planned_run_cached_and_recorded(
    sample_grid_kind: StageKind, tmp_path: Path
) -> None:
    cfg = load_config(TOY2D, tiny_toy2d(tmp_path, "train.steps=40", "sample_grid.num=32"))
    stages = {s.name: s for s in plan(cfg)}
    assert list(stages)[-1] == "sample_grid"
    assert stages["sample_grid"].inputs == {"model": "distill_4to2"}  # the final model, wired by name
    assert stages["sample_grid"].resources == {"num_cpus": 1.0, "num_gpus": 0.0}  # its group's defaults

    run = run_pipeline(cfg, console=Console(quiet=True))
    outcome = run.outcomes["sample_grid"]
    assert outcome.status == "done", outcome.error
    assert 0 < outcome.result.metrics["spread"] < 10
    files = os.listdir(outcome.result.output_uri)
    assert {"grid.png", "samples.npy", "_MANIFEST.json"} <= set(files)
    client = MlflowClient(cfg.tracking.uri)
    child = client.get_run(outcome.result.run_id)
    assert child.data.tags["stage"] == child.data.tags["kind"] == "sample_grid"
    assert child.data.params["sample_grid.num"] == "32"
    assert "grid.png" in {a.path for a in client.list_artifacts(child.info.run_id)}

    again = run_pipeline(cfg, console=Console(quiet=True))
    assert {o.status for o in again.outcomes.values()} == {"cached"}


def test_a_registered_kinds_section_is_validated_and_optional(sample_grid_kind: StageKind) -> None:
    with pytest.raises(ConfigError, match=r"sample_grid\.num: Input should be greater than or equal to 1"):
        load_config(TOY2D, ["sample_grid.num=0"])
    assert "sample_grid" not in {
        s.name for s in plan(load_config(TOY2D, list(TINY_TOY2D)))
    }  # absent section: no stage


def test_pipelines_names_no_stage_kind() -> None:
    """The engine knows no stage kind by name: every kind comes to it through a declaration or a policy."""
    sources = {p.name: p.read_text() for p in (ROOT / "pipelines").glob("*.py")}
    for kind in STAGES:
        for name, text in sources.items():
            assert not re.search(rf"[\"'`]{kind}[\"'`]", text), f"pipelines/{name} names the {kind} kind"
