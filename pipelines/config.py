"""The whole pipeline's configuration: pydantic models loaded from YAML with `--set a.b=c` overrides.

The sections come from the declarations: each stage kind the planner adds by itself contributes its
config's section, each policy its own (tasks/registry.py); this module adds the pipeline-level parts
(resources, one group per declared group; store; tracking) and turns validation errors into messages that
name the field path and what was expected.
"""

from __future__ import annotations

import re
from functools import cache, partial
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model

from infra.store import S3Settings
from tasks.registry import POLICIES, STAGES
from tasks.stage import STRICT, StageKind


class ConfigError(ValueError):
    """A bad configuration; the message names the field path."""


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads `1e-3` and `1e12` as floats (YAML 1.2; PyYAML's 1.1 rules make them
    strings, which the strict config models refuse)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class StageResources(BaseModel):
    """The Ray resources one stage of a kind asks for."""

    model_config = STRICT
    num_cpus: float = Field(1, gt=0, description="per stage; also the stage's torch threads")
    num_gpus: float = Field(0, ge=0, description="per stage; used only when the cluster has GPUs")


class ResourcesBase(BaseModel):
    """Retry and placement policy; `config_model` adds one `StageResources` group per declared group."""

    model_config = STRICT
    max_retries: int = Field(2, ge=0, description="Ray retries of a stage after a worker or node dies")
    placement_timeout: float = Field(
        60,
        gt=0,
        description="seconds a stage or a Picard placement group may wait for resources that exist but are "
        "in use; one the cluster can never hold fails at once (an autoscaling cluster that can add nodes "
        "for it waits)",
    )


class StoreConfig(BaseModel):
    """Where stage outputs live: `<root>/stages/<kind>/<key>/<version>/`, each with its _MANIFEST.json; how
    long S3 calls may wait; what a run checks before it starts."""

    model_config = STRICT
    root: str = Field("artifacts", description="local directory or s3://bucket/prefix")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (credentials: AWS chain)")
    connect_timeout: float = Field(10, gt=0, description="S3: seconds to connect before a retry")
    read_timeout: float = Field(30, gt=0, description="S3: seconds to wait for a response before a retry")
    retries: int = Field(
        2,
        ge=0,
        description="S3: retries of a failed call; a silent endpoint fails in ~(retries+1) x read_timeout",
    )
    min_free_mb: float = Field(
        100, ge=0, description="a local root must have this much free space before a run starts"
    )
    lease_timeout: float = Field(
        120, gt=0, description="seconds without a heartbeat before another run takes over a stage's lease"
    )

    def s3_settings(self) -> S3Settings:
        """How this run's stores reach S3, passed to every stage as a value."""
        return S3Settings(self.endpoint_url, self.connect_timeout, self.read_timeout, self.retries)


class TrackingConfig(BaseModel):
    """MLflow: one parent run per pipeline run, one child run per stage."""

    model_config = STRICT
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI, e.g. http://HOST:5000")
    experiment: str = Field("fdm-pipeline", description="MLflow experiment name, created if missing")
    artifact_location: str | None = Field(None, description="for a new experiment; default next to the db")


PIPELINE_DOC = "A full pipeline: data -> base model -> distillation rounds, each evaluated."


class PipelineBase(BaseModel):
    """A full pipeline; `config_model` adds the sections its stage kinds and policies declare."""

    model_config = STRICT
    name: str = Field("pipeline", description="the MLflow parent run's name")


def _resources_model() -> type[BaseModel]:
    groups: dict[str, list[StageKind]] = {}
    for kind in STAGES.values():
        groups.setdefault(kind.resources, []).append(kind)
    fields: dict[str, Any] = {}
    for group, kinds in groups.items():
        cpus, gpus = kinds[0].default_resources
        fields[group] = (
            StageResources,
            Field(
                default_factory=partial(StageResources, num_cpus=cpus, num_gpus=gpus),
                description=f"each {', '.join(k.name for k in kinds)} stage",
            ),
        )
    return create_model(
        "Resources",
        __base__=ResourcesBase,
        __doc__="Ray resources per stage kind and retry policy.",
        **fields,
    )


def _section(kind: StageKind) -> tuple[Any, Any]:
    auto = kind.auto
    about = auto.description or f"the {kind.name} stage's config"
    if auto.required:
        return kind.config, Field(description=about)
    if auto.default is not None:
        return kind.config, Field(default_factory=auto.default, description=about)
    return kind.config | None, Field(None, description=f"{about}; absent: no {kind.name} stage")


def config_model() -> type[PipelineBase]:
    """The pipeline config's model for the stage kinds and policies registered now: the sections of the
    kinds the planner adds by itself (the required ones first), the policies' sections, resources, store,
    tracking. Rebuilt only when the registry changes (a kind registered by a plugin or a test)."""
    return _config_model(tuple((name, id(kind)) for name, kind in STAGES.items()))


@cache
def _config_model(registry: tuple[tuple[str, int], ...]) -> type[PipelineBase]:
    """The model for `registry` (the registered kinds' names and identities, the cache key)."""
    autos = [k for k in STAGES.values() if k.auto]
    fields: dict[str, Any] = {k.auto.section: _section(k) for k in autos if k.auto.required}
    for policy in POLICIES:
        for section, (model, default) in policy.sections.items():
            fields[section] = (model, Field(default_factory=default))
    fields |= {k.auto.section: _section(k) for k in autos if not k.auto.required}
    resources = _resources_model()
    fields |= {
        "resources": (resources, Field(default_factory=resources)),
        "store": (StoreConfig, Field(default_factory=StoreConfig)),
        "tracking": (TrackingConfig, Field(default_factory=TrackingConfig)),
    }
    return create_model("PipelineConfig", __base__=PipelineBase, __doc__=PIPELINE_DOC, **fields)


PipelineConfig = config_model()


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides; values are parsed as YAML (numbers, booleans, lists, null)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. train.steps=500")
        key, _, text = item.partition("=")
        try:
            value = _yaml(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item}: not a YAML value ({' '.join(str(err).split())})") from None
        _set(raw, key.strip(), value)
    return raw


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(
            str(p) for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-after"))
        )
        msg = e["msg"].removeprefix("Value error, ")
        field, sep, rest = msg.partition(": ")
        named = all(part.isidentifier() or part.isdigit() for part in field.split("."))
        if sep and named:  # a validator naming its field
            path, msg = f"{path}.{field}" if path else field, rest
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        shown = "" if e["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{path or '<root>'}: {msg}{shown}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], overrides: list[str] | None = None) -> PipelineConfig:
    """Validate a config tree (after overrides); a ConfigError lists every bad field by path."""
    raw = apply_overrides(raw or {}, overrides or [])
    try:
        return config_model().model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read YAML from `path`, apply overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not a text file (byte {err.start} is not UTF-8); expected YAML") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot read ({err.strerror})") from None
    try:
        raw = _yaml(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return parse_config(raw, overrides)
