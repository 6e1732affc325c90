"""Ending a run cleanly on SIGINT (Ctrl-C) or SIGTERM, and recognising runs whose driver is gone.

While a run is driven, both signals raise `Interrupted` in the main thread (a KeyboardInterrupt, so no
`except Exception` swallows it); the driver then cancels its Ray tasks, marks the MLflow parent and its
running children KILLED, and the CLI prints one line and exits 128 + the signal (130, 143). A second
signal during that clean-up exits at once. The parent run records its driver's host, pid and start time as
tags, so a later run can tell a RUNNING run whose driver is gone (killed with SIGKILL, machine rebooted)
and mark it FAILED.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from types import FrameType
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from infra.tracking import Tracking
    from tasks.graph import PipelineRun

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; `finished` lists the stages complete by then."""

    def __init__(self, signum: int, finished: list[str] | None = None, total: int = 0) -> None:
        super().__init__(signum)
        self.signum, self.finished, self.total = signum, finished or [], total

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


_received: list[int] = []


def _raise(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    for s in SIGNALS:  # a second signal while cleaning up: leave now
        signal.signal(s, lambda n, f: os._exit(128 + n))
    raise Interrupted(signum)


def as_interrupted(err: KeyboardInterrupt) -> Interrupted:
    """`err` as Interrupted: Ray's C++ waits turn the handler's exception into a bare KeyboardInterrupt,
    so the signal is taken from what the handler received (SIGINT when it saw none: a plain Ctrl-C)."""
    if isinstance(err, Interrupted):
        return err
    return Interrupted(_received[-1] if _received else signal.SIGINT)


def arm() -> None:
    """(Re-)install the handlers: ray.init installs its own SIGTERM handler, so this follows it."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _raise)


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted while the body runs (main thread only); handlers restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    if saved[signal.SIGTERM] is not _raise:
        _received.clear()
    arm()
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def driver_tags() -> dict[str, str]:
    """Tags that identify this driver process: host, pid, and its start time (pids are reused), an ISO
    8601 UTC time as people read it."""
    started = datetime.fromtimestamp(_started(os.getpid()) or time.time(), timezone.utc)
    return {
        "fdm.driver_host": socket.gethostname(),
        "fdm.driver_pid": str(os.getpid()),
        "fdm.driver_started": started.isoformat(timespec="seconds"),
    }


def _started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def driver_alive(pid: int, started: float) -> bool:
    """Whether the process `pid` of this host still exists and is the one that started at `started`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now_started = _started(pid)
    return now_started is None or not started or abs(now_started - started) < 2


def cancel_run(
    run: PipelineRun | None, tracking: Tracking | None, refs: dict[str, Any], stop: Interrupted, total: int
) -> None:
    """Cancel the run's Ray tasks and mark the parent run and its running children KILLED (`stop` learns
    which stages had finished)."""
    if refs:
        import ray

        for ref in refs.values():
            with contextlib.suppress(Exception):  # finished, or Ray already going down
                ray.cancel(ref, force=True)
    stop.total = total
    if run is None or tracking is None:
        return
    stop.finished = [n for n, o in run.outcomes.items() if o.status in ("done", "cached", "skipped")]
    tracking.close_stale(
        run.run_id, status="KILLED", reason=f"the pipeline run was interrupted ({stop.signal_name})"
    )
    tracking.set_tags(run.run_id, {"fdm.interrupted": stop.signal_name})
    tracking.end(run.run_id, "KILLED")
