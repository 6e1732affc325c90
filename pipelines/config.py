"""The whole pipeline's configuration: pydantic models loaded from YAML with `--set a.b=c` overrides.

Every stage's section is the stage's own typed config (from tasks/); this module adds the pipeline-level
parts (distillation schedule, resources, store, tracking) and turns validation errors into messages that
name the field path and what was expected.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from infra.store import S3Settings
from tasks.stage import STRICT
from tasks.stages.distill_round import DistillConfig
from tasks.stages.evaluate import EvalConfig
from tasks.stages.picard_sample import PicardSampleConfig
from tasks.stages.prepare_data import DataConfig
from tasks.stages.train_base import ModelConfig, TrainConfig
from tasks.stages.train_classifier import ClassifierConfig


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


class DistillSchedule(BaseModel):
    """Progressive distillation: halve from `start_steps` down to `end_steps`, optionally gated on quality."""

    model_config = STRICT
    enabled: bool = Field(True, description="run the distillation rounds; false stops after the base model")
    start_steps: int = Field(
        64, ge=2, description="steps of the base model's DDIM sampler, the first teacher"
    )
    end_steps: int = Field(
        4, ge=1, description="steps of the last student; start_steps/end_steps is a power of 2"
    )
    quality_gate: float | None = Field(
        None,
        gt=0,
        description="stop halving at the first student whose metric is worse than this x the base model's "
        "(its first evaluation sampler); the last student within it is the final model",
    )
    round: DistillConfig = Field(default_factory=DistillConfig)
    rounds: dict[int, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-round settings: round index (1 = the first halving) -> some fields of `round`, "
        "applied on top of `round` for that round only, e.g. {3: {updates: 500}} or --set "
        "distill.rounds.3.updates=500; only those rounds (and what depends on them) get new keys",
    )

    @field_validator("rounds", mode="before")
    @classmethod
    def _round_numbers(cls, rounds: Any) -> Any:
        """Round numbers as ints: a `--set distill.rounds.3...` path gives them as text, which strict
        validation would refuse."""
        if not isinstance(rounds, dict):
            return rounds
        return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in rounds.items()}

    @model_validator(mode="after")
    def _per_round(self) -> DistillSchedule:
        known = set(DistillConfig.model_fields)
        count = len(self.student_steps)
        for k, changes in sorted(self.rounds.items()):
            unknown = sorted(set(changes) - known)
            if unknown:
                raise ValueError(
                    f"rounds.{k}.{unknown[0]}: unknown key; a round takes the fields of distill.round "
                    f"({', '.join(sorted(known))})"
                )
            if self.enabled and not 1 <= k <= count:
                raise ValueError(f"rounds.{k}: no such round; this schedule has rounds 1..{count}")
            try:
                settings = self.round_config(k)
            except ValidationError as err:
                e = err.errors()[0]
                msg = e["msg"].removeprefix("Value error, ")
                if not e["loc"]:  # a check across fields, whose message starts with the field it names
                    raise ValueError(f"rounds.{k}.{msg}") from None
                where = ".".join(str(p) for p in e["loc"])
                raise ValueError(f"rounds.{k}.{where}: {msg} (got {e.get('input')!r})") from None
            self.rounds[k] = {
                name: getattr(settings, name) for name in changes
            }  # as validated: "1e30" -> 1e30
        return self

    def round_config(self, k: int) -> DistillConfig:
        """The settings of round `k` (1-based): `round`, with `rounds[k]` applied on top."""
        return DistillConfig.model_validate({**self.round.model_dump(), **self.rounds.get(k, {})})

    @model_validator(mode="after")
    def _halvings(self) -> DistillSchedule:
        if self.end_steps > self.start_steps:
            raise ValueError(f"end_steps: must be <= start_steps ({self.start_steps}), got {self.end_steps}")
        ratio = self.start_steps / self.end_steps
        if ratio != 2 ** round(math.log2(ratio)):
            raise ValueError(
                f"end_steps: start_steps/end_steps must be a power of two "
                f"(got {self.start_steps}/{self.end_steps})"
            )
        return self

    @property
    def student_steps(self) -> list[int]:
        """Step counts of the students, one per round: start/2, start/4, ..., end."""
        if not self.enabled:
            return []
        out, n = [], self.start_steps
        while n > self.end_steps:
            n //= 2
            out.append(n)
        return out


class StageResources(BaseModel):
    """The Ray resources one stage of a kind asks for."""

    model_config = STRICT
    num_cpus: float = Field(1, gt=0, description="per stage; also the stage's torch threads")
    num_gpus: float = Field(0, ge=0, description="per stage; used only when the cluster has GPUs")


class Resources(BaseModel):
    """Ray resources per stage kind and retry policy."""

    model_config = STRICT
    prepare_data: StageResources = Field(default_factory=StageResources)
    train: StageResources = Field(default_factory=lambda: StageResources(num_cpus=2, num_gpus=1))
    evaluate: StageResources = Field(default_factory=lambda: StageResources(num_cpus=2, num_gpus=1))
    sample: StageResources = Field(
        default_factory=StageResources,
        description="the picard_sample stage's driver; its actors take picard.actor_cpus each",
    )
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
        return S3Settings(self.connect_timeout, self.read_timeout, self.retries)


class TrackingConfig(BaseModel):
    """MLflow: one parent run per pipeline run, one child run per stage."""

    model_config = STRICT
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI, e.g. http://HOST:5000")
    experiment: str = Field("fdm-pipeline", description="MLflow experiment name, created if missing")
    artifact_location: str | None = Field(None, description="for a new experiment; default next to the db")


class PipelineConfig(BaseModel):
    """A full pipeline: data -> base model -> distillation rounds, each evaluated."""

    model_config = STRICT
    name: str = Field("pipeline", description="the MLflow parent run's name")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    distill: DistillSchedule = Field(default_factory=DistillSchedule)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    picard: PicardSampleConfig = Field(
        default_factory=lambda: PicardSampleConfig(enabled=False),
        description="ParaDiGMS sampling on Ray actors, against sequential (off unless enabled)",
    )
    resources: Resources = Field(default_factory=Resources)
    store: StoreConfig = Field(default_factory=StoreConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


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
        return PipelineConfig.model_validate(raw)
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
