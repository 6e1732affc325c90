"""Leases: a run claims a stage key before computing it, so two runs of one config never compute it twice.

A lease is a small JSON file (`stages/<kind>/<key>/_LEASE`) created atomically: with O_CREAT|O_EXCL on a
local store, with a conditional PUT (`If-None-Match: *`) on S3; whoever creates it computes the key. It
records the holder's host, pid, run and a heartbeat time that a thread refreshes every `timeout / 4`
seconds. Another run that finds it waits, polling the key's manifest, and serves the holder's output
once it is complete. A lease is stale, and is taken over, when its heartbeat is older than `timeout`, or
at once when its holder is a process of this host that no longer exists.

Taking over deletes the stale lease (after re-reading it unchanged) and claims it anew with the same
atomic create, so of several runs taking over one of them wins. A holder whose heartbeat stopped for
longer than `timeout` (a frozen machine) can find its lease taken; both then compute, into separate
immutable versions, and whichever switches CURRENT last wins: work is duplicated, lineage is not mixed
(each consumer's manifest records the digest of the version it read).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from infra.store import ArtifactStore, NotFoundError

T = TypeVar("T")
LEASE_NAME = "_LEASE"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The claim on one store path by this process; `owner` adds who holds it (run, stage) for readers."""

    def __init__(self, store: ArtifactStore, path: str, timeout: float, owner: dict[str, Any] | None = None):
        self.store, self.path, self.timeout = store, path, timeout
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), **(owner or {})}
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _doc(self) -> bytes:
        return json.dumps({**self.owner, "token": self.token, "heartbeat": time.time()}).encode()

    def acquire(self) -> bool:
        """Claim the path if no one holds it; the heartbeat starts."""
        if not self.store.create_exclusive(self.path, self._doc()):
            return False
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease {self.path}", daemon=True)
        self._beat.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.5, self.timeout / 4)):
            holder = self.holder()
            if holder is None or holder[1].get("token") != self.token:
                return  # released, or taken over after this process stalled past the timeout
            self.store.write_bytes(self.path, self._doc())

    def holder(self) -> tuple[bytes, dict[str, Any]] | None:
        """The lease file's bytes and content ({} while unreadable: being written), or None if free."""
        try:
            raw = self.store.read_bytes(self.path)
        except NotFoundError:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {}
        return raw, doc if isinstance(doc, dict) else {}

    def stale(self, doc: dict[str, Any], now: float | None = None) -> bool:
        """Whether a holder's lease may be taken over: its process is gone, or its heartbeat too old."""
        pid = doc.get("pid")
        if doc.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            return True
        beat = doc.get("heartbeat")
        return isinstance(beat, int | float) and (now or time.time()) - beat > self.timeout

    def break_stale(self, raw: bytes) -> None:
        """Delete the lease if it still holds exactly `raw` (the stale content just judged)."""
        current = self.holder()
        if current is not None and current[0] == raw:
            self.store.delete(self.path)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this process's."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        holder = self.holder()
        if holder is not None and holder[1].get("token") == self.token:
            self.store.delete(self.path)


def acquire_or_wait(
    lease: Lease,
    served: Callable[[], T | None],
    on_wait: Callable[[dict[str, Any]], None] = lambda holder: None,
    poll: float = 1.0,
) -> T | None:
    """Claim `lease` and return None (the caller computes, then releases), or return what `served` finds
    (another run's complete output) while waiting for the holder. A lease unreadable for longer than the
    timeout (its holder died while creating it) counts as stale."""
    unreadable_since: float | None = None
    while True:
        if lease.acquire():
            found = served()  # completed between the caller's cache check and this claim
            if found is not None:
                lease.release()
            return found
        found = served()
        if found is not None:
            return found
        holder = lease.holder()
        if holder is None:
            continue  # released just now: claim it
        raw, doc = holder
        if not doc:
            unreadable_since = unreadable_since or time.time()
            if time.time() - unreadable_since > lease.timeout:
                lease.break_stale(raw)
                continue
        elif lease.stale(doc):
            lease.break_stale(raw)
            continue
        on_wait(doc)
        time.sleep(poll)
