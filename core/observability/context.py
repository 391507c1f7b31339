"""Fields that every log line about an intent carries.

Two sources, both read by the JSON formatter in ``intentd.core.logs`` (and by
nothing else, so setting them costs a dict copy and no I/O):

- ``log_context(intent_id=..., attempt=..., tenant=...)``: a context manager
  over a ``contextvars`` variable. It follows the code, not the thread:
  asyncio tasks created inside it, and ``asyncio.to_thread`` /
  ``contextvars.copy_context().run`` threads, inherit it. Nested blocks add
  to (and override) the outer fields.
- ``set_process_fields(sidecar_id=...)``: fields of the whole process (the
  sidecar's id, a replica's name). Process-wide on purpose: gRPC servers run
  handlers in tasks whose context is not the one ``main`` set up.

A field that is None is left out. Values are kept as given (ints stay ints in
the JSON).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

# The fields the formatter knows by name; others may be set too and are
# emitted as they are.
INTENT_ID = "intent_id"
ATTEMPT = "attempt"
TENANT = "tenant"
SIDECAR_ID = "sidecar_id"
KNOWN_FIELDS = (INTENT_ID, ATTEMPT, TENANT, SIDECAR_ID)

_EMPTY: Mapping[str, Any] = {}
_fields: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("intentd_log_fields", default=_EMPTY)
_process_fields: dict[str, Any] = {}


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Adds ``fields`` to every log line emitted inside the block (and in
    tasks it starts)::

        with log_context(intent_id=lease.intent_id, attempt=lease.attempt):
            log.info("started")   # {"message": "started", "intent_id": "...", "attempt": 2, ...}
    """
    merged = {**_fields.get(), **{k: v for k, v in fields.items() if v is not None}}
    token = _fields.set(merged)
    try:
        yield
    finally:
        _fields.reset(token)


def bind_log_context(**fields: Any) -> None:
    """Adds ``fields`` to the current context until it ends, without a block:
    for a task's top, where a ``with`` would indent the whole body. A task
    runs in a copy of its creator's context, so this never leaks out of it."""
    _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})


def current_log_context() -> dict[str, Any]:
    """The process fields overlaid with the current context's fields."""
    current = _fields.get()
    if not _process_fields:
        return dict(current)
    return {**_process_fields, **current}


def set_process_fields(**fields: Any) -> None:
    """Fields for every line of this process (None removes one)."""
    for key, value in fields.items():
        if value is None:
            _process_fields.pop(key, None)
        else:
            _process_fields[key] = value
