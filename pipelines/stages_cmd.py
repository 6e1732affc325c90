"""`fdm stages RUN_ID`: the stage table of a past pipeline run, read from its MLflow child runs.

It imports neither torch nor Ray: the child runs' tags (stage, kind, key, headline metric, cached,
skipped, attempt, node) record everything the table shows; a retried stage has a row per attempt, the
failed ones with the reason they ended (`fdm.end_reason`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from infra.tracking import Tracking, existing_store
from tasks.headlines import format_headline

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient


def pipeline_run(client: MlflowClient, run_id: str, uri: str) -> Run:
    """The pipeline (parent) run `run_id`; LookupError, in one line, for an unknown id or a stage's run."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise LookupError(f"run {run_id}: no such run in {uri}") from None
    parent = run.data.tags.get("mlflow.parentRunId")
    if parent:
        stage = run.data.tags.get("stage", run.info.run_name)
        raise LookupError(f"run {run_id} is stage {stage} of pipeline run {parent}: give that id")
    return run


def node(tags: dict[str, str]) -> str:
    """Where a stage's attempt ran: its Ray node id (short) and IP, from the child run's tags."""
    if "fdm.node_id" not in tags:
        return ""
    return f"{tags['fdm.node_id'][:8]} {tags.get('fdm.node_ip', '')}".strip()


def past_stages(tracking_uri: str, run_id: str) -> Table:
    """The stage table of a past run, from its MLflow child runs."""
    uri = existing_store(tracking_uri)
    client = Tracking(uri, "").client
    parent = pipeline_run(client, run_id, uri)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        order_by=["start_time ASC"],
    )
    table = Table(title=f"pipeline run {run_id} ({parent.info.status})")
    for col in ("stage", "key", "status", "attempt", "node", "seconds", "headline", "child run"):
        table.add_column(col)
    for c in children:
        tags = c.data.tags
        status = (
            "skipped"
            if tags.get("skipped") == "true"
            else "cached"
            if tags.get("cached") == "true"
            else c.info.status.lower()
        )
        if tags.get("rerun") == "True":
            status += " (rerun)"
        secs = (c.info.end_time - c.info.start_time) / 1000 if c.info.end_time else None
        m, key = c.data.metrics, tags.get("headline", "")
        head = tags.get("skip_reason", "")[:60] or (format_headline(key, m[key]) if key in m else "")
        if c.info.status in ("FAILED", "KILLED") and "fdm.end_reason" in tags:
            head = tags["fdm.end_reason"][:80]
        table.add_row(
            tags.get("stage", c.info.run_name),
            tags.get("key", "")[:10],
            status,
            tags.get("fdm.attempt", ""),
            node(tags),
            f"{secs:.1f}" if secs is not None else "",
            head,
            c.info.run_id,
        )
    return table
