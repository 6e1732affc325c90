"""The docs agree with the code: the `fdm` command lines of README.md and docs/*.md parse with the real CLI
parser, every subcommand has an example, the tests they name exist, the config paths they name exist, the
sections moved out of the README are where the docs say, the README stays one screenful of purpose (at most
250 lines), the generated parts (the README's results table, docs/cli.md, docs/configuration.md) equal a
fresh rendering, and the docs site builds with `mkdocs build --strict`. tests/test_examples.py runs the
examples; this file only parses: no Ray, no training."""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import readme
from pipelines.cli import _parser
from pipelines.config import PipelineConfig
from tasks.distillation.schedule import DistillSchedule
from tasks.stages.distill_round import DistillConfig

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250
# Every `## ` section, by the file that holds it: the README's user flows, and the sections the README had
# before the docs site, each moved to one page.
REQUIRED_SECTIONS = {
    "README.md": [
        "Set up and run",
        "Submit to a cluster",
        "Inspect in MLflow",
        "Re-run a round",
        "Results",
        "Documentation",
    ],
    "docs/concepts.md": ["What it does", "Evaluation metrics", "Layout"],
    "docs/guide-run.md": ["The `fdm` command"],
    "docs/guide-cluster.md": ["Running on a cluster"],
    "docs/config-guide.md": ["Configuration"],
    "docs/guide-picard.md": ["Samplers"],
    "docs/guide-mlflow.md": ["Checking the MLflow UI in a browser"],
    "docs/reliability.md": ["Reliability: faults injected, survived, work lost"],
    "docs/results.md": ["Results"],
}
RELIABILITY = "docs/reliability.md"
SHELL_FENCES = {"bash", "sh", "shell", "console"}
TEST_REF = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?")


def doc_files() -> list[Path]:
    """README.md and every page of the docs site."""
    return [README, *sorted(DOCS.glob("*.md"))]


def _text() -> str:
    """README.md and the docs pages, one after another."""
    return "\n".join(path.read_text() for path in doc_files())


def _section(title: str, path: str) -> str:
    """The body of the `## title` section of `path`, up to the next `## ` heading."""
    text = (ROOT / path).read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert m, f"{path} has no section '## {title}'"
    return m.group(1)


