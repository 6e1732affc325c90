"""A stage's MLflow child run: its tags, params and inputs, the cached or skipped record, the model logged
from its output, and the links that tie its metrics to the model and dataset they measure."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from infra.manifest import MANIFEST_NAME
from infra.store import ArtifactStore
from infra.tracking import Tracking
from pipelines.run_env import RunEnv
from tasks.graph import StageSpec
from tasks.stage import StageResult

# The project's packages, shipped with every logged MLflow model so it loads and serves on its own.
CODE_PATHS = [str(Path(__file__).resolve().parent.parent / p) for p in ("fdm_core", "infra", "tasks")]


def stage_tags(spec: StageSpec, env: RunEnv, state: str) -> dict[str, str]:
    """The tags of a stage's child run, from its spec and declaration."""
    tags = {
        "stage": spec.name,
        "kind": spec.kind,
        "key": spec.key,
        "version": spec.decl.version,
        "headline": spec.decl.headline,
        "round": spec.round,
        "steps": spec.steps,
        "rerun": env.rerun or None,
        "cached": str(state == "cached").lower(),
        "skipped": "true" if state == "skipped" else None,
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


def node_tags() -> dict[str, str]:
    """The Ray node this process runs on (`fdm.node_id`, `fdm.node_ip`); empty outside Ray."""
    ray = sys.modules.get("ray")  # imported by every Ray worker; never imported here just to ask
    if ray is None or not ray.is_initialized():
        return {}
    return {
        "fdm.node_id": ray.get_runtime_context().get_node_id(),
        "fdm.node_ip": ray.util.get_node_ip_address(),
    }


def log_inputs(env: RunEnv, run_id: str, spec: StageSpec, ups: dict[str, StageResult]) -> None:
    """What a stage consumed, on its run: every input as tags (`fdm.input.<name>`: the output's digest and
    URI); the dataset as an MLflow dataset input; a model input as an MLflow model input when that model
    was logged by this pipeline run (a cached teacher's model is known by its tags only)."""
    tags = {}
    for name, stage in spec.inputs.items():
        up = ups[stage]
        tags |= {f"fdm.input.{name}": up.digest[:16], f"fdm.input.{name}.uri": up.output_uri}
    env.tracking.set_tags(run_id, tags)
    if "dataset" in spec.inputs:
        data = ups[spec.inputs["dataset"]]
        env.tracking.log_dataset(run_id, data.output_uri, spec.inputs["dataset"], data.digest)
    models = [
        ups[stage].info["model_uri"] for stage in spec.inputs.values() if "model_uri" in ups[stage].info
    ]
    if models:
        env.tracking.log_model_inputs(run_id, [uri.removeprefix("models:/") for uri in models])


def params(spec: StageSpec) -> dict[str, Any]:
    """A stage's config as MLflow params, under its path in the pipeline config (as the parent logs it)."""
    return {spec.section: spec.config} if spec.section else spec.config


def record_resolved(
    env: RunEnv, spec: StageSpec, result: StageResult, ups: dict[str, StageResult]
) -> StageResult:
    """Log a stage that did not compute (served from the cache, or skipped) as a finished child run."""
    state = "skipped" if result.info.get("skipped") else "cached"
    tags = stage_tags(spec, env, state)
    if state == "skipped":
        tags["skip_reason"] = result.info["skipped"]
        result.run_id = env.tracking.record_child(env.parent_run_id, spec.name, tags)
    else:  # the output it reuses, linked: which key's which version
        tags.update(output_uri=result.output_uri, **result.info.get("tags", {}))
        tags["output_version"] = result.info.get("output_version", "")
        result.run_id = env.tracking.record_child(
            env.parent_run_id, spec.name, tags, params(spec), result.metrics
        )
    return result


def log_model(env: RunEnv, run_id: str, store: ArtifactStore, prefix: str, spec: StageSpec) -> str:
    """The stage's model artifact as an MLflow pyfunc model on its run (weights, model.json, a sampler),
    named and described as its node says (by default: the stage's name); its files sit at fixed paths in
    the model (`artifacts/weights/...`)."""
    from infra.mlflow_models import log_sampler_model
    from tasks.sample import sample_rows

    made = f"stage `{spec.name}` of pipeline run {env.parent_run_id}"
    note = spec.node.model_note.replace("{made}", made) or f"Made by {made}."
    with tempfile.TemporaryDirectory(prefix="fdm-mlflow-model-") as tmp:
        files = Path(tmp, "weights")
        store.download_dir(prefix, str(files))
        tags = {
            "fdm.stage": spec.name,
            "fdm.key": spec.key,
            "fdm.steps": str(spec.steps or ""),
            "fdm.pipeline_run": env.parent_run_id,
            "mlflow.source.name": f"fdm stage {spec.name}",  # "Logged from" in the UI
            "mlflow.note.content": note,  # the model's description
        }
        return log_sampler_model(
            env.tracking,
            run_id,
            str(files),
            sample_rows,
            CODE_PATHS,
            tags,
            name=spec.node.model_name or spec.name,
        )


def metric_links(env: RunEnv, spec: StageSpec, ups: dict[str, StageResult]) -> dict[str, Any]:
    """What a stage's metrics are linked to in MLflow: the logged model it measures (its `model` input) and
    the dataset it measured it on (its `dataset` input); empty for a stage that measures no model."""
    if "model" not in spec.inputs:
        return {}
    up = ups[spec.inputs["model"]]
    uri = up.info.get("model_uri")
    if uri is None:  # a cached model: the one its computation logged, if this experiment has it
        from infra.mlflow_models import logged_model_uri

        uri = logged_model_uri(env.tracking, up.key)
    if uri is None:
        return {}
    links: dict[str, Any] = {"model_id": uri.removeprefix("models:/")}
    if "dataset" in spec.inputs:
        data = ups[spec.inputs["dataset"]]
        links["dataset"] = (spec.inputs["dataset"], data.digest[:36])
    return links


def log_outputs(tracking: Tracking, run_id: str, store: ArtifactStore, prefix: str) -> None:
    """Small outputs (grids, metrics, model spec, dataset card) go to MLflow, the manifest not; weights stay
    in the store, linked by a tag."""
    for path in store.list(prefix):
        name = path.rsplit("/", 1)[-1]
        if path.endswith((".png", ".json")) and name != MANIFEST_NAME:
            tracking.log_bytes(run_id, store.read_bytes(path), name)
