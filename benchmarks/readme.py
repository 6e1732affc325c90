"""The generated parts of the documentation: README blocks from the benchmark reports, the `fdm` parser and
the shipped toy2d config, and docs/configuration.md from the pipeline's pydantic models.

    python -m benchmarks.readme           # rewrite README.md's generated blocks and docs/configuration.md
    python -m benchmarks.readme --check   # exit 1, naming each stale block, if a fresh rendering differs

A generated block of README.md sits between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; its numbers come
from benchmarks/results/*.md (re-run the benchmark to change them, never edit the block). The readings
around the blocks are hand-written. tests/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
BLOCK = re.compile(r"<!-- ([\w:-]+):begin -->\n(.*?)<!-- \1:end -->", re.DOTALL)


class ReportError(ValueError):
    """A report lacks what a block is rendered from; the message names the report and what is missing."""


# --- reading the reports -------------------------------------------------------------------------------
@dataclass
class Table:
    """A markdown table of a report: header cells, rows, and the headings above it (outermost first)."""

    header: list[str]
    rows: list[list[str]]
    headings: list[str]

    def col(self, name: str) -> int:
        for i, h in enumerate(self.header):
            if h == name:
                return i
        raise KeyError(f"no column {name!r} in {self.header}")

    def records(self) -> list[dict[str, str]]:
        return [dict(zip(self.header, row)) for row in self.rows]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(markdown: str) -> list[Table]:
    """Every table in `markdown`, with the headings it sits under."""
    lines = markdown.splitlines()
    out: list[Table] = []
    heads: dict[int, str] = {}
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(#+) (.*)$", line)
        if m:
            level = len(m.group(1))
            heads = {k: v for k, v in heads.items() if k < level} | {level: m.group(2).strip()}
        elif line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]):
            header, rows, i = _cells(line), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            out.append(Table(header, rows, [heads[k] for k in sorted(heads)]))
            continue
        i += 1
    return out


@dataclass
class Report:
    name: str
    text: str

    @property
    def path(self) -> str:
        return f"benchmarks/results/{self.name}.md"

    def find(self, pattern: str, what: str, flags: int = 0) -> re.Match:
        m = re.search(pattern, self.text, flags)
        if m is None:
            raise ReportError(f"{self.path}: no {what} (looked for /{pattern}/)")
        return m

    def line(self, prefix: str) -> str:
        """The report's line that starts with `prefix` (markdown line-break spaces removed)."""
        return (
            self.find(rf"^{re.escape(prefix)}.*$", f"line starting {prefix!r}", re.MULTILINE).group(0).strip()
        )

    def table(self, first_column: str, under: str | None = None) -> Table:
        """The first table whose header starts with `first_column` (below a heading starting with `under`)."""
        for t in tables(self.text):
            if t.header[0] == first_column and (
                under is None or any(h.startswith(under) for h in t.headings)
            ):
                return t
        where = f" under a heading {under!r}" if under else ""
        raise ReportError(f"{self.path}: no table starting with column {first_column!r}{where}")

    def machine(self) -> str:
        """What the report's "Machine:" line says about the machine, up to its first full stop."""
        return self.find(r"Machine: (.+?)(?:\.\s+(?=[A-Z])|\s*$)", "Machine: line", re.MULTILINE).group(1)

    def command(self) -> str:
        return self.find(r"Command: `([^`]+)`", "Command: `...`").group(1)

    def source(self) -> str:
        """One line naming the report, the command that wrote it and its machine."""
        return f"Source: `{self.path}`, written by `{self.command()}`. Machine: {self.machine()}."


def report(name: str, results: Path = RESULTS) -> Report:
    path = results / f"{name}.md"
    if not path.is_file():
        raise ReportError(f"benchmarks/results/{name}.md: missing (run `fdm bench {name}`)")
    return Report(name, path.read_text())


def num(cell: str) -> float:
    """The number in a table cell such as '3.72x', '**10.4 s**', '0.02% (within goal)' or '1,478,642'."""
    m = re.search(r"-?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?", cell.replace("**", ""))
    if m is None:
        raise ValueError(f"no number in {cell!r}")
    return float(m.group(0).replace(",", ""))


