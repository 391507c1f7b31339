"""The retry rule of a finished attempt has one copy, `intentd_attempt_end`
(migration 0009), executed by the database; its backoff is the same doubling
rule as `intentd.core.backoff.Backoff` without jitter. This test keeps the two
equal, so "one backoff" stays true while the database decides the due time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from intentd.core.backoff import Backoff

AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
END = "SELECT * FROM intentd_attempt_end($1, $2, $3, $4, $5, $6, $7)"


@pytest.mark.parametrize(("base_ms", "max_ms"), [(100, 60_000), (250, 1_000), (0, 5_000), (1_000, 1_000)])
async def test_the_sql_backoff_is_the_core_rule_without_jitter(pg: asyncpg.Connection, base_ms: int,
                                                               max_ms: int) -> None:
    rule = Backoff(initial=base_ms, maximum=max_ms)
    for attempt in range(1, 15):
        row = await pg.fetchrow(END, True, attempt, 99, True, base_ms, max_ms, AT)
        assert row["state"] == "PENDING"
        waited = row["available_at"] - AT
        assert waited == timedelta(milliseconds=rule.ceiling(attempt - 1)), (attempt, waited)


@pytest.mark.parametrize(
    ("retry", "attempt", "max_attempts", "state", "exhausted"),
    [
        (True, 1, 3, "PENDING", False),   # retryable, attempts left: back after the backoff
        (True, 3, 3, "FAILED", True),     # retryable, none left: the dead letter, exhausted
        (False, 1, 3, "FAILED", False),   # the agent's own non-retryable failure
    ],
)
async def test_retry_or_dead_letter(pg: asyncpg.Connection, retry: bool, attempt: int, max_attempts: int,
                                    state: str, exhausted: bool) -> None:
    row = await pg.fetchrow(END, retry, attempt, max_attempts, True, 100, 60_000, AT)
    assert (row["state"], row["exhausted"]) == (state, exhausted)
    assert row["finish_time"] == (None if state == "PENDING" else AT)


async def test_a_release_redelivers_at_once(pg: asyncpg.Connection) -> None:
    row = await pg.fetchrow(END, True, 2, 3, False, 100, 60_000, AT)
    assert (row["state"], row["available_at"]) == ("PENDING", AT)
