"""What every stage function receives and returns: a small context in, a small result out.

Large objects (datasets, checkpoints) never travel here; only URIs into the artifact store do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MetricLogger = Callable[[dict[str, float], int], None]


def _no_log(metrics: dict[str, float], step: int) -> None:
    """Default logger: stages run without tracking (tests, plain Python use)."""


@dataclass
class StageContext:
    """Where a stage writes and how it reports.

    `store_uri` is the artifact store root (local dir or s3://bucket/prefix); `out_prefix` is the stage's
    output directory inside it (`stages/<stage>/<key>`), complete only once its manifest is written.
    """

    store_uri: str
    out_prefix: str
    key: str = "adhoc"
    num_threads: int = 1
    device: str = "cpu"
    log_metrics: MetricLogger = _no_log
    endpoint_url: str | None = None
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    """A stage's small, picklable outcome: output URIs, headline metrics and identity."""

    stage: str
    key: str
    outputs: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    run_id: str | None = None
