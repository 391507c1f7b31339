"""The intent state machine, in Python.

The proto enum (proto/intentd/v1/intent.proto) is the contract; the SQL enum
and the transition table (server/migrations) enforce it. This module mirrors
both, and tests/integration/test_migrations.py::test_proto_sql_and_python_states_agree
fails when any of the three drift apart.
"""

from __future__ import annotations

import enum

from intentd.generated.v1 import intent_pb2


class IntentState(enum.StrEnum):
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    IN_PROGRESS = "IN_PROGRESS"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    def to_proto(self) -> intent_pb2.IntentState.ValueType:
        return intent_pb2.IntentState.Value(f"INTENT_STATE_{self.value}")

    @classmethod
    def from_proto(cls, value: int) -> IntentState:
        """Raises ValueError for UNSPECIFIED and for numbers the enum does not have."""
        try:
            name = intent_pb2.IntentState.Name(value)  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(f"unknown intent state {value}") from None
        if name == "INTENT_STATE_UNSPECIFIED":
            raise ValueError("intent state must be specified")
        return cls(name.removeprefix("INTENT_STATE_"))


TERMINAL_STATES = frozenset(
    {IntentState.COMPLETED, IntentState.FAILED, IntentState.CANCELED, IntentState.TIMED_OUT}
)
LIVE_STATES = frozenset(set(IntentState) - TERMINAL_STATES)

S = IntentState
TRANSITIONS: frozenset[tuple[IntentState, IntentState]] = frozenset(
    {
        (S.PENDING, S.DELIVERED), (S.PENDING, S.CANCELED), (S.PENDING, S.TIMED_OUT),
        (S.DELIVERED, S.IN_PROGRESS), (S.DELIVERED, S.PENDING), (S.DELIVERED, S.FAILED),
        (S.DELIVERED, S.CANCELED), (S.DELIVERED, S.TIMED_OUT),
        (S.IN_PROGRESS, S.COMPLETED), (S.IN_PROGRESS, S.FAILED), (S.IN_PROGRESS, S.PENDING),
        (S.IN_PROGRESS, S.WAITING), (S.IN_PROGRESS, S.CANCELED), (S.IN_PROGRESS, S.TIMED_OUT),
        (S.WAITING, S.PENDING), (S.WAITING, S.CANCELED), (S.WAITING, S.TIMED_OUT),
        (S.WAITING, S.FAILED),
        (S.FAILED, S.PENDING),
    }
)  # fmt: skip
del S