def shell_lines(markdown: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every shell code block, with `\\`-continued lines joined."""
    out, fence, start, buf = [], None, 0, ""
    for no, line in enumerate(markdown.splitlines(), 1):
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence is None or fence not in SHELL_FENCES:
            continue
        if not buf:
            start = no
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    return out


def _tokens(line: str) -> list[str]:
    line = re.sub(r"\$\([^()]*\)", "VALUE", line)  # $(hostname -I | ...) is one value to the command
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def fdm_commands(markdown: str) -> list[tuple[int, list[str]]]:
    """Every `fdm ...` invocation in the shell blocks, as argv after `fdm` (also `.venv/bin/fdm`, after
    `--` of `ray job submit`, and inside a quoted `ray exec` command)."""
    found = []

    def scan(no: int, tokens: list[str]) -> None:
        for i, tok in enumerate(tokens):
            if tok.startswith("fdm "):  # a quoted command line, e.g. ray exec ... 'fdm tracking-server ...'
                scan(no, _tokens(tok))
            elif tok == "fdm" or tok.endswith("/fdm"):
                argv = []
                for arg in tokens[i + 1 :]:
                    if arg and set(arg) <= set("();<>|&"):
                        break
                    argv.append(arg)
                found.append((no, argv))
                return

    for no, line in shell_lines(markdown):
        scan(no, _tokens(line))
    return found


def _parse(argv: list[str]) -> str:
    """'' if the real `fdm` parser accepts argv, else its error message. `fdm bench NAME` passes everything
    after NAME to the benchmark (argparse REMAINDER), so only NAME is checked."""
    if argv[:1] == ["bench"]:
        argv = argv[:2]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _parser().parse_args(argv)
    except SystemExit as exit_:
        if exit_.code:
            return err.getvalue().strip().splitlines()[-1]
    return ""


def test_required_sections_are_present() -> None:
    missing = []
    for path, sections in REQUIRED_SECTIONS.items():
        headings = re.findall(r"^## (.+?)\s*$", (ROOT / path).read_text(), re.MULTILINE)
        missing += [f"{path}: ## {h}" for h in sections if h not in headings]
    assert not missing, f"missing sections: {missing}"


def test_readme_is_at_most_250_lines() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to a page of docs/"
    )


def test_every_fdm_command_line_parses() -> None:
    bad, count = [], 0
    for path in doc_files():
        commands = fdm_commands(path.read_text())
        count += len(commands)
        name = path.relative_to(ROOT)
        bad += [
            f"{name}:{no}: fdm {' '.join(argv)}\n    {err}" for no, argv in commands if (err := _parse(argv))
        ]
    assert count >= 8
    assert not bad, "fdm command lines the CLI parser refuses:\n" + "\n".join(bad)


def test_every_subcommand_has_an_example() -> None:
    subcommands = readme.subcommands(_parser())
    shown = {argv[0] for _, argv in fdm_commands(_text()) if argv}
    missing = [name for name in subcommands if name not in shown]
    assert not missing, f"`fdm --help` subcommands with no example command line in the docs: {missing}"


def _defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_named_tests_exist() -> None:
    refs = TEST_REF.findall(_text())
    assert refs
    bad = []
    for path, name in refs:
        file = ROOT / path
        if not file.is_file():
            bad.append(f"{path}: no such file")
        elif name and name not in _defined_tests(file):
            bad.append(f"{path}::{name}: no such test")
    assert not bad, "the docs name tests that do not exist:\n" + "\n".join(sorted(set(bad)))


def test_every_fault_row_names_its_test() -> None:
    rows = _section("Reliability: faults injected, survived, work lost", RELIABILITY).splitlines()
    rows = [r for r in rows if r.startswith("| ") and not r.startswith("| fault injected")]
    assert rows, "the Reliability section has no fault table"
    unnamed = [r.split("|")[1].strip() for r in rows if not re.search(r"tests/[\w/]+\.py::test_\w+", r)]
    assert not unnamed, f"fault rows without a `tests/...::test_...` that demonstrates them: {unnamed}"


# Mapping fields whose values are some fields of a model: (model, field) -> that model. Their paths go
# through a key, e.g. distill.rounds.3.updates.
PARTIAL_VALUES = {(DistillSchedule, "rounds"): DistillConfig}


def _resolves(path: list[str], model: type = PipelineConfig) -> bool:
    """Whether a dotted config path names a field (through nested models, the data.source variants and
    mappings of partial models)."""
    if not path:
        return True
    info = model.model_fields.get(path[0])
    if info is None:
        return False
    if (model, path[0]) in PARTIAL_VALUES:
        return len(path) <= 2 or _resolves(path[2:], PARTIAL_VALUES[model, path[0]])
    ann = readme._strip(info.annotation)
    models = [a for a in (readme._union_args(ann) or (ann,)) if readme._is_model(a)]
    if len(path) == 1:
        return True
    return any(_resolves(path[1:], m) for m in models)


def test_config_paths_in_the_docs_exist() -> None:
    """Every `--set PATH=...` of the docs' command lines and every `section.field` they name exists."""
    text = _text()
    top = "|".join(PipelineConfig.model_fields)
    named = set(re.findall(rf"`((?:{top})(?:\.\w+)+)(?:=[^`]*)?`", text))
    named = {p for p in named if not re.search(r"\.(json|yaml|png|md|npz)$", p)}  # files, e.g. model.json
    named |= set(re.findall(r"--set ((?:[a-z_]+\.)*[a-z_]+)=", text))  # not placeholders (KEY=VALUE)
    for _, argv in fdm_commands(text):
        named |= {argv[i + 1].split("=")[0] for i, a in enumerate(argv[:-1]) if a == "--set"}
    unknown = sorted(p for p in named if not _resolves(p.split(".")))
    assert len(named) > 10
    assert not unknown, f"the docs name config fields that do not exist: {unknown}"


def test_generated_docs_equal_a_fresh_rendering() -> None:
    problems = readme.stale_parts()
    assert not problems, "\n".join(problems)


def test_the_only_generated_readme_block_is_the_results_table() -> None:
    assert [m.group(1) for m in readme.BLOCK.finditer(README.read_text())] == [readme.HEADLINES]


def test_docs_site_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict` (as `make docs`): every page of the nav exists, no link or anchor is broken."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "reports" / "picard" / "index.html").is_file()


@pytest.mark.parametrize(
    ("line", "argv"),
    [
        (".venv/bin/fdm run x.yaml --set a.b=1  # comment", ["run", "x.yaml", "--set", "a.b=1"]),
        (
            "ray job submit --address A -- \\\n  fdm rerun R --stage distill_2to1",
            ["rerun", "R", "--stage", "distill_2to1"],
        ),
        ("ray exec c.yaml 'fdm tracking-server --host $(hostname -I | cut -d\" \" -f1)'", None),
        ("fdm bench picard --quick | tee log", ["bench", "picard", "--quick"]),
    ],
)
def test_command_extraction(line: str, argv: list[str] | None) -> None:
    found = fdm_commands(f"```bash\n{line}\n```\n")
    assert len(found) == 1
    if argv is None:
        assert found[0][1] == ["tracking-server", "--host", "VALUE"]
    else:
        assert found[0][1] == argv


def test_a_missing_or_empty_summary_is_named(tmp_path: Path) -> None:
    """The results table is read from the benchmarks' JSON: a missing file or headline names the file."""
    with pytest.raises(readme.ReportError, match=r"picard\.summary\.json: missing"):
        readme._summary_headline("picard", tmp_path)
    (tmp_path / "picard.summary.json").write_text('{"headline": ""}')
    with pytest.raises(readme.ReportError, match=r"picard\.summary\.json: no headline"):
        readme._summary_headline("picard", tmp_path)