def fmt(x: float) -> str:
    """FD-style rounding: 3 significant digits below 10, one decimal above (3.09, 30.1, 145.0)."""
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A markdown table; `align` has one letter per column: l (left) or r (right; default after the first)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = [header, sep, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def bold(s: str) -> str:
    return f"**{s}**"


# --- README blocks from the reports -------------------------------------------------------------------
def make_run(results: Path) -> str:
    """The first screen's `make run` time: the pipeline report's wall time of the digits chain."""
    r = report("pipeline", results)
    wall = num(r.table("measure").rows[0][1])
    return (
        f"`make run` takes about {round(wall / 60)} minutes on 2 idle CPU cores (measured: {wall:.1f} s for "
        f"the whole digits chain, `{r.path}`, on {r.machine().split(',')[0]})."
    )


def _picard_rows(r: Report) -> list[dict[str, str]]:
    return r.table("sampler").records()


def _evaluator_name(e: str) -> str:
    m = re.fullmatch(r"Ray x(\d+)", e)
    return f"Ray ×{m.group(1)} actor{'s' if m.group(1) != '1' else ''}" if m else e


def picard(results: Path) -> str:
    """Per sampler on the digits U-Net: the fastest row of each (evaluator, solver), then the report's goal
    table (issue 26's goals with today's value and this run's) and the published figures."""
    r = report("picard", results)
    rows = _picard_rows(r)
    best: dict[tuple[str, str, str], dict[str, str]] = {}
    for row in rows:
        key = (row["sampler"], row["evaluator"], row["solver"])
        if key not in best or num(row["speed-up"]) > num(best[key]["speed-up"]):
            best[key] = row
    out = [
        [
            row["sampler"],
            _evaluator_name(row["evaluator"]),
            row["solver"],
            row["window"],
            row["tol"],
            f"{row['speed-up'].replace('x', '×')} ({row['min-max']})",
            row["parallel iterations"],
            row["ms per iteration"],
            row["deviation"],
        ]
        for row in best.values()
    ]
    header = ["sampler", "evaluator", "solver", "window", "tolerance", "speed-up (min–max)"]
    header += ["parallel iterations", "ms per iteration", "max deviation"]
    goal = r.table("goal", under="Goals")
    return "\n\n".join(
        [
            r.source(),
            md_table(header, out, "lllrrrrrr"),
            md_table(goal.header, goal.rows, "lllll"),
            r.line("Published figures"),
        ]
    )


def picard_cluster(results: Path) -> str:
    """The digits U-Net rows behind "Picard actors on a cluster": local batched vs Ray actors on one
    machine, and what an actor call adds to an iteration."""
    r = report("picard", results)
    rows = [row for row in _picard_rows(r) if row["sampler"] == "DDPM-1000"]

    def pick(evaluator: str) -> dict[str, str]:
        mine = [row for row in rows if row["evaluator"] == evaluator]
        if not mine:
            raise ReportError(f"{r.path}: no DDPM-1000 row for {evaluator}")
        return max(mine, key=lambda row: num(row["speed-up"]))

    local, ray1, ray2 = pick("local batched"), pick("Ray x1"), pick("Ray x2")
    parts = ray1["actor submit / compute / overhead / gather"].split(" / ")
    ray_ms = float(parts[0]) + float(parts[2]) + float(parts[3])
    return (
        f"In `{r.path}` ({r.machine().split(',')[0]}), digits U-Net, DDPM-1000, one sample: best "
        f"{local['speed-up']} local batched (window {local['window']}, {local['solver']}), "
        f"{ray1['speed-up']} on 1 Ray actor and {ray2['speed-up']} on 2 (window {ray2['window']}, "
        f"{ray2['solver']}). A Picard iteration took {local['ms per iteration']} ms local batched, "
        f"{ray1['ms per iteration']} ms on 1 actor and {ray2['ms per iteration']} ms on 2; of the 1-actor "
        f"call, {parts[1]} ms was the actor's compute and {ray_ms:.1f} ms Ray's (submit, scheduling and "
        "transfer, gather)."
    )


def distillation(results: Path) -> str:
    """The lever study in brief: each lever's chosen variant with its student ratios, then the shipped recipe
    per student against the goals, its cost and the report's reading."""
    r = report("distillation", results)
    rows = []
    for t in tables(r.text):
        if t.header[0] != "variant" or not t.headings[-1].startswith("Lever "):
            continue
        chosen = next((row for row in t.rows if "(chosen)" in row[0]), None)
        if chosen is None:
            raise ReportError(f"{r.path}: the table under {t.headings[-1]!r} marks no chosen variant")
        rec = dict(zip(t.header, chosen))
        lever = t.headings[-1].split(": ", 1)[-1]
        ratio = [rec.get(f"{n} steps", "").split(" (")[0] for n in (4, 2, 1)]
        rows.append([lever, chosen[0].replace(" **(chosen)**", ""), *ratio, rec["wall to 4"]])
    levers = md_table(
        ["lever (in study order)", "chosen", "4 steps", "2 steps", "1 step", "wall to 4 ÷ base"],
        rows,
        "llrrrr",
    )
    final = r.table("student steps", under="The chosen recipe")
    recipe = md_table(final.header, final.rows, "l" + "r" * (len(final.header) - 1))
    return "\n\n".join(
        [
            r.source(),
            "Each lever's chosen variant (student FD ÷ teacher Heun-18 FD, mean of 2 seeds; the report has "
            "every variant):",
            levers,
            "The chosen recipe, per student:",
            recipe,
            r.line("Cost to 4 steps:"),
            "Report's reading: " + _reading(r),
        ]
    )


def _reading(r: Report) -> str:
    return r.line("Reading:").removeprefix("Reading:").strip()


def _section(r: Report, heading: str) -> str:
    """The text of the report's `## heading` section (up to the next `## `)."""
    m = r.find(
        rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", f"## {heading} section", re.MULTILINE | re.DOTALL
    )
    return m.group(1)


def _bullets(r: Report, heading: str) -> str:
    return "\n".join(line for line in _section(r, heading).splitlines() if line.startswith("- "))


def fdm_training(results: Path) -> str:
    """The study's progress, its summary, the EDM step ratios per seed, the ablation table and (once two
    settings have every seed) the ratio of each arm at its own best setting."""
    r = report("fdm_training", results)
    ratios, ablations = r.table("seed"), r.table("setting")
    best = "Each arm at its own best setting"
    return "\n\n".join(
        [
            r.source(),
            r.line("Progress:"),
            _bullets(r, "Summary"),
            md_table(ratios.header, ratios.rows),
            md_table(ablations.header, ablations.rows),
            *([r.line(best)] if best in r.text else []),
        ]
    )


def fdm_sampling(results: Path) -> str:
    """The summary and the EDM table of Heun NFE to reach target FDs."""
    r = report("fdm_sampling", results)
    targets = r.table("target FD")
    return "\n\n".join(
        [r.source(), md_table(targets.header, targets.rows), _bullets(r, "Summary"), r.line("Paper anchor")]
    )


def pipeline(results: Path) -> str:
    r = report("pipeline", results)
    t = r.table("measure")
    return "\n\n".join([r.source(), md_table(t.header, t.rows, "lrr")])


def loader_throughput(results: Path) -> str:
    r = report("loader_throughput", results)
    t = r.table("data")
    step = r.find(r"\*\*([\d.]+ ms/step[^*]*)\*\*", "training step time").group(1)
    return "\n\n".join(
        [
            r.source(),
            f"One digits training step (the denominator): {step}.",
            md_table(t.header, t.rows, "llrrr"),
            r.line("Goal:").split(". ")[0] + ".",
        ]
    )


def prepare(results: Path) -> str:
    r = report("prepare", results)
    runs, goals = r.table("images"), r.table("measure", under="Goals")
    return "\n\n".join(
        [
            r.source(),
            md_table(runs.header, runs.rows, "lrrrrrrr"),
            md_table(goals.header, goals.rows, "lllll"),
        ]
    )


# --- README block from the CLI ------------------------------------------------------------------------
def cli_usage(results: Path) -> str:
    """Every `fdm` subcommand's usage line and help, as argparse prints them (fixed width)."""
    from pipelines.cli import _parser

    parser = _parser()
    what = helps(parser)
    lines = []
    for name, sub in subcommands(parser).items():
        sub.formatter_class = functools.partial(argparse.HelpFormatter, width=100)
        usage = sub.format_usage().rstrip().splitlines()
        lines += [line[len("usage: ") :] for line in usage]  # continuation lines keep their alignment
        lines += [f"    # {what[name]}"]
    return "```text\n" + "\n".join(lines) + "\n```"


def _subparsers_action(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands, in the order `fdm --help` lists them."""
    return dict(_subparsers_action(parser).choices)


def helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {a.dest: a.help or "" for a in _subparsers_action(parser)._choices_actions}


def config_example(results: Path) -> str:
    """The shipped toy2d config, whole, without its comment header."""
    text = (ROOT / "pipelines" / "configs" / "toy2d.yaml").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return f"```yaml\n{body.strip()}\n```"


BLOCKS: dict[str, Callable[[Path], str]] = {
    "results:make-run": make_run,
    "results:distillation": distillation,
    "results:picard": picard,
    "results:picard-cluster": picard_cluster,
    "results:fdm_training": fdm_training,
    "results:fdm_sampling": fdm_sampling,
    "results:pipeline": pipeline,
    "results:loader_throughput": loader_throughput,
    "results:prepare": prepare,
    "cli:usage": cli_usage,
    "config:example": config_example,
}


def render_readme(text: str, results: Path = RESULTS) -> str:
    """`text` with every generated block rendered afresh; an unknown or missing block is an error."""
    found = [m.group(1) for m in BLOCK.finditer(text)]
    unknown = [n for n in found if n not in BLOCKS]
    missing = [n for n in BLOCKS if n not in found]
    if unknown or missing:
        raise ReportError(f"README.md: unknown generated blocks {unknown}, missing blocks {missing}")
    return BLOCK.sub(
        lambda m: f"<!-- {m.group(1)}:begin -->\n{BLOCKS[m.group(1)](results)}\n<!-- {m.group(1)}:end -->",
        text,
    )


# --- docs/configuration.md from the pydantic models ---------------------------------------------------
def _strip(tp: Any) -> Any:
    """Annotated[X, ...] -> X."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    tp = _strip(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def type_name(tp: Any) -> str:
    """A field's type as a reader writes it: int, float | null, 'vp' | 'edm', list[int], SamplerSpec."""
    tp = _strip(tp)
    args = _union_args(tp)
    if args is not None:
        return " | ".join(type_name(a) for a in args)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) if not isinstance(a, str) else f"'{a}'" for a in typing.get_args(tp))
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _value(v: Any) -> str:
    if isinstance(v, BaseModel):
        v = v.model_dump(mode="json")
    elif isinstance(v, list):
        v = [x.model_dump(mode="json") if isinstance(x, BaseModel) else x for x in v]
    return json.dumps(v, ensure_ascii=False, default=str).replace('"', "'")


