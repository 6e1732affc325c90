"""Keeping credentials out of every record: MLflow params, tags and artifacts, logged configs, summaries and
the console.

Two kinds of secret are found: values under keys that look secret (`password`, `token`, `secret_key`, ...),
replaced whole, and credentials inside any URI-like value, wherever it appears in a string: the
`user:password@` of `scheme://user:password@host`, and signature or token query parameters
(`X-Amz-Signature`, `X-Amz-Credential`, `X-Amz-Security-Token`, `sig`, `signature`, `token`, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"
SECRET_KEY = re.compile(
    r"(secret|password|passwd|token|access_key|session_key|credential|api_key|apikey|private_key)",
    re.IGNORECASE,
)
# scheme://userinfo@ : userinfo up to the first "@" that precedes any "/", whitespace or quote.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"<>]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|"
    r"X-Goog-Credential|sig|signature|token|access_token|auth|password|secret|apikey|api_key|key)=)"
    r"(?P<value>[^&#\s'\"<>]*)",
    re.IGNORECASE,
)


def scrub(text: str) -> str:
    """`text` with URI credentials replaced by ***: `s3://***@host`, `...?X-Amz-Signature=***`."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['name']}{REDACTED}", text)


def scrub_tree(value: Any, key: str = "") -> Any:
    """A copy of a nested config with secret-looking keys' values and URI credentials redacted."""
    if key and SECRET_KEY.search(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: scrub_tree(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_tree(v) for v in value]
    if isinstance(value, str):
        return scrub(value)
    return value


class ScrubbedStream:
    """A text stream (stdout) that redacts credentials in URIs from everything written through it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(scrub(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
