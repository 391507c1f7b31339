"""The gRPC surface of durable waits below the servicers: rows to messages,
and the rules of deciding a human task (docs/waits.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from intentd.core.errors import ValidationError
from intentd.generated.v1 import human_task_pb2 as hpb
from intentd.generated.v1 import intent_pb2
from intentd.server import errors
from intentd.server.auth import ROLES, Caller
from intentd.server.convert import event_to_proto, human_task_to_proto, intent_to_proto, signal_to_proto
from intentd.server.human_task_service import (
    check_form_data,
    check_may_decide,
    check_outcome,
    require_task_id,
    task_states,
)
from intentd.server.ids import new_id, page_token, parse_page_token

NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)


def intent_row(**extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": new_id(), "tenant": "default", "intent_type": "intent.x.y.v1", "to_agent": "agent://a/b/c",
        "sender": "s", "payload": "{}", "idempotency_key": None, "labels": "{}", "state": "WAITING",
        "attempt": 3, "max_attempts": 3, "cancel_reason": None, "last_seq": 7, "steps_completed": 1,
        "last_step": "build", "checkpoint": None, "checkpoint_time": None, "progress_message": None,
        "progress_fraction": None, "create_time": NOW, "update_time": NOW, "finish_time": None,
        "deadline": None, "result": None, "error_code": None, "error_message": None,
    }
    row.update(extra)
    return row


def test_an_intent_row_without_wait_columns_has_no_waiting() -> None:
    """Rows returned by writes carry the intent's columns only."""
    msg = intent_to_proto(intent_row())
    assert not msg.HasField("waiting")
    assert msg.parked_attempts == 0


def test_an_open_wait_becomes_intent_waiting() -> None:
    task_id = new_id()
    msg = intent_to_proto(intent_row(
        parked_attempts=2, wait_kind="HUMAN", wait_name="Deploy?", wait_idx=2, wait_since=NOW,
        wait_due_at=NOW + timedelta(hours=1), wait_task_id=task_id))
    assert msg.parked_attempts == 2
    assert msg.waiting == intent_pb2.WaitInfo(
        kind=intent_pb2.WAIT_KIND_HUMAN, name="Deploy?", step_index=2,
        since=msg.waiting.since, due_time=msg.waiting.due_time, task_id=task_id)
    assert msg.waiting.since.ToDatetime(tzinfo=UTC) == NOW
    assert msg.waiting.due_time.ToDatetime(tzinfo=UTC) == NOW + timedelta(hours=1)


def test_a_timer_without_due_time_or_task_and_no_open_wait() -> None:
    timer = intent_to_proto(intent_row(parked_attempts=0, wait_kind="TIME", wait_name=None, wait_idx=1,
                                       wait_since=NOW, wait_due_at=None, wait_task_id=None))
    assert timer.waiting.kind == intent_pb2.WAIT_KIND_TIME
    assert (timer.waiting.name, timer.waiting.task_id, timer.waiting.HasField("due_time")) == ("", "", False)
    # The columns are there, NULL: the intent waits for nothing.
    none = intent_to_proto(intent_row(parked_attempts=1, wait_kind=None, wait_name=None, wait_idx=None,
                                      wait_since=None, wait_due_at=None, wait_task_id=None))
    assert not none.HasField("waiting")
    assert none.parked_attempts == 1


def event_row(type_: str, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "intent_id": new_id(), "seq": 4, "type": type_, "time": NOW, "state": "WAITING", "attempt": 1,
        "step_name": None, "step_index": None, "message": None, "progress_fraction": None,
        "error_code": None, "error_message": None,
    }
    row.update(extra)
    return row


@pytest.mark.parametrize("name", ["WAITING", "SIGNALED", "TASK_CREATED", "TASK_DECIDED", "TIMER_FIRED",
                                  "TASK_REMINDED"])
def test_every_wait_event_type_maps_to_its_enum_value(name: str) -> None:
    assert event_to_proto(event_row(name)).type == intent_pb2.EventType.Value(f"EVENT_TYPE_{name}")


