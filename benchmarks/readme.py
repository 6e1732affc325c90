"""The generated parts of the documentation, none of them parsed from Markdown:

- README.md's results table (the one generated README block, and the same table on docs/results.md): one
  headline per benchmark, read from the JSON beside its report (`<name>.summary.json`, which the benchmark
  writes; fdm_training's record `fdm_training.json`);
- docs/cli.md, from the `fdm` argparse parser;
- docs/configuration.md, from the pipeline's pydantic models.

    python -m benchmarks.readme           # rewrite them
    python -m benchmarks.readme --check   # exit 1, naming each stale part, if a fresh rendering differs

tests/test_docs.py runs the check. The benchmark reports themselves are never rewritten: the docs site
includes them as they are (docs/hooks.py).
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
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIG_DOC = DOCS / "configuration.md"
CLI_DOC = DOCS / "cli.md"
RESULTS_DOC = DOCS / "results.md"
BLOCK = re.compile(r"<!-- ([\w:-]+):begin -->\n(.*?)<!-- \1:end -->", re.DOTALL)
HEADLINES = "results:headlines"


class ReportError(ValueError):
    """A benchmark's summary is missing or lacks its headline; the message names the file."""


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A markdown table; `align` has one letter per column: l (left) or r (right; default after the first)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = [header, sep, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


# --- the results table from the benchmarks' JSON ------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        raise ReportError(f"{where}: missing (run `fdm bench {path.name.split('.')[0]}`)")
    return json.loads(path.read_text())


def _summary_headline(name: str, results: Path) -> str:
    """The headline the benchmark wrote beside its report, in `<name>.summary.json`."""
    doc = _read_json(results / f"{name}.summary.json")
    if not doc.get("headline"):
        raise ReportError(f"benchmarks/results/{name}.summary.json: no headline")
    return doc["headline"]


def _fdm_training_headline(name: str, results: Path) -> str:
    """Per process, the step ratio baseline ÷ FDM to the baseline's final FD, from the study's record."""
    found = _read_json(results / f"{name}.json").get("summary") or {}
    if "edm" not in found:
        raise ReportError(f"benchmarks/results/{name}.json: no summary for edm")
    parts = []
    for process, s in found.items():
        spread = f"{s['step_ratio_min']:.2f}–{s['step_ratio_max']:.2f}, {len(s['seeds'])} seeds"
        parts.append(f"{process.upper()} {s['step_ratio_mean']:.2f} ({spread})")
    slower = [p.upper() for p, s in found.items() if s["step_ratio_mean"] < 1]
    lost = f"; on {' and '.join(slower)} FDM is slower than the baseline" if slower else ""
    return (
        "steps the baseline needs ÷ steps FDM needs to reach the baseline's final FD: "
        + ", ".join(parts)
        + f" (paper: about 2){lost}"
    )


# (report name, what it measures, headline reader), in the order of the results table
BENCHMARKS: list[tuple[str, str, Callable[[str, Path], str]]] = [
    ("fdm_training", "FDM training speed", _fdm_training_headline),
    ("fdm_sampling", "FDM sampling steps", _summary_headline),
    ("distillation", "Progressive distillation", _summary_headline),
    ("picard", "ParaDiGMS (Picard) sampling", _summary_headline),
    ("pipeline", "Pipeline orchestration", _summary_headline),
    ("prepare", "Data preparation", _summary_headline),
    ("loader_throughput", "Data loading", _summary_headline),
]


def headlines(link: Callable[[str], str], results: Path = RESULTS) -> str:
    """The results table: one headline per benchmark, linking to its full report (`link(name)`)."""
    rows = [[what, read(name, results), f"[`{name}.md`]({link(name)})"] for name, what, read in BENCHMARKS]
    return md_table(["benchmark", "headline", "full report"], rows, "lll")


def readme_headlines(results: Path = RESULTS) -> str:
    return headlines(lambda name: f"benchmarks/results/{name}.md", results)


def docs_headlines(results: Path = RESULTS) -> str:
    return headlines(lambda name: f"reports/{name}.md", results)


def render_block(text: str, name: str, body: str, where: str) -> str:
    """`text` with its one generated block `name` replaced by `body`; a missing block is an error."""
    found = [m.group(1) for m in BLOCK.finditer(text)]
    if found != [name]:
        raise ReportError(f"{where}: expected exactly the generated block {name}, found {found}")
    return BLOCK.sub(lambda m: f"<!-- {name}:begin -->\n{body}\n<!-- {name}:end -->", text)


# --- docs/cli.md from the `fdm` parser -----------------------------------------------------------------
def cli_usage() -> str:
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


def render_cli() -> str:
    """docs/cli.md: the usage of every subcommand, then each one's full `--help`."""
    from pipelines.cli import _parser

    parser = _parser()
    out = [
        "<!-- Generated by `python -m benchmarks.readme` from the `fdm` parser (pipelines/cli.py); do not",
        "     edit by hand. tests/test_docs.py fails when it is stale. -->",
        "",
        "# CLI reference",
        "",
        "Every subcommand of `fdm`, as `fdm --help` and `fdm COMMAND --help` print them. Examples are in the",
        "[guides](guide-run.md); exit codes: 0 ok, 2 bad usage, config or input data, 1 a stage failed.",
        "",
        "## Summary",
        "",
        cli_usage(),
        "",
    ]
    for name, sub in subcommands(parser).items():
        sub.formatter_class = functools.partial(argparse.HelpFormatter, width=100)
        out += [f"## fdm {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


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


def rendered(results: Path = RESULTS) -> dict[Path, str]:
    """Every generated file as a fresh rendering would write it."""
    return {
        README: render_block(README.read_text(), HEADLINES, readme_headlines(results), "README.md"),
        RESULTS_DOC: render_block(
            RESULTS_DOC.read_text(), HEADLINES, docs_headlines(results), "docs/results.md"
        ),
        CLI_DOC: render_cli(),
        CONFIG_DOC: render_configuration(),
    }


def stale_parts(results: Path = RESULTS) -> list[str]:
    """Problems: each generated file that differs from a fresh rendering (empty: all fresh)."""
    try:
        fresh = rendered(results)
    except ReportError as err:
        return [str(err)]
    problems = []
    for path, text in fresh.items():
        current = path.read_text() if path.is_file() else ""
        if current != text:
            name = str(path.relative_to(ROOT))
            problems.append(
                f"{name} differs from a fresh rendering (run `python -m benchmarks.readme`):\n"
                + _diff(current, text, name)
            )
    return problems


def write(results: Path = RESULTS) -> list[Path]:
    fresh = rendered(results)
    for path, text in fresh.items():
        path.write_text(text)
    return list(fresh)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.readme", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 if anything is stale")
    args = ap.parse_args(argv)
    if args.check:
        problems = stale_parts()
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    print("wrote " + ", ".join(str(p.relative_to(ROOT)) for p in write()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
