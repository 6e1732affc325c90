"""Joining a running Ray cluster, checked first: a TCP connect to its GCS port and one authenticated GCS
call, in well under a second, so a dead address or a missing token fails with one clear line instead of
Ray's minutes of retries and warnings. Ray is imported only when a probe runs (the CLI imports this module
for its error type).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator

PROBE_SECONDS = 5.0
AUTH_HINT = (
    "the cluster uses token authentication: set RAY_AUTH_MODE=token and give its token, as RAY_AUTH_TOKEN or "
    "in the file ~/.ray/auth_token (or the file RAY_AUTH_TOKEN_PATH names; `ray get-auth-token` on the head "
    "prints it)"
)


class ClusterError(ConnectionError):
    """The Ray cluster to join cannot be reached or refuses this client; the message says which and why."""


def cluster_address(address: str | None) -> str | None:
    """The cluster to join, by Ray's own rule: RAY_ADDRESS when `address` is None or "auto", else
    `address`; None (or "local") means start one here. "auto" is left only when RAY_ADDRESS is unset (the
    cluster is then found through the `ray_current_cluster` file in Ray's temp directory)."""
    if address in (None, "auto"):
        address = os.environ.get("RAY_ADDRESS") or address
    return None if address in (None, "", "local") else address


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (Ray's C++ client logs each failed attempt there) for a probe."""
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def probe_cluster(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Raise ClusterError unless the Ray cluster at `address` (host:port of its GCS, "auto", or a
    ray://host:port client address) accepts a TCP connection within `timeout` seconds and, for a GCS,
    this client's authentication.

    Token authentication is turned on in this process only for "auto" (a local cluster found through Ray's
    temp directory, where ray.init does the same), never for a given address or RAY_ADDRESS: a driver in
    token mode refuses the unauthenticated calls of a token-less cluster's workers, so the first actor it
    creates dies before it runs (the `fdm submit` failure of issue 25, where ~/.ray/auth_token existed)."""
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    client = address.startswith("ray://")
    if "://" in address and not client:
        raise ClusterError(
            f"--address {address}: give the Ray head's GCS host:port (e.g. 127.0.0.1:6379) or auto; "
            "an http:// job API address is for `fdm submit`"
        )
    try:
        target = address.removeprefix("ray://") if client else address
        if target == "auto":
            target = canonicalize_bootstrap_address("auto")
        host, _, port = target.rpartition(":")
        port_no = int(port)
    except (ConnectionError, ValueError, TypeError) as err:
        raise ClusterError(f"cannot join the Ray cluster {address!r}: {err}") from None
    try:
        with socket.create_connection((host.strip("[]"), port_no), timeout=timeout):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ClusterError(
            f"cannot reach the Ray cluster at {target} ({reason} within {timeout:.0f} s); is the head up "
            "and the address its GCS host:port (`ray start --head --port`)?"
        ) from None
    if client:
        return
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )
    from ray._raylet import GcsClient

    if address == "auto":
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        with _quiet_stderr():
            GcsClient(address=target)
    except ray.exceptions.AuthenticationError:
        raise ClusterError(f"the Ray cluster at {target} refused this client: {AUTH_HINT}") from None
    except ray.exceptions.RpcError as err:
        raise ClusterError(
            f"{target} does not answer as a Ray cluster's GCS ({err}); give the head's GCS host:port "
            "(`ray start --head --port`, 6379 by default), not its dashboard or job address"
        ) from None