def _default(info: Any) -> tuple[bool, Any]:
    """(has a default, the default) of a pydantic FieldInfo."""
    if info.default is not PydanticUndefined:
        return True, info.default
    if info.default_factory is not None:
        try:
            return True, info.default_factory()
        except TypeError:  # a factory that takes the validated data
            return True, None
    return False, None


CONSTRAINTS = {
    "ge": ">=",
    "gt": ">",
    "le": "<=",
    "lt": "<",
    "min_length": "min length",
    "max_length": "max length",
}


def _constraints(info: Any) -> str:
    out = []
    for meta in info.metadata:
        for attr, word in CONSTRAINTS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{word} {value:g}" if isinstance(value, float) else f"{word} {value}")
    return ", ".join(out)


def _doc(cls: type) -> str:
    doc = cls.__doc__ or ""
    if cls.__doc__ == BaseModel.__doc__:
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sections(
    title: str, path: str, cls: type[BaseModel], defaults: BaseModel | None, out: list[str]
) -> None:
    """Append the section of model `cls` at `path`, then those of the models its fields hold."""
    out += [f"## {title}: {cls.__name__}", ""]
    if _doc(cls):
        out += [_doc(cls), ""]
    rows, nested = [], []
    for name, info in cls.model_fields.items():
        field_path = f"{path}.{name}" if path else name
        has, default = _default(info)
        if defaults is not None:
            has, default = True, getattr(defaults, name)
        ann = _strip(info.annotation)
        variants = [a for a in (_union_args(ann) or (ann,)) if _is_model(a)]
        list_of = [a for a in typing.get_args(ann) if _is_model(a)] if typing.get_origin(ann) is list else []
        if len(variants) == 1 and not list_of:
            shown = "see below" if isinstance(default, BaseModel) else _value(default) if has else "required"
            keep = default if isinstance(default, BaseModel) else None
            nested.append((f"`{field_path}`", field_path, variants[0], keep))
        elif len(variants) > 1:
            shown = _value(default) if has else "required"
            key = f"{_discriminator(info)}: " if _discriminator(info) else ""
            nested += [(f"`{field_path}` with `{key}{_kind(v)}`", field_path, v, None) for v in variants]
        else:
            shown = _value(default) if has else "required"
            nested += [(f"`{field_path}[]`", f"{field_path}[]", v, None) for v in list_of]
        rows.append(
            [
                f"`{name}`",
                _cell(f"`{type_name(info.annotation)}`"),
                _cell(shown if shown in ("required", "see below") else f"`{shown}`"),
                _cell(_constraints(info)),
                _cell(info.description or ""),
            ]
        )
    out += [md_table(["field", "type", "default", "constraints", "description"], rows, "lllll"), ""]
    for sub_title, sub_path, sub_cls, sub_defaults in nested:
        _sections(sub_title, sub_path, sub_cls, sub_defaults, out)


