"""The control plane's checks of AGENT WaitWrites (server/stream/holds.py),
field by field: a bad one is INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import pytest

from intentd.core.errors import ValidationError
from intentd.core.waits import AGENT, ALL, FIRST, record_name
from intentd.generated.v1 import delivery_pb2, intent_pb2
from intentd.server.ids import new_id
from intentd.server.stream.holds import wait_spec


def agent_write(ids: list[str], mode: int = delivery_pb2.CHILD_WAIT_MODE_ALL, **kw: object) -> delivery_pb2.WaitWrite:
    name = ALL if mode == delivery_pb2.CHILD_WAIT_MODE_ALL else FIRST
    msg = delivery_pb2.WaitWrite(index=3, step_name=record_name(AGENT, name), kind=intent_pb2.WAIT_KIND_AGENT,
                                 children=delivery_pb2.ChildWait(intent_ids=ids, mode=mode))
    for field, value in kw.items():
        setattr(msg, field, value)
    return msg


def test_a_gather_and_a_first_are_read_with_their_children() -> None:
    ids = [new_id() for _ in range(3)]
    spec = wait_spec(agent_write(ids, timeout_ms=500))
    assert (spec.kind, spec.name, spec.step_name, spec.children, spec.timeout_ms) == (
        AGENT, ALL, "@gather", tuple(ids), 500)
    first = wait_spec(agent_write(ids[:1], delivery_pb2.CHILD_WAIT_MODE_FIRST))
    assert (first.name, first.step_name) == (FIRST, "@first")


@pytest.mark.parametrize(("msg", "field"), [
    (agent_write([]), "intent_ids"),
    (agent_write([new_id()] * 2), "intent_ids"),
    (agent_write(["../etc/passwd"]), "intent_ids"),
    (agent_write([new_id() for _ in range(1001)]), "intent_ids"),
    (agent_write([new_id()], 0), "mode"),
    (agent_write([new_id()], 7), "mode"),
    (agent_write([new_id()], step_name="@first"), "step_name"),
    (agent_write([new_id()], signal_name="go"), "wait"),
])
def test_bad_agent_waits_name_their_field(msg: delivery_pb2.WaitWrite, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        wait_spec(msg)


def test_children_belong_to_agent_waits_only() -> None:
    msg = delivery_pb2.WaitWrite(index=1, step_name="@sleep", kind=intent_pb2.WAIT_KIND_TIME, timeout_ms=10,
                                 children=delivery_pb2.ChildWait(intent_ids=[new_id()]))
    with pytest.raises(ValidationError, match=r"wait\.children"):
        wait_spec(msg)