def test_wait_event_fields() -> None:
    waiting = event_to_proto(event_row("WAITING", wait_kind="SIGNAL", wait_name="ci.passed", step_index=3,
                                       signal_id=None, task_id=None, actor=None))
    assert (waiting.wait_kind, waiting.wait_name, waiting.step_index) == (intent_pb2.WAIT_KIND_SIGNAL,
                                                                          "ci.passed", 3)
    signaled = event_to_proto(event_row("SIGNALED", state="PENDING", wait_kind=None, wait_name="ci.passed",
                                        signal_id="sig-1", task_id=None, actor="web"))
    assert (signaled.signal_id, signaled.actor, signaled.wait_kind) == ("sig-1", "web",
                                                                        intent_pb2.WAIT_KIND_UNSPECIFIED)
    task_id = new_id()
    decided = event_to_proto(event_row("TASK_DECIDED", wait_kind="HUMAN", wait_name=None, signal_id=None,
                                       task_id=task_id, actor="alice", message="approve"))
    assert (decided.task_id, decided.actor, decided.message) == (task_id, "alice", "approve")
    # An event row of before the wait columns (actor existed) still converts.
    old = event_to_proto(event_row("CANCELED", actor="ops"))
    assert (old.actor, old.wait_kind, old.signal_id, old.task_id) == ("ops", 0, "", "")


def test_signal_row_to_proto() -> None:
    row = {"seq": 9, "intent_id": new_id(), "signal_id": "s-1", "name": "ci.passed", "payload": '{"ok": true}',
           "sender": "web", "create_time": NOW, "consumed_idx": None}
    msg = signal_to_proto(row)
    assert (msg.id, msg.name, json.loads(msg.payload), msg.sender, msg.consumed_by_step) == (
        "s-1", "ci.passed", {"ok": True}, "web", 0)
    assert msg.create_time.ToDatetime(tzinfo=UTC) == NOW
    assert signal_to_proto({**row, "consumed_idx": 4}).consumed_by_step == 4


def task_row(**extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": new_id(), "tenant": "default", "intent_id": new_id(), "idx": 2, "intent_type": "intent.x.y.v1",
        "to_agent": "agent://a/b/c", "title": "Deploy?", "description": "to prod", "outcomes": ["approve", "reject"],
        "assignees": ["alice"], "form_schema": None, "state": "OPEN", "create_time": NOW,
        "due_at": None, "remind_at": None, "reminded": False, "outcome": None, "decided_by": None,
        "decide_time": None, "comment": None, "form_data": None,
    }
    row.update(extra)
    return row


def test_an_open_task_has_no_decision() -> None:
    row = task_row(due_at=NOW + timedelta(days=1), remind_at=NOW + timedelta(hours=1),
                   form_schema='{"type": "object"}')
    msg = human_task_to_proto(row)
    assert msg.state == hpb.HUMAN_TASK_STATE_OPEN
    assert (msg.id, msg.intent_id, msg.step_index, msg.title, msg.description) == (
        row["id"], row["intent_id"], 2, "Deploy?", "to prod")
    assert (list(msg.outcomes), list(msg.assignees)) == (["approve", "reject"], ["alice"])
    assert json.loads(msg.form_schema) == {"type": "object"}
    assert msg.due_time.ToDatetime(tzinfo=UTC) == NOW + timedelta(days=1)
    assert msg.remind_time.ToDatetime(tzinfo=UTC) == NOW + timedelta(hours=1)
    assert not msg.HasField("decision")


def test_a_decided_task_carries_its_decision() -> None:
    msg = human_task_to_proto(task_row(state="DECIDED", outcome="approve", decided_by="alice",
                                       decide_time=NOW, comment="ship it", form_data='{"n": 1}'))
    assert msg.state == hpb.HUMAN_TASK_STATE_DECIDED
    assert (msg.decision.outcome, msg.decision.decided_by, msg.decision.comment) == ("approve", "alice", "ship it")
    assert json.loads(msg.decision.form_data) == {"n": 1}
    assert msg.decision.decide_time.ToDatetime(tzinfo=UTC) == NOW
    assert not msg.HasField("due_time") and msg.form_schema == b""


