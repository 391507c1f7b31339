"""Checks on what clients send, shared by the server (authoritative) and the
client SDK (early, friendlier failures). Messages name the offending field."""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import ValidationError
from .limits import (
    MAX_ADDRESS_LEN,
    MAX_HORIZON_MS,
    MAX_JSON_DEPTH,
    MAX_KEY_LEN,
    MAX_LABEL_KEY_LEN,
    MAX_LABEL_VALUE_LEN,
    MAX_LABELS,
    MAX_TYPE_LEN,
)

INTENT_TYPE_RE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+\.v[0-9]+$")
# agent://<org>/<env>/<name>; each part a DNS-label-like token.
_PART = r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?"
AGENT_ADDRESS_RE = re.compile(rf"^agent://({_PART})/({_PART})/({_PART})$")
# A sidecar may serve a pattern: a trailing * matches any name.

def check_text(value: str, field: str, max_len: int, *, required: bool = False) -> str:
    """Text bound for a PostgreSQL text column: at most ``max_len``
    characters and no NUL, which PostgreSQL cannot store."""
    if required and not value:
        raise ValidationError(field, "is required")
    if len(value) > max_len:
        raise ValidationError(field, f"is {len(value)} characters; at most {max_len}")
    if "\x00" in value:
        raise ValidationError(field, "must not contain NUL characters")
    return value


def check_horizon_ms(value: int, field: str) -> int:
    """A delay in milliseconds: not negative, not beyond MAX_HORIZON_MS."""
    if not 0 <= value <= MAX_HORIZON_MS:
        raise ValidationError(field, f"must be 0 to {MAX_HORIZON_MS} ms (100 years)")
    return value


def _check_pattern(value: str, field: str, max_len: int, pattern: re.Pattern[str], mismatch: str) -> str:
    if not value:
        raise ValidationError(field, "is required")
    if len(value) > max_len or not pattern.match(value):
        raise ValidationError(field, f"{_show(value)} {mismatch}")
    return value


def check_intent_type(value: str, field: str = "intent_type") -> str:
    return _check_pattern(value, field, MAX_TYPE_LEN, INTENT_TYPE_RE,
                          f"does not match {INTENT_TYPE_RE.pattern} (for example intent.pipeline.process.v1)")


def check_agent_address(value: str, field: str = "to_agent") -> str:
    return _check_pattern(value, field, MAX_ADDRESS_LEN, AGENT_ADDRESS_RE,
                          "is not an agent address agent://<org>/<env>/<name> (lowercase letters, digits, '-' and '_')")


def check_idempotency_key(value: str, field: str = "idempotency_key") -> str:
    if len(value) > MAX_KEY_LEN:
        raise ValidationError(field, f"is {len(value)} characters; at most {MAX_KEY_LEN}")
    if value and not value.isprintable():
        raise ValidationError(field, "must be printable text")
    return value


def check_labels(labels: dict[str, str], field: str = "labels") -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise ValidationError(field, f"has {len(labels)} entries; at most {MAX_LABELS}")
    for key, value in labels.items():
        if not key or len(key) > MAX_LABEL_KEY_LEN or not re.fullmatch(r"[A-Za-z0-9_.\-/]+", key):
            raise ValidationError(f"{field}[{_show(key)}]", "label keys are 1-63 of [A-Za-z0-9_.-/]")
        if len(value) > MAX_LABEL_VALUE_LEN or "\x00" in value:
            raise ValidationError(f"{field}[{key}]", f"label values are at most {MAX_LABEL_VALUE_LEN} characters")
    return labels


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes, field: str, max_bytes: int | None = None) -> str:
    """Returns the JSON text of ``raw`` (empty means null) after checking it is
    UTF-8, valid JSON (no NaN/Infinity) and not too deep."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise ValidationError(field, f"is {len(raw)} bytes; the limit is {max_bytes}")
    if not raw:
        return "null"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(field, f"is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if "\x00" in text or "\\u0000" in text:
        raise ValidationError(field, "must not contain NUL characters (PostgreSQL jsonb refuses them)")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValidationError(field, f"is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise ValidationError(field, f"is not valid JSON ({exc})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ValidationError(field, f"is nested deeper than {MAX_JSON_DEPTH} levels")
    return text


def _depth(value: Any) -> int:
    depth = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in item)
    return depth


def _show(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:57] + "...")
