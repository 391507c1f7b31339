"""Unit tests of the client's durable-wait calls and models (docs/waits.md):
signals, human tasks, WaitInfo, the new event fields. No server: the
generated messages directly, and calls to fake stubs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from intentd.client import (
    AsyncIntentClient,
    FailedPrecondition,
    HumanDecision,
    HumanTask,
    HumanTaskState,
    IntentClient,
    IntentState,
    IntentType,
    InvalidArgument,
    Signal,
    SignalResult,
    Unavailable,
    WaitInfo,
)
from intentd.client._common import decide_request, signal_request, task_list_request, task_state_values
from intentd.client.models import (
    WAIT_EVENT_TYPES,
    event_from_proto,
    intent_from_proto,
    intent_type_from_proto,
    task_from_proto,
    wait_kind_name,
)
from intentd.core.limits import MAX_SIGNAL_ID_LEN, MAX_TASK_COMMENT_LEN
from intentd.generated.v1 import admin_service_pb2 as admin_pb
from intentd.generated.v1 import human_task_pb2 as task_pb
from intentd.generated.v1 import intent_pb2
from intentd.generated.v1 import intent_service_pb2 as pb

ID = "01jabcdefghjkmnpqrstvwxyz0"
TASK = "01jtaskaaaaaaaaaaaaaaaaaaa"
T0 = datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)
U = grpc.StatusCode.UNAVAILABLE
FAST: dict[str, Any] = {"initial_backoff": 0.001, "max_backoff": 0.002}


def ts(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


def waiting_intent(**extra: Any) -> intent_pb2.Intent:
    return intent_pb2.Intent(
        id=ID, intent_type="intent.demo.deploy.v1", to_agent="agent://demo/local/deploy",
        state=intent_pb2.INTENT_STATE_WAITING, attempt=1, max_attempts=3, parked_attempts=1,
        create_time=ts(T0),
        waiting=intent_pb2.WaitInfo(kind=intent_pb2.WAIT_KIND_HUMAN, name="Deploy to prod?", step_index=6,
                                    since=ts(T0), due_time=ts(T0 + timedelta(days=1)), task_id=TASK),
        **extra,
    )


def open_task(**extra: Any) -> task_pb.HumanTask:
    fields: dict[str, Any] = dict(
        id=TASK, intent_id=ID, intent_type="intent.demo.deploy.v1", to_agent="agent://demo/local/deploy",
        step_index=6, title="Deploy to prod?", description="v2 on staging", outcomes=["approve", "reject"],
        assignees=["alice", "bob"], form_schema=b'{"type":"object"}', state=task_pb.HUMAN_TASK_STATE_OPEN,
        create_time=ts(T0), due_time=ts(T0 + timedelta(days=1)),
    )
    fields.update(extra)
    return task_pb.HumanTask(**fields)


def decided_task(outcome: str = "approve") -> task_pb.HumanTask:
    return open_task(state=task_pb.HUMAN_TASK_STATE_DECIDED, decision=task_pb.HumanDecision(
        outcome=outcome, decided_by="alice", decide_time=ts(T0 + timedelta(minutes=3)), comment="ship it",
        form_data=b'{"ticket":"OPS-1"}'))


# ---------------------------------------------------------------- models


def test_intent_waiting_and_parked_attempts() -> None:
    intent = intent_from_proto(waiting_intent())
    assert intent.state is IntentState.WAITING
    assert intent.waiting == WaitInfo(kind="HUMAN", name="Deploy to prod?", step_index=6, since=T0,
                                      due_time=T0 + timedelta(days=1), task_id=TASK)
    assert intent.parked_attempts == 1 and intent.attempts_used == 0
    plain = intent_from_proto(intent_pb2.Intent(id=ID, state=intent_pb2.INTENT_STATE_PENDING))
    assert plain.waiting is None and plain.parked_attempts == 0
    timer = intent_from_proto(intent_pb2.Intent(
        id=ID, state=intent_pb2.INTENT_STATE_WAITING,
        waiting=intent_pb2.WaitInfo(kind=intent_pb2.WAIT_KIND_TIME, step_index=2)))
    assert timer.waiting is not None and timer.waiting.kind == "TIME"
    assert timer.waiting.since is None and timer.waiting.due_time is None


def test_wait_kind_names() -> None:
    assert [wait_kind_name(v) for v in (1, 2, 3)] == ["SIGNAL", "HUMAN", "TIME"]
    assert wait_kind_name(0) == ""
    assert wait_kind_name(99) == "UNKNOWN_99"


def test_event_wait_fields_and_types() -> None:
    event = event_from_proto(intent_pb2.IntentEvent(
        intent_id=ID, seq=9, type=intent_pb2.EVENT_TYPE_SIGNALED, state=intent_pb2.INTENT_STATE_PENDING,
        wait_kind=intent_pb2.WAIT_KIND_SIGNAL, wait_name="ci.passed", signal_id="s-1", step_index=4, actor="alice",
        time=ts(T0)))
    assert (event.type, event.wait_kind, event.wait_name, event.signal_id, event.actor, event.step_index) == (
        "SIGNALED", "SIGNAL", "ci.passed", "s-1", "alice", 4)
    assert event.task_id == ""
    decided = event_from_proto(intent_pb2.IntentEvent(type=intent_pb2.EVENT_TYPE_TASK_DECIDED, task_id=TASK,
                                                      message="approve", actor="alice",
                                                      state=intent_pb2.INTENT_STATE_PENDING))
    assert (decided.type, decided.task_id, decided.message, decided.wait_kind) == ("TASK_DECIDED", TASK, "approve", "")
    names = {event_from_proto(intent_pb2.IntentEvent(type=v, state=intent_pb2.INTENT_STATE_WAITING)).type
             for v in range(13, 19)}
    assert names == WAIT_EVENT_TYPES


def test_task_from_proto() -> None:
    task = task_from_proto(open_task())
    assert isinstance(task, HumanTask) and task.open
    assert task.state is HumanTaskState.OPEN and task.state == "OPEN"
    assert (task.id, task.intent_id, task.step_index, task.title, task.description) == (
        TASK, ID, 6, "Deploy to prod?", "v2 on staging")
    assert task.outcomes == ["approve", "reject"] and task.assignees == ["alice", "bob"]
    assert task.form_schema == {"type": "object"}
    assert task.create_time == T0 and task.due_time == T0 + timedelta(days=1) and task.remind_time is None
    assert task.decision is None and task.proto.id == TASK
    bare = task_from_proto(open_task(form_schema=b"", due_time=None))
    assert bare.form_schema is None and bare.due_time is None


def test_decided_task_carries_the_decision() -> None:
    task = task_from_proto(decided_task())
    assert task.state is HumanTaskState.DECIDED and not task.open
    assert task.decision == HumanDecision(task_id=TASK, outcome="approve", decided_by="alice",
                                          decide_time=T0 + timedelta(minutes=3), comment="ship it",
                                          form_data={"ticket": "OPS-1"})
    assert task.decision.approved
    assert task_from_proto(decided_task("reject")).decision is not None
    assert not task_from_proto(decided_task("reject")).decision.approved  # type: ignore[union-attr]


def test_task_states_round_trip() -> None:
    for state in HumanTaskState:
        assert HumanTaskState.from_proto(state.to_proto()) is state
    with pytest.raises(ValueError, match="specified"):
        HumanTaskState.from_proto(task_pb.HUMAN_TASK_STATE_UNSPECIFIED)
    with pytest.raises(ValueError, match="unknown"):
        HumanTaskState.from_proto(42)


def test_intent_type_wait_hold_ms_unset_and_zero_differ() -> None:
    assert not IntentType(intent_type="t.x.v1").to_proto().HasField("wait_hold_ms")
    zero = IntentType(intent_type="t.x.v1", wait_hold_ms=0).to_proto()
    assert zero.HasField("wait_hold_ms") and zero.wait_hold_ms == 0
    assert intent_type_from_proto(admin_pb.IntentType(intent_type="t.x.v1")).wait_hold_ms is None
    assert intent_type_from_proto(admin_pb.IntentType(intent_type="t.x.v1", wait_hold_ms=0)).wait_hold_ms == 0


# ---------------------------------------------------------------- requests, checked before any call


def test_signal_request_checks_and_makes_up_an_id() -> None:
    request = signal_request(ID, "ci.passed", {"sha": "abc"}, None)
    assert (request.id, request.name, request.payload) == (ID, "ci.passed", b'{"sha":"abc"}')
    assert request.signal_id and request.signal_id != signal_request(ID, "ci.passed", None, None).signal_id
    assert signal_request(ID, "ci.passed", None, "hook-7").signal_id == "hook-7"
    assert signal_request(ID, "ci.passed", None, None).payload == b""
    assert signal_request(ID, "ci.passed", b'{"raw":1}', None).payload == b'{"raw":1}'
    for bad_name in ("", "has space", "x" * 129, "é"):
        with pytest.raises(InvalidArgument, match=r"^INVALID_ARGUMENT: name: "):
            signal_request(ID, bad_name, None, None)
    for bad_id in ("with/slash", "x" * (MAX_SIGNAL_ID_LEN + 1)):
        with pytest.raises(InvalidArgument, match="signal_id: "):
            signal_request(ID, "ok", None, bad_id)
    with pytest.raises(InvalidArgument, match="payload: "):
        signal_request(ID, "ok", {1, 2}, None)
    with pytest.raises(InvalidArgument, match="id: is required"):
        signal_request("", "ok", None, None)


def test_task_list_request() -> None:
    request = task_list_request(states=["open", "HUMAN_TASK_STATE_DECIDED", HumanTaskState.EXPIRED],
                                assignee="alice", intent_type="t.x.v1", intent_id=ID, page_size=5, page_token="p")
    assert list(request.states) == [task_pb.HUMAN_TASK_STATE_OPEN, task_pb.HUMAN_TASK_STATE_DECIDED,
                                    task_pb.HUMAN_TASK_STATE_EXPIRED]
    assert (request.assignee, request.intent_type, request.intent_id, request.page_size, request.page_token) == (
        "alice", "t.x.v1", ID, 5, "p")
    assert list(task_list_request().states) == [] and task_list_request().page_size == 100
    assert task_state_values("canceled") == [task_pb.HUMAN_TASK_STATE_CANCELED]
    with pytest.raises(InvalidArgument, match=r"states\[0\]: .done. is not one of OPEN, DECIDED"):
        task_list_request(states=["done"])
    with pytest.raises(InvalidArgument, match="page_size"):
        task_list_request(page_size=0)


def test_decide_request() -> None:
    request = decide_request(TASK, "approve", "ok", {"ticket": 1})
    assert (request.id, request.outcome, request.comment, request.form_data) == (TASK, "approve", "ok",
                                                                                 b'{"ticket":1}')
    assert decide_request(TASK, "reject", "", None).form_data == b""
    with pytest.raises(InvalidArgument, match="outcome"):
        decide_request(TASK, "", "", None)
    with pytest.raises(InvalidArgument, match="comment"):
        decide_request(TASK, "approve", "x" * (MAX_TASK_COMMENT_LEN + 1), None)
    with pytest.raises(InvalidArgument, match=r"^INVALID_ARGUMENT: form_data: "):
        decide_request(TASK, "approve", "", object())
    with pytest.raises(InvalidArgument, match="id: is required"):
        decide_request("", "approve", "", None)


# ---------------------------------------------------------------- calls over fake stubs


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeUnary:
    """Fails with the given codes, then answers with the response (or what
    ``answer(request)`` makes of the request)."""

    def __init__(self, response: Any, failures: list[grpc.StatusCode] | None = None) -> None:
        self.response = response
        self.failures = list(failures or [])
        self.calls: list[Any] = []

    async def __call__(self, request: Any, *, timeout: float | None, metadata: Any) -> Any:
        # A copy: paging calls mutate their request between calls.
        seen = type(request)()
        seen.CopyFrom(request)
        self.calls.append(seen)
        if self.failures:
            raise FakeRpcError(self.failures.pop(0), "fake")
        return self.response(request) if callable(self.response) else self.response


class _Stub:
    def __init__(self, methods: dict[str, Any]) -> None:
        self.__dict__.update(methods)


def signal_response(request: pb.SignalIntentRequest) -> pb.SignalIntentResponse:
    return pb.SignalIntentResponse(
        intent=intent_pb2.Intent(id=request.id, state=intent_pb2.INTENT_STATE_PENDING),
        signal=pb.Signal(id=request.signal_id, name=request.name, payload=request.payload, sender="ci",
                         create_time=ts(T0), consumed_by_step=4),
        created=True)


def test_sync_signal_retries_unavailable_with_the_same_signal_id() -> None:
    send = FakeUnary(signal_response, [U, U])
    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = _Stub({"SignalIntent": send})
        result = client.signal(ID, "ci.passed", {"sha": "abc"})
    assert len(send.calls) == 3
    ids = {request.signal_id for request in send.calls}
    assert len(ids) == 1 and ids != {""}  # made up once, so the server matches the retries
    assert isinstance(result, SignalResult) and result.created
    assert result.intent.state is IntentState.PENDING
    assert result.signal == Signal(id=ids.pop(), name="ci.passed", payload={"sha": "abc"}, sender="ci",
                                   create_time=T0, consumed_by_step=4)


def test_signal_passes_its_id_and_does_not_retry_other_codes() -> None:
    done = FakeUnary(None, [grpc.StatusCode.FAILED_PRECONDITION])
    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = _Stub({"SignalIntent": done})
        with pytest.raises(FailedPrecondition):
            client.handle(ID).signal("ci.passed", signal_id="hook-7")
        assert [r.signal_id for r in done.calls] == ["hook-7"]
        with pytest.raises(InvalidArgument):
            client.signal(ID, "bad name")
        assert len(done.calls) == 1  # refused before any call


def test_sync_task_calls() -> None:
    listed = FakeUnary(task_pb.ListHumanTasksResponse(tasks=[open_task()], next_page_token="n"))
    got = FakeUnary(task_pb.GetHumanTaskResponse(task=open_task()))
    decide = FakeUnary(lambda r: task_pb.DecideHumanTaskResponse(task=decided_task(r.outcome)), [U])
    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._tasks_instance = _Stub({"ListHumanTasks": listed, "GetHumanTask": got,
                                             "DecideHumanTask": decide})
        page = client.list_tasks(states="open", assignee="alice", intent_id=ID, page_size=10)
        assert [t.id for t in page.tasks] == [TASK] and page.next_page_token == "n"
        assert listed.calls[0].assignee == "alice" and listed.calls[0].page_size == 10
        assert client.get_task(TASK).title == "Deploy to prod?"
        assert got.calls[0].id == TASK
        approved = client.approve(TASK, comment="ship it", form_data={"ticket": "OPS-1"})
        assert approved.state is HumanTaskState.DECIDED and approved.decision is not None
        assert approved.decision.decided_by == "alice"
        assert len(decide.calls) == 2  # retried on UNAVAILABLE: a repeat of the decision is answered unchanged
        assert (decide.calls[0].outcome, decide.calls[0].comment, decide.calls[0].form_data) == (
            "approve", "ship it", b'{"ticket":"OPS-1"}')
        rejected = client.reject(TASK)
        assert rejected.decision is not None and rejected.decision.outcome == "reject"
        client.decide_task(TASK, "defer", comment="later")
        assert (decide.calls[-1].outcome, decide.calls[-1].comment) == ("defer", "later")


def test_iter_tasks_and_handle_tasks_follow_the_pages() -> None:
    pages = [task_pb.ListHumanTasksResponse(tasks=[open_task(id="t1")], next_page_token="p2"),
             task_pb.ListHumanTasksResponse(tasks=[open_task(id="t2")])]
    listed = FakeUnary(lambda r: pages[0] if not r.page_token else pages[1])
    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._tasks_instance = _Stub({"ListHumanTasks": listed})
        assert [t.id for t in client.iter_tasks()] == ["t1", "t2"]
        assert [t.id for t in client.handle(ID).tasks(states=["open", "decided"])] == ["t1", "t2"]
    assert [r.page_token for r in listed.calls] == ["", "p2", "", "p2"]
    assert listed.calls[2].intent_id == ID and len(listed.calls[2].states) == 2


async def test_async_signal_and_decide() -> None:
    send = FakeUnary(signal_response, [U])
    decide = FakeUnary(lambda r: task_pb.DecideHumanTaskResponse(task=decided_task(r.outcome)))
    async with AsyncIntentClient("127.0.0.1:1", **FAST) as client:
        client._stub_instance = _Stub({"SignalIntent": send})
        client._tasks_instance = _Stub({"DecideHumanTask": decide,
                                        "ListHumanTasks": FakeUnary(task_pb.ListHumanTasksResponse(
                                            tasks=[open_task()]))})
        result = await client.handle(ID).signal("ci.passed", 1)
        assert result.signal.payload == 1 and len({r.signal_id for r in send.calls}) == 1
        task = await client.approve(TASK)
        assert task.decision is not None and task.decision.approved
        assert [t.id async for t in client.iter_tasks(intent_id=ID)] == [TASK]
        assert [t.id for t in await client.handle(ID).tasks()] == [TASK]
        with pytest.raises(InvalidArgument):
            await client.decide_task(TASK, "")


def test_unavailable_gives_up_after_the_retries() -> None:
    send = FakeUnary(signal_response, [U] * 5)
    with IntentClient("127.0.0.1:1", max_retries=2, **FAST) as client:
        client._aio._stub_instance = _Stub({"SignalIntent": send})
        with pytest.raises(Unavailable):
            client.signal(ID, "ci.passed")
    assert len(send.calls) == 3
