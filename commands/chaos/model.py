"""What the chaos agent and the checker agree on: the intent type, the
ledger schema and the value every step must produce."""

from __future__ import annotations

import zlib
from typing import Any

INTENT_TYPE = "chaos.soak.run.v1"
# Non-retryable failures carry this code (the checker expects it back).
FAIL_CODE = "CHAOS_REJECTED"

# Every step run appends one row here, in its own transaction, before the
# step's work. ``began`` is the agent's wall clock when the step function was
# entered; ``at`` is the database clock when the row was written (later than
# ``began`` when the database was unreachable and the insert was retried).
# ``exec_id`` makes a retried insert idempotent.
LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS chaos_ledger (
    id          bigserial PRIMARY KEY,
    exec_id     uuid NOT NULL UNIQUE,
    intent_id   text NOT NULL,
    step        integer NOT NULL,
    attempt     integer NOT NULL,
    lease_token uuid NOT NULL,
    pid         integer NOT NULL,
    began       timestamptz NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS chaos_ledger_intent ON chaos_ledger (intent_id, step);
CREATE INDEX IF NOT EXISTS chaos_ledger_pid ON chaos_ledger (pid);
CREATE TABLE IF NOT EXISTS chaos_attempts (
    exec_id     uuid PRIMARY KEY,
    intent_id   text NOT NULL,
    attempt     integer NOT NULL,
    lease_token uuid NOT NULL,
    pid         integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS chaos_attempts_pid ON chaos_attempts (pid);
CREATE TABLE IF NOT EXISTS chaos_waits (
    exec_id     uuid PRIMARY KEY,
    intent_id   text NOT NULL,
    attempt     integer NOT NULL,
    lease_token uuid NOT NULL,
    value       jsonb NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS chaos_waits_intent ON chaos_waits (intent_id);
CREATE TABLE IF NOT EXISTS chaos_children (
    exec_id     uuid PRIMARY KEY,
    intent_id   text NOT NULL,
    attempt     integer NOT NULL,
    lease_token uuid NOT NULL,
    child_ids   jsonb NOT NULL,
    results     jsonb NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS chaos_children_intent ON chaos_children (intent_id);
"""

INSERT_LEDGER = (
    "INSERT INTO chaos_ledger (exec_id, intent_id, step, attempt, lease_token, pid, began)"
    " VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7)) ON CONFLICT (exec_id) DO NOTHING"
)
INSERT_ATTEMPT = (
    "INSERT INTO chaos_attempts (exec_id, intent_id, attempt, lease_token, pid)"
    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (exec_id) DO NOTHING"
)

# Every return of a wait for the signal, in every attempt that got past it.
INSERT_WAIT = (
    "INSERT INTO chaos_waits (exec_id, intent_id, attempt, lease_token, value)"
    " VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (exec_id) DO NOTHING"
)
# Every return of a "family" parent's gather of its children, in every
# attempt that got past it: the ids it started and the results it got.
INSERT_CHILDREN = (
    "INSERT INTO chaos_children (exec_id, intent_id, attempt, lease_token, child_ids, results)"
    " VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb) ON CONFLICT (exec_id) DO NOTHING"
)
# A "family" parent's children: intents of the same type on the same
# addresses, with this many steps and no failure or wait of their own.
CHILD_STEPS = 2
# The records a family parent's start and gather leave in its step sequence
# (core.waits.start_record_name and record_name(AGENT, ALL)).
START_RECORD = f"@start:{INTENT_TYPE}"
GATHER_RECORD = "@gather"

# The signal a "wait" intent waits for, and the value it carries.
SIGNAL_NAME = "go"


def signal_value(key: str) -> dict[str, str]:
    return {"token": key}


def step_name(index: int) -> str:
    return f"step-{index}"


def step_value(intent_id: str, index: int) -> int:
    """The deterministic value step ``index`` of an intent returns."""
    return zlib.crc32(f"{intent_id}:{index}".encode()) % 100_000


def child_payload(step_ms: int) -> dict[str, Any]:
    """The payload of every child of a family parent."""
    return {"steps": CHILD_STEPS, "step_ms": step_ms}


def expected_result(intent_id: str, steps: int, signal: dict[str, str] | None = None,
                    children: list[str] | None = None) -> dict[str, Any]:
    """What a completed intent's result must be (with the signal's value for
    an intent that waited for one, and each child's own result, in start
    order, for a family parent)."""
    result: dict[str, Any] = {"steps": steps, "sum": sum(step_value(intent_id, i) for i in range(1, steps + 1))}
    if signal is not None:
        result["signal"] = signal
    if children is not None:
        result["children"] = [expected_result(child, CHILD_STEPS) for child in children]
    return result
