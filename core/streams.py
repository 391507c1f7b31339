"""The rules of stream names that every layer shares (docs/streams.md): one
copy, so the agent SDK, the sidecar and the control plane refuse the same
names."""

from __future__ import annotations

import re

from .errors import ValidationError
from .limits import DEFAULT_STREAM, MAX_STREAM_NAME_LEN

_NAME_RE = re.compile(rf"^[A-Za-z0-9_.:-]{{1,{MAX_STREAM_NAME_LEN}}}$")


def stream_name(name: str) -> str:
    """The name a write carries for ``name``: empty means ``default``."""
    return name or DEFAULT_STREAM


def stream_name_problem(name: str) -> str | None:
    """Why ``name`` is not a stream name, or None (empty is allowed: it is
    the default stream)."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if name == "" or _NAME_RE.fullmatch(name):
        return None
    if len(name) > MAX_STREAM_NAME_LEN:
        return f"must be at most {MAX_STREAM_NAME_LEN} characters"
    return "may only contain letters, digits and _ . : -"


def checked_stream_name(name: str, field: str) -> str:
    """The stream a request names ("" is the default stream); a bad name is a
    ValidationError naming ``field``."""
    problem = stream_name_problem(name)
    if problem is not None:
        raise ValidationError(field, problem)
    return stream_name(name)
