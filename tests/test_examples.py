"""The documented examples run: every `fdm` command line in the shell blocks of README.md and the user pages
of the docs (getting started, the guides) runs in a scratch directory against a small toy2d run, and exits 0.

Placeholders are filled from that run: RUN_ID (the run's `MLflow run id:`), STAGE (its last distillation
round), KEY (the key of the stage kind its path names), JOB_ID (what `fdm submit` printed); the job API
`http://127.0.0.1:8265` is a local Ray head's (test_submit's, with token auth on 127.0.0.1) and the digits
model names (`fdm-digits-...`) are the toy run's. `fdm run` and `fdm submit` get the shrunk settings SMALL
appended, so every run of the config after the first is all cache hits. A block preceded by
`<!-- examples: skip (why) -->` (an AWS cluster, a server that runs until stopped, a benchmark) is not run;
test_docs.py still parses its command lines."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_docs import SHELL_FENCES, fdm_commands, shell_lines
from test_pipeline import SMALL  # two rounds, 8 -> 4 -> 2 steps
from test_submit import Head, ray_cluster  # noqa: F401 (ray_cluster: the local head fixture)

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    ROOT / "docs" / "getting-started.md",
    *sorted((ROOT / "docs").glob("guide-*.md")),
]
SKIP = re.compile(r"<!-- examples: skip \((.+?)\) -->\s*$")
# The order the examples need: a run first, then what reads it, then the cluster commands.
ORDER = ["run", "stages", "rerun", "sample", "submit", "status", "logs"]
JOB_API = "http://127.0.0.1:8265"


@dataclass(frozen=True)
class Example:
    page: str
    line: int
    command: str  # the logical shell line, `\`-continuations joined, without its comment
    subcommand: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}:{self.subcommand}"


def _shell_blocks(markdown: str) -> list[tuple[int, str, str | None]]:
    """(first line number, text, skip reason or None) of every shell code block."""
    out, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        fence = lines[i][3:].strip() if lines[i].startswith("```") else None
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence in SHELL_FENCES:
            skip = SKIP.match(lines[i - 1]) if i else None
            out.append((i + 2, "\n".join(lines[i : end + 1]), skip.group(1) if skip else None))
        i = end + 1
    return out


def documented() -> tuple[list[Example], list[tuple[str, str]]]:
    """The `fdm` examples to run, in ORDER, and (where, why) for each skipped block that has some."""
    run, skipped = [], []
    for path in PAGES:
        page = str(path.relative_to(ROOT))
        for start, block, why in _shell_blocks(path.read_text()):
            found = fdm_commands(block)
            if why is not None:
                skipped += [(f"{page}:{start}", why)] if found else []
                continue
            logical = _logical_lines(block)
            for no, argv in found:
                run.append(Example(page, start + no - 2, logical[no], argv[0]))
    unknown = [e.id for e in run if e.subcommand not in ORDER]
    assert not unknown, f"documented examples of subcommands the test cannot run: {unknown}"
    return sorted(run, key=lambda e: ORDER.index(e.subcommand)), skipped


def _logical_lines(block: str) -> dict[int, str]:
    """Line number (in the block, its fence = 1) -> logical line starting there, comment removed."""
    out = {}
    for no, line in shell_lines(block):
        lex = shlex.shlex(line, posix=False, punctuation_chars=False)
        lex.whitespace_split, lex.commenters = True, "#"
        out[no] = " ".join(lex)
    return out


EXAMPLES, SKIPPED = documented()


@dataclass
class Scratch:
    """The scratch directory the examples run in and the values their placeholders take."""

    cwd: Path
    values: dict[str, str] = field(default_factory=dict)
    ran: dict[str, int] = field(default_factory=dict)  # filled command -> its exit code (run once each)

    def fill(self, example: Example, job_api: str | None) -> str:
        cmd = re.sub(r"^\.venv/bin/fdm\b", "fdm", example.command)  # the scratch directory has no .venv
        cmd = cmd.replace("pipelines/configs/", f"{ROOT}/pipelines/configs/")
        cmd = cmd.replace("fdm-digits-", "fdm-toy2d-")
        if job_api:
            cmd = cmd.replace(JOB_API, job_api)
        cmd = re.sub(r"stages/(\w+)/KEY\b", lambda m: f"stages/{m.group(1)}/{self.key(m.group(1))}", cmd)
        for name in ("RUN_ID", "STAGE", "JOB_ID"):
            if re.search(rf"\b{name}\b", cmd):
                assert name in self.values, f"{example.id}: no {name} yet (an earlier example sets it)"
                cmd = re.sub(rf"\b{name}\b", self.values[name], cmd)
        if example.subcommand in ("run", "submit"):
            cmd += " " + " ".join(f"--set {shlex.quote(s)}" for s in SMALL)
        return cmd

    def key(self, kind: str) -> str:
        """The key of the first run's stage of `kind` (for distillation rounds, STAGE's)."""
        client = MlflowClient(f"sqlite:///{self.cwd / 'mlflow.db'}")
        children = client.search_runs(
            [client.get_experiment_by_name("fdm-toy2d").experiment_id],
            f"tags.mlflow.parentRunId = '{self.values['RUN_ID']}'",
        )
        keys = {
            r.data.tags.get("stage"): r.data.tags.get("key")
            for r in children
            if r.data.tags.get("kind") == kind
        }
        assert keys, f"the run has no stage of kind {kind}"
        return keys.get(self.values.get("STAGE"), next(iter(keys.values())))

    def learn(self, example: Example, out: str) -> None:
        """Take RUN_ID (and STAGE) from the first run, JOB_ID from a submit."""
        if example.subcommand == "run" and "RUN_ID" not in self.values:
            self.values["RUN_ID"] = re.search(r"MLflow run id: (\w+)", out).group(1)
            client = MlflowClient(f"sqlite:///{self.cwd / 'mlflow.db'}")
            rounds = {
                int(r.data.tags["round"]): r.data.tags["stage"]
                for r in client.search_runs(
                    [client.get_experiment_by_name("fdm-toy2d").experiment_id],
                    f"tags.mlflow.parentRunId = '{self.values['RUN_ID']}' and tags.kind = 'distill_round'",
                )
            }
            self.values["STAGE"] = rounds[max(rounds)]
        if example.subcommand == "submit":
            self.values["JOB_ID"] = re.search(r"submitted job (\S+)", out).group(1)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Scratch:
    return Scratch(tmp_path_factory.mktemp("examples"))


def test_the_docs_have_examples_of_every_flow() -> None:
    """The README's flows and the guides give at least one runnable example of each subcommand in ORDER,
    and every skipped block says why."""
    assert {e.subcommand for e in EXAMPLES} == set(ORDER)
    assert {e.page for e in EXAMPLES if e.subcommand == "submit"} >= {"README.md"}
    assert all(why for _, why in SKIPPED)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_documented_example_exits_0(
    example: Example, scratch: Scratch, request: pytest.FixtureRequest
) -> None:
    head: Head | None = None
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    if example.subcommand in ("submit", "status", "logs"):
        head = request.getfixturevalue("ray_cluster")  # started at the first cluster example
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token}
    cmd = scratch.fill(example, head.job_api if head else None)
    if cmd in scratch.ran:  # the same command documented on another page: it ran once
        assert scratch.ran[cmd] == 0
        return
    done = subprocess.run(
        ["bash", "-c", cmd], cwd=scratch.cwd, env=env, capture_output=True, text=True, timeout=480
    )
    out = done.stdout + done.stderr
    scratch.ran[cmd] = done.returncode
    assert done.returncode == 0, f"{example.id}: `{cmd}` exited {done.returncode}:\n{out[-4000:]}"
    scratch.learn(example, out)
