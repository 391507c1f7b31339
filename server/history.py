"""Recorded steps in pages: how a history of any size reaches a resumed
attempt, a sidecar fetching more of it, and a client listing it.

A history may add up to far more than one gRPC message may carry (up to
``INTENTD_MAX_HISTORY_BYTES``), so nothing ever sends it whole. Each page is
cut by bytes and count in SQL (``steps_of``), from the stored size of each
step, always holding at least one step: a step is at most the payload limit,
which is below the message limit, so every page fits in one message.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from intentd.core.errors import ValidationError
from intentd.generated.v1 import delivery_pb2

from .convert import intent_to_proto, step_to_proto

# One page of steps: the first page of an assignment, a ListRecordedSteps
# answer, a ListIntentSteps page. Far below gRPC's default 4 MiB limit, which
# clients and agents in other languages may keep.
PAGE_BYTES = 1024 * 1024
PAGE_STEPS = 1000
# The first pages of all the assignments of one claim together (a claim takes
# up to 100 intents): intents past it get their steps by fetching.
CLAIM_BYTES = 4 * 1024 * 1024


def page_bytes(max_message_bytes: int) -> int:
    """A page's byte budget under a server's message limit: a quarter of it
    at most, so a page and the rest of its message stay well below."""
    return max(1, min(PAGE_BYTES, max_message_bytes // 4))


def recorded_to(row: Mapping[str, Any]) -> int:
    """The highest recorded position of an intent (``last_step_index``).
    Never below the count: a writer that keeps only the count (a wait
    recorded in order) still makes a bound that is right; one too high
    costs only a fetch answered "not recorded"."""
    return max(int(row["last_step_index"]), int(row["steps_completed"]))


def assignment(row: Mapping[str, Any], lease: delivery_pb2.Lease, steps: Sequence[Mapping[str, Any]],
               ) -> delivery_pb2.Assignment:
    """The assignment of a claimed intent, with the first page of its
    recorded steps; ``recorded_steps`` is the highest recorded position
    (nothing above it is recorded; below it, concurrent steps may have left
    holes, which a fetch answers "not recorded")."""
    return delivery_pb2.Assignment(
        intent=intent_to_proto(row),
        lease=lease,
        steps=[step_to_proto(s) for s in steps],
        checkpoint=row["checkpoint"].encode() if row["checkpoint"] is not None else b"",
        heartbeat_timeout_ms=row["heartbeat_timeout_ms"],
        recorded_steps=recorded_to(row),
        recorded_bytes=row["history_bytes"],
    )


def page_token(next_index: int) -> str:
    return base64.urlsafe_b64encode(f"s1:{next_index}".encode()).decode().rstrip("=")


def parse_page_token(token: str) -> int:
    """The first step index a ListIntentSteps page token asks for (1 without one)."""
    if not token:
        return 1
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, _, index = raw.partition(":")
        value = int(index)
    except (ValueError, UnicodeDecodeError):
        raise ValidationError("page_token", "is not a token this server issued") from None
    if version != "s1" or not 1 <= value <= 2**31 - 1:
        raise ValidationError("page_token", "is not a token this server issued")
    return value
