"""The `fdm` command line as a user meets it: help for every argument, light start-up, and one clear line
with exit code 2 for a run id or tracking store that is not there."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from infra.tracking import Tracking
from pipelines.cli import _parser, main


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
