"""The pipeline's DAG as data: which stages run, what each depends on, and its content-addressed key.

A stage's key is a hash of its config section, its upstream keys and the code version, so changing only the
distillation settings keeps the data and base-model keys (and their cached outputs) unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pipelines.config import PipelineConfig
from tasks.evaluate import SamplerSpec

CODE_DIRS = ("fdm_core", "infra", "tasks")


@cache
def code_version() -> str:
    """Hash of the source the stages run (fdm_core, infra, tasks): a code change invalidates the cache."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for d in CODE_DIRS:
        for path in sorted((root / d).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def stage_key(kind: str, section: Any, upstream_keys: list[str]) -> str:
    blob = json.dumps(
        {"kind": kind, "config": section, "upstream": upstream_keys, "code": code_version()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageSpec:
    """One node of the DAG: `name` is unique in the run (e.g. distill_2), `kind` the task it runs."""

    name: str
    kind: str
    key: str
    config: dict[str, Any]
    upstream: list[str]
    round: int | None = None
    steps: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def out_prefix(self) -> str:
        return f"stages/{self.kind}/{self.key}"


def base_samplers(cfg: PipelineConfig) -> list[SamplerSpec]:
    """The base model's evaluation samplers, plus DDIM at the first teacher's steps (the gate's reference)."""
    samplers = list(cfg.evaluate.samplers)
    if cfg.distill.student_steps:
        ddim = SamplerSpec(method="euler", steps=cfg.distill.start_steps)
        if ddim not in samplers:
            samplers.append(ddim)
    return samplers


def uses_classifier(cfg: PipelineConfig) -> bool:
    """Labelled image sources get an evaluation classifier; 2-D toy data is judged by sliced Wasserstein."""
    return cfg.data.source.kind != "toy2d"


def plan(cfg: PipelineConfig) -> list[StageSpec]:
    """Stages in topological order."""
    d = cfg.model_dump(mode="json")
    stages: list[StageSpec] = []
    prep = StageSpec("prepare_data", "prepare_data", stage_key("prepare_data", d["data"], []), d["data"], [])
    stages.append(prep)
    clf = None
    if uses_classifier(cfg):
        clf = StageSpec(
            "train_classifier",
            "train_classifier",
            stage_key("train_classifier", d["classifier"], [prep.key]),
            d["classifier"],
            [prep.name],
        )
        stages.append(clf)
    base_cfg = {"model": d["model"], "train": d["train"]}
    base = StageSpec(
        "train_base", "train_base", stage_key("train_base", base_cfg, [prep.key]), base_cfg, [prep.name]
    )
    stages.append(base)
    eval_cfg = {**d["evaluate"], "samplers": [s.model_dump() for s in base_samplers(cfg)]}
    eval_up = [base] + ([clf] if clf else [])
    ev = StageSpec(
        "evaluate_base",
        "evaluate",
        stage_key("evaluate", eval_cfg, [s.key for s in eval_up]),
        eval_cfg,
        [s.name for s in eval_up],
        round=0,
        steps=cfg.distill.start_steps,
    )
    stages.append(ev)
    # With a quality gate, round k+1 waits for the evaluations of round k's student and of its teacher.
    teacher, teacher_steps, evals = base, cfg.distill.start_steps, [ev]
    for k, steps in enumerate(cfg.distill.student_steps, start=1):
        round_cfg = {**d["distill"]["round"], "teacher_steps": teacher_steps}
        upstream = [teacher, prep]
        if cfg.distill.quality_gate is not None and k >= 2:
            upstream += [evals[-1], evals[-2]]
        key = stage_key("distill_round", round_cfg, [teacher.key, prep.key])
        dist = StageSpec(
            f"distill_{k}", "distill_round", key, round_cfg, [s.name for s in upstream], round=k, steps=steps
        )
        stages.append(dist)
        up = [dist] + ([clf] if clf else [])
        ev_k = StageSpec(
            f"evaluate_{k}",
            "evaluate",
            stage_key("evaluate", d["evaluate"], [s.key for s in up]),
            d["evaluate"],
            [s.name for s in up],
            round=k,
            steps=steps,
        )
        stages.append(ev_k)
        teacher, teacher_steps = dist, steps
        evals.append(ev_k)
    return stages


def downstream_of(stages: list[StageSpec], name: str) -> list[str]:
    """`name` and every stage that (transitively) depends on it, in plan order."""
    out = {name}
    for s in stages:
        if any(u in out for u in s.upstream):
            out.add(s.name)
    return [s.name for s in stages if s.name in out]
