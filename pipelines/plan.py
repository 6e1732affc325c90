"""The pipeline's DAG as data: which stages run, their named inputs, and each stage's content-addressed key.

A stage's key hashes its config section, its inputs' keys, its declaration's `version`, and the source of
the project modules its function imports (found by reading import statements, not by importing), so
editing the evaluation re-runs the evaluations and nothing upstream (Dagster's code_version, Flyte's
cache_version). Planning reads declarations only: it imports neither torch nor Ray.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pipelines.config import PipelineConfig
from tasks.registry import STAGES
from tasks.stage import StageKind
from tasks.stages.evaluate import SamplerSpec

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("fdm_core", "infra", "tasks", "benchmarks")


class StageError(RuntimeError):
    """A stage could not run as asked (e.g. a re-run whose upstream outputs are gone)."""


def _source(module: str) -> Path | None:
    """The file of a project module, or None for anything else (a package or an outside library)."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    return path if path.is_file() else None


# Import statements at the start of a line (function-level ones too); a parenthesised name list may span
# lines. Scanning text is ~10x faster than parsing every module, and a false match (an import written in a
# docstring) can only add a module to a stage's code, never leave one out.
_IMPORT = re.compile(
    r"^[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]+)|import[ \t]+([^\n#;]+))", re.M
)


def _imported(source: str) -> list[str]:
    """The modules a source file imports: `import a.b` gives a.b; `from a import b` gives a and a.b."""
    found = []
    for package, names, plain in _IMPORT.findall(source):
        listed = [n.split(" as ")[0].strip() for n in (names or plain).strip("()").split(",")]
        if package:
            found += [package, *(f"{package}.{n}" for n in listed if n)]
        else:
            found += [n for n in listed if n]
    return found


@cache
def module_closure(module: str) -> tuple[str, ...]:
    """`module` and every project module it imports, transitively (lazy imports inside functions too)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _source(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        todo += _imported(path.read_text())
    return tuple(sorted(seen))


@cache
def code_version(module: str) -> str:
    """Hash of the source of `module` and the project modules it imports: the code a stage runs."""
    h = hashlib.sha256()
    for name in module_closure(module):
        h.update(name.encode())
        h.update(_source(name).read_bytes())
    return h.hexdigest()[:12]


def stage_key(kind: StageKind, section: Any, input_keys: dict[str, str]) -> str:
    blob = json.dumps(
        {
            "kind": kind.name,
            "version": kind.version,
            "code": code_version(kind.module),
            "config": section,
            "inputs": input_keys,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Gate:
    """Run the stage only if evaluation `student`'s quality is at most `factor` x evaluation `teacher`'s
    (lower is better), the teacher's with sampler `teacher_sampler` (a tag like heun18) if given, else
    its headline: the quality gate that stops halving. The pipeline's gates all judge against the base
    model's headline evaluation, so the allowed loss does not compound over rounds."""

    student: str
    teacher: str
    teacher_sampler: str | None
    factor: float


@dataclass
class StageSpec:
    """One node of the DAG: `name` is unique in the run and names its MLflow run, its `stage` tag and its
    table row, with step counts (e.g. distill_8to4, evaluate_4); `kind` names its declaration.

    `inputs` maps the declaration's input names to upstream stage names; `after` lists further stages it
    waits for (a gate's evaluations); `section` is where `config` sits in the pipeline config (its MLflow
    params carry that prefix, as the parent run's do)."""

    name: str
    kind: str
    key: str
    config: dict[str, Any]
    inputs: dict[str, str]
    section: str = ""
    after: list[str] = field(default_factory=list)
    round: int | None = None
    steps: int | None = None
    gate: Gate | None = None
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def decl(self) -> StageKind:
        return STAGES[self.kind]

    @property
    def upstream(self) -> list[str]:
        return list(dict.fromkeys([*self.inputs.values(), *self.after]))

    @property
    def out_root(self) -> str:
        """Where this key's outputs live: one immutable version directory per computation."""
        return f"stages/{self.kind}/{self.key}"


def base_samplers(cfg: PipelineConfig) -> list[SamplerSpec]:
    """The base model's evaluation samplers, plus the first teacher as round 1 distils it (its solver at
    `start_steps`), which the quality plot joins the students to."""
    samplers = list(cfg.evaluate.samplers)
    if cfg.distill.student_steps:
        first = first_teacher(cfg)
        if first not in samplers:
            samplers.append(first)
    return samplers


def first_teacher(cfg: PipelineConfig) -> SamplerSpec:
    """The base model's sampler that round 1 distils: its teacher solver at `distill.start_steps`."""
    return SamplerSpec(method=cfg.distill.round_config(1).teacher_solver, steps=cfg.distill.start_steps)


