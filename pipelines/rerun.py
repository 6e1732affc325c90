"""Re-running one stage of a past pipeline run (and optionally its downstream) as a new pipeline run."""

from __future__ import annotations

from pathlib import Path

import yaml
from rich.console import Console

from infra.tracking import Tracking, provenance_tags
from pipelines import interrupt
from pipelines.config import PipelineConfig, parse_config
from pipelines.parent_run import open_parent
from pipelines.plan import downstream_of, plan
from pipelines.runner import REPO, execute
from tasks.graph import PipelineRun


def load_run_config(tracking_uri: str, run_id: str) -> tuple[PipelineConfig, Tracking]:
    """The config a past pipeline run was started with (its logged config.yaml)."""
    tracking = Tracking(tracking_uri, "")
    run = tracking.client.get_run(run_id)
    text = Path(tracking.client.download_artifacts(run_id, "config.yaml")).read_text()
    return parse_config(yaml.safe_load(text)), Tracking(tracking.tracking_uri, run.info.experiment_id)


def rerun_stage(
    tracking_uri: str,
    run_id: str,
    stage: str,
    downstream: bool = False,
    address: str | None = None,
    console: Console | None = None,
    overrides: list[str] | None = None,
    allow_local: bool = False,
) -> PipelineRun:
    """Re-run `stage` (and its downstream if asked) of a past run as a new pipeline run.

    The new MLflow parent run (in the same experiment) is tagged `fdm.rerun_of` = `run_id`; the past run's
    record is only read. The forced stages recompute from scratch into new versions of their outputs. The
    stages they need upstream are logged as cached child runs linking the outputs they reuse; those must be
    in the store, unless `overrides` (`--set`, applied to the past run's config) changed their key, which is
    then an ordinary cache miss."""
    console = console or Console()
    cfg, tracking = load_run_config(tracking_uri, run_id)
    original = {s.name: s.key for s in plan(cfg)}
    if overrides:
        cfg = parse_config(cfg.model_dump(mode="json"), overrides)
    stages = plan(cfg)
    names = [s.name for s in stages]
    if stage not in names:
        raise KeyError(f"--stage: {stage!r} is not a stage of run {run_id} (stages: {', '.join(names)})")
    targets = downstream_of(stages, stage) if downstream else [stage]
    needed = set(targets)
    for s in reversed(stages):
        if s.name in needed:
            needed.update(s.upstream)
    selected = [s for s in stages if s.name in needed]
    unchanged = {s.name for s in selected if original.get(s.name) == s.key}
    command = f"fdm rerun {run_id} --stage {stage}" + (" --downstream" if downstream else "")
    command += "".join(f" --set {o}" for o in overrides or [])
    tags = {"fdm.rerun_of": run_id, "fdm.rerun_stage": stage, "fdm.rerun_downstream": str(downstream).lower()}
    tags.update({**interrupt.driver_tags(), **provenance_tags(command, REPO)})
    if overrides:
        tags["fdm.rerun_set"] = " ".join(overrides)

    def open_run() -> tuple[Tracking, str]:
        new_id = open_parent(cfg, tracking, console, tags)
        what = f"{stage} and its downstream" if downstream else stage
        console.print(f"a re-run of {run_id} ({what}); that run's record is left as it was", highlight=False)
        return tracking, new_id

    return execute(
        cfg,
        selected,
        open_run,
        address,
        console,
        force=set(targets),
        cached_only=(needed - set(targets)) & unchanged,
        rerun=True,
        command=command,
        allow_local=allow_local,
    )
