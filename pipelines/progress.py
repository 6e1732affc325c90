"""What a pipeline run shows while it runs and when it ends: the stage table (live on a terminal), or one
plain line per stage transition in a log (a Ray Job's stdout), each with the stage's headline."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from tasks.graph import PipelineRun, StageSpec
from tasks.headlines import format_headline, headline_value
from tasks.stage import StageResult


def stage_headline(spec: StageSpec, result: StageResult | None, error: str | None = None) -> str:
    """The stage's headline metric (from its declaration), its skip reason, or its error."""
    if result is None:
        return error.splitlines()[0][:60] if error else ""
    if result.info.get("skipped"):
        return str(result.info["skipped"])
    found = headline_value(spec.decl.headline, result)
    return format_headline(*found) if found else ""


def stage_table(run: PipelineRun, board: dict[str, dict[str, Any]] | None = None) -> Table:
    table = Table(title=f"pipeline run {run.run_id}")
    for col in ("stage", "key", "status", "attempt", "node", "progress", "seconds", "headline"):
        table.add_column(col)
    for name, o in run.outcomes.items():
        live = (board or run.board).get(name, {})
        status = o.status if o.status != "pending" else live.get("state", "pending")
        progress = ""
        if live.get("total") and status == "running":
            progress = f"{live.get('step', 0)}/{live['total']}"
        secs = (
            o.seconds
            if o.seconds is not None
            else (time.time() - live["started"] if "started" in live else None)
        )
        table.add_row(
            name,
            o.spec.key[:10],
            status,
            str(live.get("attempt", "")),
            live.get("node", ""),
            progress,
            f"{secs:.1f}" if secs is not None else "",
            stage_headline(o.spec, o.result, o.error),
        )
    return table


class StageLines:
    """Progress for a log (stdout not a terminal, e.g. a Ray Job's): one plain line per stage transition,
    started and ended (done, cached, skipped, failed), printed as it happens."""

    def __init__(self, run: PipelineRun, console: Console) -> None:
        self.run, self.console, self.shown = run, console, {}

    def update(self, board: dict[str, dict[str, Any]] | None = None) -> None:
        for name, o in self.run.outcomes.items():
            running = (board or {}).get(name, {}).get("state") == "running"
            state = o.status if o.status != "pending" else "running" if running else "pending"
            if state == self.shown.get(name, "pending"):
                continue
            if state in ("done", "failed") and name not in self.shown:
                self._line(f"stage {name} started")  # it started and ended between two looks
            self.shown[name] = state
            if state == "running":
                self._line(f"stage {name} started")
            elif state == "done":
                secs = f" in {o.seconds:.1f} s" if o.seconds is not None else ""
                self._line(f"stage {name} done{secs}  {stage_headline(o.spec, o.result)}".rstrip())
            elif state == "failed":
                self._line(f"stage {name} failed: {stage_headline(o.spec, None, o.error)}")
            else:
                self._line(f"stage {name} {state}  {stage_headline(o.spec, o.result)}".rstrip())

    def _line(self, text: str) -> None:
        self.console.print(f"{time.strftime('%H:%M:%S')} {text}", highlight=False, soft_wrap=True)


class TableView:
    """Progress on a terminal: the stage table, redrawn live."""

    def __init__(self, run: PipelineRun, console: Console) -> None:
        self.run = run
        self.live = Live(stage_table(run), console=console, refresh_per_second=2)

    def __enter__(self) -> TableView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)

    def update(self, board: dict[str, dict[str, Any]]) -> None:
        self.live.update(stage_table(self.run, board))
