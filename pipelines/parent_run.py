"""The MLflow parent run of a pipeline run: opened with the config as params and config.yaml, closed with
summary.json, what ran against what was requested, the policies' conclusions (tasks/graph.py: `Policy`),
its description and the stage table on the console."""

from __future__ import annotations

import json
from typing import Any

import yaml
from rich.console import Console

from infra.secrets import scrub_tree
from infra.store import ArtifactStore
from infra.tracking import Tracking, run_link
from pipelines.config import PipelineConfig
from pipelines.progress import stage_table
from tasks.graph import PipelineRun
from tasks.headlines import format_headline, headline_value, lost
from tasks.registry import POLICIES


def open_parent(
    cfg: PipelineConfig, tracking: Tracking, console: Console, tags: dict[str, str] | None = None
) -> str:
    """A new MLflow parent run for `cfg` (its params, tags and config.yaml); prints its id and UI link."""
    run_id = tracking.start_parent(cfg.name, parent_params(cfg), {"pipeline": cfg.name, **(tags or {})})
    config = scrub_tree(cfg.model_dump(mode="json"))  # no credential reaches the record
    tracking.log_text(run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
    console.print(f"MLflow run id: [bold]{run_id}[/bold]  (tracking {tracking.tracking_uri})", soft_wrap=True)
    link = run_link(tracking.tracking_uri, tracking.experiment_id, run_id)
    console.print(f"MLflow UI: {link}", highlight=False, soft_wrap=True)
    return run_id


def finish(
    run: PipelineRun,
    cfg: PipelineConfig,
    command: str,
    tracking: Tracking,
    store: ArtifactStore,
    console: Console,
) -> None:
    """Close the parent run: summary.json (every stage, and each policy's record), the datasets the run
    made as its inputs, each policy's conclusion, the description; then print the stage table, the
    policies' lines, outputs that differ from an earlier computation, and the failures."""
    stages = {
        name: {
            "status": o.status,
            "key": o.spec.key,
            "seconds": o.seconds,
            "error": o.error,
            "metrics": o.result.metrics if o.result else {},
            "outputs": o.result.outputs if o.result else {},
            "spans": {
                k: o.result.info[k] for k in ("task_span", "compute_span") if o.result and k in o.result.info
            },
        }
        for name, o in run.outcomes.items()
    }
    conclusions = {p.name: p.conclude(run, cfg, tracking, store, command) for p in POLICIES}
    summary = {"stages": stages, **{name: c.record for name, c in conclusions.items()}}
    tracking.log_text(run.run_id, json.dumps(summary, indent=2, default=str), "summary.json")
    for o in run.outcomes.values():
        if o.spec.decl.output == "dataset" and o.result is not None and not o.result.info.get("skipped"):
            tracking.log_dataset(run.run_id, o.result.output_uri, o.spec.name, o.result.digest)
    tags = {"fdm.used_ray": str(run.used_ray).lower()}
    for c in conclusions.values():
        tags |= c.tags
    tags["mlflow.note.content"] = describe(run, cfg, command, [c.description for c in conclusions.values()])
    tracking.set_tags(run.run_id, tags)
    tracking.end(run.run_id, "FAILED" if run.failed else "FINISHED")
    console.print(stage_table(run))
    for c in conclusions.values():
        for line in c.lines:
            console.print(line, highlight=False, soft_wrap=True)
    for o in run.outcomes.values():
        info = o.result.info if o.result else {}
        if info.get("output_differs"):
            console.print(
                f"{o.spec.name}: the recomputed output differs from the previous version "
                f"{info['output_differs']} (a non-deterministic stage); both are kept, this run used "
                f"{info['output_version']}",
                highlight=False,
                soft_wrap=True,
            )
    for o in run.failed:
        console.print(f"[red]stage {o.spec.name} failed:[/red] {o.error}")


def describe(run: PipelineRun, cfg: PipelineConfig, command: str, parts: list[str]) -> str:
    """The parent run's description: what ran, the policies' parts, the methods that lost, and how to
    reproduce it."""
    status = [o.status for o in run.outcomes.values()]
    text = (
        f"Pipeline `{cfg.name}`: {len(status)} stages, {status.count('done')} computed, "
        f"{status.count('cached')} cached, {status.count('failed')} failed."
    )
    text += "".join(f"\n\n{part}" for part in parts if part)
    text += headlines_text(run)
    return text + f"\n\nReproduce: `{command}` at the commit in the `mlflow.source.git.commit` tag."


def parent_params(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as the parent's params, the resources named as the requests they are
    (`requested.resources.train.num_gpus`); `log_resolved` adds what the stages got (`resolved.*`)."""
    params = cfg.model_dump(mode="json")
    params["requested"] = {"resources": params.pop("resources")}
    return params


def log_resolved(
    tracking: Tracking, run_id: str, cfg: PipelineConfig, computed: bool, gpus: bool, address: str | None
) -> None:
    """Params that say what ran: the device the computed stages used, each resource group's CPUs and GPUs
    as given to its Ray tasks, and where Ray ran (nothing, when every stage came from the cache)."""
    groups = cfg.model_dump(mode="json")["resources"]
    resolved = {
        "device": ("cuda" if gpus else "cpu") if computed else "none",
        "ray": (address or "local") if computed else "not started: every stage cached",
        "resources": {
            group: {
                "num_cpus": req["num_cpus"] if computed else 0,
                "num_gpus": req["num_gpus"] if computed and gpus else 0,
            }
            for group, req in groups.items()
            if isinstance(req, dict) and {"num_cpus", "num_gpus"} <= set(req)
        },
    }
    tracking.log_params(run_id, {"resolved": resolved})


def headlines_text(run: PipelineRun) -> str:
    """One line per stage whose headline says its method lost (e.g. a speed-up below 1), else ''."""
    lines = []
    for o in run.outcomes.values():
        found = headline_value(o.spec.decl.headline, o.result)
        if found and lost(*found):
            lines.append(f"- `{o.spec.name}`: {format_headline(*found)}")
    return "\n\nWhere a method lost:\n" + "\n".join(lines) if lines else ""
