"""What a stage's Ray task needs besides the stage itself: the store, the tracking server, the parent run,
the device policy and the live progress board."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from infra.store import ArtifactStore, open_store
from infra.tracking import Tracking


@dataclass(frozen=True)
class RunEnv:
    """Everything a worker needs besides the stage: store, tracking, parent run, device policy."""

    store_root: str
    endpoint_url: str | None
    tracking: Tracking
    parent_run_id: str
    use_gpu: bool = False
    board: Any = None
    rerun: bool = False
    lease_timeout: float = 120.0
    store_env: dict[str, str] = field(default_factory=dict)  # S3 timeouts and retries (S3Settings.env)

    def store(self) -> ArtifactStore:
        os.environ.update(self.store_env)  # before a store is opened: a Ray worker gets them here
        return open_store(self.store_root, self.endpoint_url)


def report(env: RunEnv, name: str, **fields: Any) -> None:
    """Tell the progress board (if any) how stage `name` is doing."""
    if env.board is not None:
        env.board.report.remote(name, **fields)
