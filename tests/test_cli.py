"""The `fdm` command line as a user meets it: help for every argument, light start-up, and one clear line
with exit code 2 for a run id or tracking store that is not there, or a bad `fdm sample` flag (the flags
are generated from the one model of the sampling options)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, Field

from infra.tracking import Tracking
from pipelines import sample_cmd
from pipelines.cli import _parser, main
from tasks.sample_options import PicardOptions, PicardPoolOptions, SampleConfig, SamplingOptions
from tasks.stages.evaluate import EvalConfig
from tasks.stages.picard_sample import PicardSampleConfig


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((name, a) for (a,) in ((x,) for x in sub._actions))
        else:
            yield "fdm", action


def test_every_argument_has_help_text() -> None:
    missing = [f"{cmd} {a.dest}" for cmd, a in _actions(_parser()) if not a.help]
    assert not missing, missing


def test_help_imports_neither_torch_nor_ray() -> None:
    code = (
        "import sys\nfrom pipelines.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('IMPORTED', sorted(m for m in ('torch', 'ray', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "IMPORTED []" in out, out


@pytest.fixture
def tracking(tmp_path: Path) -> tuple[str, str, str]:
    """A sqlite MLflow store with a pipeline (parent) run and one stage run under it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracking.setup(uri, "cli-test")
    parent = t.start_parent("pipe", {}, {"pipeline": "pipe"})
    child = t.start_child(parent, "train_base", {"stage": "train_base"})
    return uri, parent, child


def test_stages_of_an_unknown_or_child_run_is_one_line_exit_2(tracking, capsys) -> None:
    uri, parent, child = tracking
    assert main(["stages", "0" * 32, "--tracking-uri", uri]) == 2
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "no such run" in out and "Traceback" not in out
    assert main(["stages", child, "--tracking-uri", uri]) == 2
    out = capsys.readouterr().out
    assert f"stage train_base of pipeline run {parent}" in out.replace("\n", "")
    assert main(["stages", parent, "--tracking-uri", uri]) == 0
    MlflowClient(uri).get_run(parent)


def test_a_missing_sqlite_store_is_an_error_not_a_new_database(tmp_path: Path, capsys) -> None:
    db = tmp_path / "elsewhere" / "mlflow.db"
    assert main(["stages", "0" * 32, "--tracking-uri", f"sqlite:///{db}"]) == 2
    assert "no MLflow database at" in capsys.readouterr().out.replace("\n", "")
    assert not db.exists() and not db.parent.exists()


def _sample_parser(model: type[BaseModel] = SampleConfig) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdm sample")
    sample_cmd.add_model_flags(parser, model, {"Picard": PicardPoolOptions})
    return parser


def test_fdm_sample_flags_are_generated_from_the_sample_config() -> None:
    class WithKnob(SampleConfig):
        knob_size: Literal["small", "large"] = Field("small", description="a field added to the model")
        depth: int = Field(7, ge=2, description="another one")

    text = " ".join(_sample_parser(WithKnob).format_help().split())
    assert "--knob-size {small,large} a field added to the model (default small)" in text
    assert "--depth DEPTH another one (default 7)" in text
    assert (
        "--solver {picard,anderson}" in text and "--strategy {PACK,SPREAD,STRICT_PACK,STRICT_SPREAD}" in text
    )
    for name, info in SampleConfig.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text and str(info.description) in text
    args = _sample_parser().parse_args(["--picard", "--actor-cpus", "0.25", "--solver", "anderson"])
    cfg = SampleConfig(**vars(args))
    assert (cfg.picard, cfg.actor_cpus, cfg.solver, cfg.window) == (True, 0.25, "anderson", 64)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--window", "0"], "argument --window: Input should be greater than or equal to 1"),
        (["--actor-cpus", "0"], "argument --actor-cpus: Input should be greater than 0"),
        (["--tol", "nan"], "argument --tol: Input should be a finite number"),
        (["--solver", "newton"], "argument --solver: invalid choice: 'newton'"),
    ],
)
def test_a_bad_fdm_sample_flag_exits_2_naming_it(argv: list[str], named: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--checkpoint", "x", *argv])
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_evaluate_picard_sample_and_fdm_sample_share_one_definition_of_each_picard_option() -> None:
    assert EvalConfig.model_fields["picard"].annotation == PicardOptions | None
    assert issubclass(PicardSampleConfig, PicardPoolOptions) and issubclass(SampleConfig, PicardPoolOptions)
    assert issubclass(PicardPoolOptions, PicardOptions) and issubclass(PicardSampleConfig, SamplingOptions)
    for name, info in SamplingOptions.model_fields.items():  # Picard's settings, its actors, num and seed
        for model in (PicardSampleConfig, SampleConfig):
            other = model.model_fields[name]
            assert (other.default, other.description, other.metadata) == (
                info.default,
                info.description,
                info.metadata,
            )
    defaults = vars(_sample_parser().parse_args([]))
    assert {k: defaults[k] for k in SamplingOptions.model_fields} == SamplingOptions().model_dump()