def _discriminator(info: Any) -> str:
    """The name of the field that picks a union's variant (e.g. `kind`), or ""."""
    found = info.discriminator or next(
        (getattr(m, "discriminator", None) for m in info.metadata if getattr(m, "discriminator", None)), None
    )
    return found if isinstance(found, str) else ""


def _kind(cls: type[BaseModel]) -> str:
    """A union variant's value of its discriminator field, e.g. 'digits' (else its class name)."""
    for info in cls.model_fields.values():
        if typing.get_origin(_strip(info.annotation)) is typing.Literal and isinstance(info.default, str):
            return info.default
    return cls.__name__


def render_configuration() -> str:
    """docs/configuration.md: every field of PipelineConfig and of the models it nests, walked recursively."""
    from pipelines.config import PipelineConfig

    out = [
        "<!-- Generated by `python -m benchmarks.readme` from pipelines/config.py and the stage configs it",
        "     nests (tasks/); do not edit by hand. tests/test_docs.py fails when it is stale. -->",
        "",
        "# Configuration reference",
        "",
        "Every field of a pipeline YAML file, section by section. Unknown keys are errors; every error",
        "names the field's path. Override any field on the command line with `--set PATH=VALUE` (the value",
        "is parsed as YAML). A field with no default is required; `null` means unset (the code picks, as",
        "described).",
        "",
    ]
    _sections("The top level", "", PipelineConfig, None, out)
    return "\n".join(out).rstrip() + "\n"


