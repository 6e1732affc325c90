"""Every stage kind's declaration, by name, and the policies: what the planner, executor, tables and CLI read.

Each module of tasks/stages/ declares one kind as its `STAGE`; adding a stage kind is a module there and
the stage function it names, or a `register_stage()` call from anywhere (a plugin, a test). Torch-free:
only the declarations are imported, never the stage functions.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager

import tasks.stages
from tasks.distillation import POLICY as DISTILLATION
from tasks.graph import Policy
from tasks.stage import StageKind


def _declarations() -> dict[str, StageKind]:
    found: dict[str, StageKind] = {}
    for info in pkgutil.iter_modules(tasks.stages.__path__):
        _add(
            found, importlib.import_module(f"tasks.stages.{info.name}").STAGE, f"tasks/stages/{info.name}.py"
        )
    return found


def _add(found: dict[str, StageKind], kind: StageKind, where: str) -> None:
    if kind.name in found:
        raise ValueError(f"{where}: stage kind {kind.name!r} is declared twice")
    same_group = [k for k in found.values() if k.resources == kind.resources]
    if same_group and same_group[0].default_resources != kind.default_resources:
        raise ValueError(
            f"{where}: resources group {kind.resources!r} defaults to {same_group[0].default_resources} "
            f"for {same_group[0].name}, not {kind.default_resources}"
        )
    found[kind.name] = kind


STAGES: dict[str, StageKind] = _declarations()
POLICIES: list[Policy] = [DISTILLATION]


def register_stage(kind: StageKind) -> None:
    """Add a stage kind declared outside tasks/stages/ (the config model then includes its section)."""
    _add(STAGES, kind, kind.run)


@contextmanager
def registered(kind: StageKind) -> Iterator[StageKind]:
    """`kind` registered for the duration of a `with` block (a test's own stage kind)."""
    register_stage(kind)
    try:
        yield kind
    finally:
        del STAGES[kind.name]
