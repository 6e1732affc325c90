"""The pipeline graph's vocabulary, shared by the engine (pipelines/) and the policies that expand a config
into stages (tasks/distillation/): a `Node` asks for a stage, the planner wires nodes by their input names
into `StageSpec`s, and a `Policy` reads the run's outcomes back to conclude it (docs/design.md: the engine).

Torch-free: planning and the cache check import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tasks.stage import StageKind, StageResult

if TYPE_CHECKING:
    from infra.store import ArtifactStore
    from infra.tracking import Tracking


class Condition(Protocol):
    """What the results of the nodes a stage waits for must satisfy for it to run (e.g. a quality gate)."""

    def failure(self, results: Mapping[str, StageResult]) -> str | None:
        """Why the stage must not run (None: it runs); `results` holds every node it waits for, by name."""


@dataclass(frozen=True)
class Node:
    """One stage a pipeline asks for, before planning.

    `name` is unique in the run: it names the stage's MLflow run, its `stage` tag, its table row and its
    `--stage`. `kind` names its declaration; `config` is its config, found at `section` in the pipeline
    config (its MLflow params carry that prefix). Each input of the declaration is fed by the node that
    answers to `bind[input]`, by default to the input's own name; a node answers to its name and to its
    `aliases`. `after` lists further nodes it waits for, whose results `condition` judges. `round` and
    `steps` label it in tags, tables and plots; `model_name` and `model_note` name and describe the MLflow
    model logged from its output ('' : the node's name, no description)."""

    name: str
    kind: str
    config: dict[str, Any]
    section: str = ""
    bind: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    condition: Condition | None = None
    round: int | None = None
    steps: int | None = None
    model_name: str = ""
    model_note: str = ""


@dataclass
class StageSpec:
    """A planned node: its declaration, its content-addressed `key`, and `inputs` mapping the declaration's
    input names to the upstream stages that feed them. It travels to the Ray worker whole, declaration
    included, so a worker computes kinds its own registry does not hold (one registered by a test)."""

    node: Node
    decl: StageKind
    key: str
    inputs: dict[str, str]
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def kind(self) -> str:
        return self.node.kind

    @property
    def config(self) -> dict[str, Any]:
        return self.node.config

    @property
    def section(self) -> str:
        return self.node.section

    @property
    def after(self) -> tuple[str, ...]:
        return self.node.after

    @property
    def round(self) -> int | None:
        return self.node.round

    @property
    def steps(self) -> int | None:
        return self.node.steps

    @property
    def upstream(self) -> list[str]:
        return list(dict.fromkeys([*self.inputs.values(), *self.after]))

    @property
    def out_root(self) -> str:
        """Where this key's outputs live: one immutable version directory per computation."""
        return f"stages/{self.kind}/{self.key}"


@dataclass
class StageOutcome:
    """How a planned stage ended in a run: its status, result (or error) and seconds."""

    spec: StageSpec
    status: str = "pending"
    result: StageResult | None = None
    error: str | None = None
    seconds: float | None = None
    cause: BaseException | None = None


@dataclass
class PipelineRun:
    """One pipeline run: its MLflow parent run id and each stage's outcome, in plan order."""

    run_id: str
    outcomes: dict[str, StageOutcome] = field(default_factory=dict)
    wall_seconds: float = 0.0
    used_ray: bool = False
    board: dict[str, dict[str, Any]] = field(default_factory=dict)  # the last progress board seen

    @property
    def failed(self) -> list[StageOutcome]:
        return [o for o in self.outcomes.values() if o.status == "failed"]


@dataclass
class Conclusion:
    """What a policy concluded from a finished run, for the parent run and the console: `record` goes into
    summary.json under the policy's name, `tags` onto the parent run, `description` into its MLflow
    description, `lines` to the console after the stage table."""

    record: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    lines: list[str] = field(default_factory=list)


class Policy(Protocol):
    """A workflow built from stage kinds, which the engine runs without knowing it: it owns some config
    sections, expands a config into nodes, and concludes a finished run (chooses, registers and reports
    what the run delivered). Its nodes' `condition`s hook it into the run itself."""

    name: str
    sections: Mapping[str, tuple[type, Any]]  # config section -> (its model, its default factory)

    def nodes(self, cfg: Any) -> list[Node]:
        """The nodes this policy adds for pipeline config `cfg`."""

    def conclude(
        self, run: PipelineRun, cfg: Any, tracking: Tracking, store: ArtifactStore, command: str
    ) -> Conclusion:
        """Read the finished `run` and record what it delivered on its parent run (metrics, plots, models)."""