def distill_name(teacher_steps: int, steps: int) -> str:
    """A distillation round's stage name, by its step counts: distill_8to4."""
    return f"distill_{teacher_steps}to{steps}"


def evaluate_name(steps: int) -> str:
    """A student's evaluation stage name, by the student's sampling steps: evaluate_4."""
    return f"evaluate_{steps}"


def round_stages(stages: list[StageSpec], k: int) -> tuple[StageSpec | None, StageSpec | None]:
    """Round `k`'s distillation and evaluation stages (None where the plan has none)."""
    found = {s.kind: s for s in stages if s.round == k and s.kind in ("distill_round", "evaluate")}
    return found.get("distill_round"), found.get("evaluate")


def uses_classifier(cfg: PipelineConfig) -> bool:
    """Labelled image sources get an evaluation classifier; 2-D toy data is judged by sliced Wasserstein."""
    return cfg.data.source.kind != "toy2d"


class _Plan:
    """Adds stages in topological order, keying each from its declaration and its inputs' keys."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.stages: list[StageSpec] = []

    def add(
        self, name: str, kind: str, config: dict[str, Any], inputs: dict[str, StageSpec], **extra: Any
    ) -> StageSpec:
        decl = STAGES[kind]
        missing = set(decl.required_inputs()) - set(inputs)
        if missing or set(inputs) - set(decl.inputs):
            raise ValueError(f"{name}: inputs {sorted(inputs)} do not match {kind}'s {dict(decl.inputs)}")
        decl.config.model_validate(config)
        group = getattr(self.cfg.resources, decl.resources)
        spec = StageSpec(
            name=name,
            kind=kind,
            key=stage_key(decl, config, {n: s.key for n, s in inputs.items()}),
            config=config,
            inputs={n: s.name for n, s in inputs.items()},
            resources={"num_cpus": group.num_cpus, "num_gpus": group.num_gpus},
            **extra,
        )
        self.stages.append(spec)
        return spec


def plan(cfg: PipelineConfig) -> list[StageSpec]:
    """Stages in topological order."""
    d = cfg.model_dump(mode="json")
    p = _Plan(cfg)
    data = p.add("prepare_data", "prepare_data", d["data"], {}, section="data")
    judge = {}
    if uses_classifier(cfg):
        clf = p.add(
            "train_classifier", "train_classifier", d["classifier"], {"dataset": data}, section="classifier"
        )
        judge = {"classifier": clf}
    base = p.add("train_base", "train_base", {"model": d["model"], "train": d["train"]}, {"dataset": data})
    base_eval = {**d["evaluate"], "samplers": [s.model_dump() for s in base_samplers(cfg)]}
    ev = p.add(
        "evaluate_base",
        "evaluate",
        base_eval,
        {"model": base, "dataset": data, **judge},
        section="evaluate",
        round=0,
        steps=cfg.evaluate.samplers[0].steps,  # the headline sampler's: the one the table and plot show
    )
    # With a quality gate, round k+1 waits for the evaluations of round k's student and of the base model.
    teacher, teacher_steps, evals = base, cfg.distill.start_steps, [ev]
    for k, steps in enumerate(cfg.distill.student_steps, start=1):
        gate = None
        if cfg.distill.quality_gate is not None and k >= 2:
            gate = Gate(evals[-1].name, ev.name, None, cfg.distill.quality_gate)
        settings = cfg.distill.round_config(k).model_dump(mode="json")  # distill.round + distill.rounds[k]
        section = {**settings, "teacher_steps": teacher_steps, "round_index": k}
        dist = p.add(
            distill_name(teacher_steps, steps),
            "distill_round",
            section,
            {"teacher": teacher, "dataset": data},
            section="distill.round",
            after=list(dict.fromkeys([gate.student, gate.teacher])) if gate else [],
            round=k,
            steps=steps,
            gate=gate,
        )
        student_eval = {**d["evaluate"], "samplers": [{"method": "euler", "steps": steps}]}  # its own grid
        evals.append(
            p.add(
                evaluate_name(steps),
                "evaluate",
                student_eval,
                {"model": dist, "dataset": data, **judge},
                section="evaluate",
                round=k,
                steps=steps,
            )
        )
        teacher, teacher_steps = dist, steps
    if cfg.picard.enabled:
        model = base if cfg.picard.model == "base" else teacher
        p.add(
            "picard_sample",
            "picard_sample",
            d["picard"],
            {"model": model},
            section="picard",
        )
    return p.stages


def downstream_of(stages: list[StageSpec], name: str) -> list[str]:
    """`name` and every stage that (transitively) depends on it, in plan order."""
    out = {name}
    for s in stages:
        if any(u in out for u in s.upstream):
            out.add(s.name)
    return [s.name for s in stages if s.name in out]
