"""The pipeline's DAG as data: which stages run, how their named inputs connect, and each stage's
content-addressed key.

The nodes come from the declarations (a kind with `auto` adds its one node) and from the policies
(tasks/registry.py); each input is fed by the node answering to its name (or to the name the node binds it
to), as Dagster wires assets by their arguments' names. Nothing here knows a stage kind by name.

A stage's key hashes its config section, its inputs' keys, its declaration's `version`, and the source of
the project modules its function imports (found by reading import statements, not by importing), so
editing the evaluation re-runs the evaluations and nothing upstream (Dagster's code_version, Flyte's
cache_version). Planning reads declarations only: it imports neither torch nor Ray.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, PipelineBase
from tasks.graph import Node, StageSpec
from tasks.registry import POLICIES, STAGES
from tasks.stage import StageKind

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("fdm_core", "infra", "tasks", "benchmarks", "tests")


class StageError(RuntimeError):
    """A stage could not run as asked (e.g. a re-run whose upstream outputs are gone)."""


def _source(module: str) -> Path | None:
    """The file of a project module, or None for anything else (a package or an outside library)."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    return path if path.is_file() else None


# Import statements at the start of a line (function-level ones too); a parenthesised name list may span
# lines. Scanning text is ~10x faster than parsing every module, and a false match (an import written in a
# docstring) can only add a module to a stage's code, never leave one out.
_IMPORT = re.compile(
    r"^[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]+)|import[ \t]+([^\n#;]+))", re.M
)


def _imported(source: str) -> list[str]:
    """The modules a source file imports: `import a.b` gives a.b; `from a import b` gives a and a.b."""
    found = []
    for package, names, plain in _IMPORT.findall(source):
        listed = [n.split(" as ")[0].strip() for n in (names or plain).strip("()").split(",")]
        if package:
            found += [package, *(f"{package}.{n}" for n in listed if n)]
        else:
            found += [n for n in listed if n]
    return found


@cache
def module_closure(module: str) -> tuple[str, ...]:
    """`module` and every project module it imports, transitively (lazy imports inside functions too)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _source(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        todo += _imported(path.read_text())
    return tuple(sorted(seen))


@cache
def code_version(module: str) -> str:
    """Hash of the source of `module` and the project modules it imports: the code a stage runs."""
    h = hashlib.sha256()
    for name in module_closure(module):
        h.update(name.encode())
        h.update(_source(name).read_bytes())
    return h.hexdigest()[:12]


def stage_key(kind: StageKind, section: Any, input_keys: dict[str, str]) -> str:
    blob = json.dumps(
        {
            "kind": kind.name,
            "version": kind.version,
            "code": code_version(kind.module),
            "config": section,
            "inputs": input_keys,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def auto_nodes(cfg: PipelineBase) -> list[Node]:
    """One node per kind that declares `auto` and whose condition holds, named after the kind."""
    out = []
    for kind in STAGES.values():
        auto = kind.auto
        if auto is None:
            continue
        section = getattr(cfg, auto.section)
        if section is None if auto.when is None else not auto.when(cfg):
            continue
        out.append(
            Node(
                kind.name,
                kind.name,
                section.model_dump(mode="json"),
                section=auto.section,
                bind=auto.bind(section) if auto.bind else {},
                aliases=(auto.provides,) if auto.provides else (),
            )
        )
    return out


def _names(nodes: list[Node]) -> dict[str, Node]:
    """Every name a node answers to (its own and its aliases), refusing a name two nodes claim."""
    names: dict[str, Node] = {}
    for node in nodes:
        for name in (node.name, *node.aliases):
            if name in names and names[name] is not node:
                raise ConfigError(f"{node.name}: the name {name!r} is also {names[name].name}'s")
            names[name] = node
    return names


def _wire(node: Node, decl: StageKind, names: dict[str, Node]) -> dict[str, str]:
    """The upstream node feeding each input of `node`: the one answering to the bound name (by default the
    input's own); an optional input nothing answers to stays unfed."""
    unknown = sorted(set(node.bind) - set(decl.inputs))
    if unknown:
        raise ConfigError(
            f"{node.name}: binds {unknown[0]!r}, not an input of {decl.name} {dict(decl.inputs)}"
        )
    inputs = {}
    for name, artifact in decl.inputs.items():
        wanted = node.bind.get(name, name)
        producer = names.get(wanted)
        if producer is None:
            if artifact.endswith("?"):
                continue
            raise ConfigError(f"{node.name}: input {name!r} needs a stage answering to {wanted!r}; none does")
        made = STAGES[producer.kind].output
        if made != artifact.rstrip("?"):
            raise ConfigError(
                f"{node.name}: input {name!r} takes a {artifact.rstrip('?')}, {producer.name} makes a {made}"
            )
        inputs[name] = producer.name
    return inputs


def _in_dependency_order(nodes: list[Node], inputs: dict[str, dict[str, str]]) -> list[Node]:
    """`nodes` in an order where each comes after what it needs, otherwise in the order given."""
    by_name = {n.name: n for n in nodes}
    out: dict[str, Node] = {}
    visiting: set[str] = set()

    def visit(node: Node) -> None:
        if node.name in out:
            return
        if node.name in visiting:
            raise ConfigError(f"{node.name}: its inputs lead back to itself")
        visiting.add(node.name)
        for up in [*inputs[node.name].values(), *node.after]:
            if up not in by_name:
                raise ConfigError(f"{node.name}: waits for {up!r}, which is not a stage of this pipeline")
            visit(by_name[up])
        out[node.name] = node

    for node in nodes:
        visit(node)
    return list(out.values())


def plan(cfg: PipelineBase) -> list[StageSpec]:
    """The stages of `cfg` in topological order: the policies' nodes, then the kinds' own, each keyed from
    its declaration, its config and its inputs' keys."""
    nodes = [n for policy in POLICIES for n in policy.nodes(cfg)] + auto_nodes(cfg)
    names = _names(nodes)
    inputs = {n.name: _wire(n, STAGES[n.kind], names) for n in nodes}
    specs: dict[str, StageSpec] = {}
    for node in _in_dependency_order(nodes, inputs):
        decl = STAGES[node.kind]
        decl.config.model_validate(node.config)
        group = getattr(cfg.resources, decl.resources)
        keys = {name: specs[up].key for name, up in inputs[node.name].items()}
        specs[node.name] = StageSpec(
            node=node,
            decl=decl,
            key=stage_key(decl, node.config, keys),
            inputs=inputs[node.name],
            resources={"num_cpus": group.num_cpus, "num_gpus": group.num_gpus},
        )
    return list(specs.values())


def downstream_of(stages: list[StageSpec], name: str) -> list[str]:
    """`name` and every stage that (transitively) depends on it, in plan order."""
    out = {name}
    for s in stages:
        if any(u in out for u in s.upstream):
            out.add(s.name)
    return [s.name for s in stages if s.name in out]
