"""`fdm stages RUN_ID`: the stage table of a past pipeline run, read from its MLflow child runs.

It imports neither torch nor Ray: the child runs' tags (stage, kind, key, headline metric, cached,
skipped) record everything the table shows.
"""

from __future__ import annotations

from rich.table import Table

from infra.tracking import Tracking


def past_stages(tracking_uri: str, run_id: str) -> Table:
    """The stage table of a past run, from its MLflow child runs."""
    client = Tracking(tracking_uri, "").client
    parent = client.get_run(run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        order_by=["start_time ASC"],
    )
    table = Table(title=f"pipeline run {run_id} ({parent.info.status})")
    for col in ("stage", "key", "status", "seconds", "headline", "child run"):
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
        head = tags.get("skip_reason", "")[:60] or (f"{key}={m[key]:.4g}" if key in m else "")
        table.add_row(
            tags.get("stage", c.info.run_name),
            tags.get("key", "")[:10],
            status,
            f"{secs:.1f}" if secs is not None else "",
            head,
            c.info.run_id,
        )
    return table