@pytest.mark.parametrize(("state", "value"), [("EXPIRED", hpb.HUMAN_TASK_STATE_EXPIRED),
                                              ("CANCELED", hpb.HUMAN_TASK_STATE_CANCELED)])
def test_closed_undecided_tasks(state: str, value: int) -> None:
    msg = human_task_to_proto(task_row(state=state, assignees=[]))
    assert msg.state == value and not msg.HasField("decision") and not msg.assignees


def test_task_states_default_to_open_and_refuse_unknown_values() -> None:
    assert task_states([]) == ["OPEN"]
    assert task_states([hpb.HUMAN_TASK_STATE_DECIDED, hpb.HUMAN_TASK_STATE_EXPIRED]) == ["DECIDED", "EXPIRED"]
    for bad in (hpb.HUMAN_TASK_STATE_UNSPECIFIED, 99):
        with pytest.raises(ValidationError, match=r"states\[1\]"):
            task_states([hpb.HUMAN_TASK_STATE_OPEN, bad])  # type: ignore[list-item]


def caller(name: str, *roles: str) -> Caller:
    return Caller("t", name, frozenset(roles))


def test_who_may_decide() -> None:
    assigned = task_row(assignees=["alice", "carol"])
    check_may_decide(caller("alice", "client"), assigned)
    check_may_decide(caller("ops", "admin"), assigned)
    check_may_decide(Caller("t", "anonymous", frozenset(ROLES)), assigned)  # API keys off
    with pytest.raises(errors.PermissionDenied, match="'bob' is not an assignee"):
        check_may_decide(caller("bob", "client"), assigned)
    check_may_decide(caller("bob", "client"), task_row(assignees=[]))  # no assignees: any client key
    check_may_decide(caller("bob", "client"), task_row(assignees=None))


def test_outcome_must_be_one_of_the_tasks() -> None:
    assert check_outcome("reject", ["approve", "reject"]) == "reject"
    with pytest.raises(ValidationError, match="'maybe' is not one of the task's outcomes: approve, reject"):
        check_outcome("maybe", ["approve", "reject"])
    with pytest.raises(ValidationError, match="outcome"):
        check_outcome("", ["approve", "reject"])


SCHEMA = json.dumps({"type": "object", "properties": {"amount": {"type": "integer"}}, "required": ["amount"]})


def test_form_data_is_checked_against_the_schema() -> None:
    check_form_data(SCHEMA, '{"amount": 3}')
    check_form_data(None, '{"anything": ["goes"]}')
    with pytest.raises(ValidationError, match=r"form_data: at \$\.amount: 'x' is not of type 'integer'"):
        check_form_data(SCHEMA, '{"amount": "x"}')
    with pytest.raises(ValidationError, match=r"form_data: at \$: 'amount' is a required property"):
        check_form_data(SCHEMA, "{}")
    with pytest.raises(ValidationError, match="None is not of type 'object'"):
        check_form_data(SCHEMA, "null")


def test_a_schema_that_cannot_be_applied_lets_nothing_through() -> None:
    # A remote $ref is never fetched (no request leaves the server).
    remote = json.dumps({"$ref": "http://169.254.169.254/latest/schema.json"})
    with pytest.raises(errors.FailedPrecondition, match="cannot be applied"):
        check_form_data(remote, "{}")
    with pytest.raises(errors.FailedPrecondition, match="cannot be applied"):
        check_form_data(json.dumps({"type": 5}), "{}")


def test_task_ids_and_page_tokens() -> None:
    with pytest.raises(ValidationError, match="id: is required"):
        require_task_id("")
    with pytest.raises(errors.NotFound):
        require_task_id("not-an-id")
    task_id = new_id()
    assert require_task_id(task_id) == task_id
    assert parse_page_token(page_token(task_id)) == task_id
    assert parse_page_token("") is None
    with pytest.raises(ValidationError, match="page_token"):
        parse_page_token("garbage!")
