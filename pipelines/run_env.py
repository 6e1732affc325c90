"""What a stage's Ray task needs besides the stage itself: the store, the tracking server, the parent run,
the device policy and the live progress board."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infra.store import ArtifactStore, S3Settings, open_store
from infra.tracking import Tracking


@dataclass(frozen=True)
class RunEnv:
    """Everything a worker needs besides the stage: the store and how to reach it (`s3`), tracking, the
    parent run, the device policy, and how long a lease or a placement may wait."""

    store_root: str
    s3: S3Settings
    tracking: Tracking
    parent_run_id: str
    use_gpu: bool = False
    board: Any = None
    rerun: bool = False
    lease_timeout: float = 120.0
    placement_timeout: float = 60.0

    def store(self) -> ArtifactStore:
        return open_store(self.store_root, self.s3)


def report_progress(env: RunEnv, name: str, **fields: Any) -> None:
    """Tell the progress board (if any) how stage `name` is doing."""
    if env.board is not None:
        env.board.report.remote(name, **fields)