# --- check and write ----------------------------------------------------------------------------------
def _diff(old: str, new: str, name: str) -> str:
    lines = list(
        difflib.unified_diff(old.splitlines(), new.splitlines(), name, "fresh rendering", n=0, lineterm="")
    )
    return "\n".join(lines[:12])


def check(readme: Path = README, config_doc: Path = CONFIG_DOC, results: Path = RESULTS) -> list[str]:
    """Problems: each generated block or file that differs from a fresh rendering (empty: all fresh)."""
    problems = []
    text = readme.read_text()
    try:
        fresh = render_readme(text, results)
    except ReportError as err:
        return [str(err)]
    current = {m.group(1): m.group(2) for m in BLOCK.finditer(text)}
    for m in BLOCK.finditer(fresh):
        if current.get(m.group(1)) != m.group(2):
            diff = _diff(current.get(m.group(1), ""), m.group(2), m.group(1))
            problems.append(
                f"README.md: block {m.group(1)} differs from a fresh rendering "
                f"(run `python -m benchmarks.readme`):\n{diff}"
            )
    doc = config_doc.read_text() if config_doc.is_file() else ""
    fresh_doc = render_configuration()
    if doc != fresh_doc:
        problems.append(
            f"{config_doc.relative_to(ROOT)} differs from a fresh rendering of the config models "
            f"(run `python -m benchmarks.readme`):\n{_diff(doc, fresh_doc, config_doc.name)}"
        )
    return problems


def write(readme: Path = README, config_doc: Path = CONFIG_DOC, results: Path = RESULTS) -> None:
    readme.write_text(render_readme(readme.read_text(), results))
    config_doc.parent.mkdir(parents=True, exist_ok=True)
    config_doc.write_text(render_configuration())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.readme", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 if anything is stale")
    args = ap.parse_args(argv)
    if args.check:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    write()
    print(
        f"wrote {README.relative_to(ROOT)} ({len(BLOCKS)} generated blocks) "
        f"and {CONFIG_DOC.relative_to(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
