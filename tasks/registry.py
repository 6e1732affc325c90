"""Every stage kind's declaration, by name: what the planner, executor, tables and CLI read.

Each module of tasks/stages/ declares one kind as its `STAGE`; adding a stage is a module there and the
stage function it names. Torch-free: only the declarations are imported, never the stage functions.
"""

from __future__ import annotations

import importlib
import pkgutil

import tasks.stages
from tasks.stage import StageKind


def _declarations() -> dict[str, StageKind]:
    found = {}
    for info in pkgutil.iter_modules(tasks.stages.__path__):
        kind = importlib.import_module(f"tasks.stages.{info.name}").STAGE
        if kind.name in found:
            raise ValueError(f"tasks/stages/{info.name}.py: stage kind {kind.name!r} is declared twice")
        found[kind.name] = kind
    return found


STAGES: dict[str, StageKind] = _declarations()
