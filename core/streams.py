"""The rules of stream names (docs/streams.md), shared by the server, the
agent SDK and the client SDK: one copy, so all three refuse the same names."""

from __future__ import annotations

import re

from .limits import DEFAULT_STREAM, MAX_STREAM_NAME_LEN

# The same grammar as the CHECK on intent_streams.name (migration 0012).
_NAME_RE = re.compile(rf"^[A-Za-z0-9_.:-]{{1,{MAX_STREAM_NAME_LEN}}}$")


def stream_name(name: str) -> str:
    """The stream a request names: empty means the default stream."""
    return name or DEFAULT_STREAM


def stream_name_problem(name: str) -> str | None:
    """Why ``name`` (after ``stream_name``) is not a stream name, or None."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_STREAM_NAME_LEN:
        return f"must be 1 to {MAX_STREAM_NAME_LEN} characters"
    if not _NAME_RE.fullmatch(name):
        return "may only contain letters, digits and _ . : -"
    return None
