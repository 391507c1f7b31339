"""Unit tests of the client SDK: no server, no network. Calls go to fake stubs."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import math
import re
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from intentd.client import (
    AlreadyExists,
    AsyncIntentClient,
    Cancelled,
    ClientError,
    DeadlineExceeded,
    FailedPrecondition,
    Intent,
    IntentCanceled,
    IntentClient,
    IntentdError,
    IntentFailed,
    IntentNotCompleted,
    IntentState,
    IntentTimedOut,
    IntentType,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    WaitTimeout,
    build_spec,
    from_rpc_error,
)
from intentd.client._common import (
    WAIT_MARGIN_SECONDS,
    WAIT_SLICE_SECONDS,
    RetryPolicy,
    Settings,
    WaitLoop,
    WatchCursor,
    batch_request,
    list_request,
    send_request,
    state_values,
)
from intentd.client.models import (
    encode_json,
    event_from_proto,
    intent_from_proto,
    page_from_proto,
    step_from_proto,
)
from intentd.core.errors import SettingsError
from intentd.generated.v1 import intent_pb2
from intentd.generated.v1 import intent_service_pb2 as pb

TYPE = "intent.pipeline.process.v1"
AGENT = "agent://acme/prod/processor"
ID = "01jabcdefghjkmnpqrstvwxyz0"
T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def base(**extra: Any) -> dict[str, Any]:
    return {"intent_type": TYPE, "to_agent": AGENT, "payload": {"n": 1}, **extra}


# ---------------------------------------------------------------- build_spec


def test_build_spec_from_dict() -> None:
    spec = build_spec(base(labels={"team": "a"}, max_attempts=5, sender="svc"))
    assert spec.intent_type == TYPE
    assert spec.to_agent == AGENT
    assert spec.payload == b'{"n":1}'
    assert dict(spec.labels) == {"team": "a"}
    assert spec.max_attempts == 5
    assert spec.sender == "svc"
    assert not spec.HasField("deadline")


def test_build_spec_from_kwargs() -> None:
    spec = build_spec(intent_type=TYPE, to_agent=AGENT, payload=[1, "x", None], labels={"k": "v"})
    assert spec.intent_type == TYPE
    assert json.loads(spec.payload) == [1, "x", None]
    assert spec.max_attempts == 0
    assert spec.sender == ""


def test_kwargs_override_the_dict() -> None:
    spec = build_spec(base(), payload={"n": 2}, to_agent="agent://acme/prod/other")
    assert spec.payload == b'{"n":2}'
    assert spec.to_agent == "agent://acme/prod/other"
    assert spec.intent_type == TYPE


def test_build_spec_from_proto_copies_it() -> None:
    original = pb.IntentSpec(intent_type=TYPE, to_agent=AGENT, payload=b"1")
    spec = build_spec(original, labels={"a": "b"})
    assert spec.payload == b"1"
    assert dict(spec.labels) == {"a": "b"}
    assert spec.idempotency_key
    assert original.idempotency_key == ""
    assert not original.labels


def test_unknown_dict_key_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="paylod"):
        build_spec(base(paylod=1))


def test_auto_idempotency_key() -> None:
    a = build_spec(base())
    b = build_spec(base())
    assert re.fullmatch(r"[0-9a-f]{32}", a.idempotency_key)
    assert a.idempotency_key != b.idempotency_key
    assert build_spec(base(), idempotency_key="mine").idempotency_key == "mine"
    assert build_spec(base(idempotency_key="from-dict")).idempotency_key == "from-dict"
    # An empty key counts as none: the client still protects its own retries.
    assert build_spec(base(idempotency_key="")).idempotency_key


def test_deadline_from_timedelta() -> None:
    before = datetime.now(UTC)
    spec = build_spec(base(), deadline=timedelta(minutes=5))
    after = datetime.now(UTC)
    deadline = spec.deadline.ToDatetime(tzinfo=UTC)
    assert before + timedelta(minutes=5) <= deadline <= after + timedelta(minutes=5)


def test_deadline_from_datetimes() -> None:
    naive = build_spec(base(), deadline=datetime(2030, 1, 1, 12, 0))
    assert naive.deadline.ToDatetime(tzinfo=UTC) == datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    plus2 = timezone(timedelta(hours=2))
    aware = build_spec(base(), deadline=datetime(2030, 1, 1, 12, 0, tzinfo=plus2))
    assert aware.deadline.ToDatetime(tzinfo=UTC) == datetime(2030, 1, 1, 10, 0, tzinfo=UTC)
    with pytest.raises(InvalidArgument, match="deadline"):
        build_spec(base(), deadline=60)  # type: ignore[arg-type]


def test_payload_encoding() -> None:
    assert encode_json(b'{"raw": true}') == b'{"raw": true}'
    assert encode_json(None) == b""
    assert encode_json("text") == b'"text"'
    assert encode_json({"a": [1, 2]}) == b'{"a":[1,2]}'
    # Integers beyond 2^53 survive: the reason the API carries JSON text.
    assert json.loads(encode_json({"n": 2**53 + 1}))["n"] == 2**53 + 1
    with pytest.raises(InvalidArgument, match="payload"):
        encode_json(math.nan)
    with pytest.raises(InvalidArgument, match="payload"):
        encode_json({"x": object()})


def test_client_side_validation() -> None:
    with pytest.raises(InvalidArgument, match="intent_type") as info:
        build_spec(base(intent_type="NotAType"))
    assert isinstance(info.value, ValueError)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument, match="to_agent"):
        build_spec(base(to_agent="http://x"))
    with pytest.raises(InvalidArgument, match="labels"):
        build_spec(base(labels={"bad key!": "v"}))


def test_requests_name_fields_like_the_server() -> None:
    with pytest.raises(InvalidArgument, match=r"^INVALID_ARGUMENT: intent\.to_agent: "):
        send_request(base(to_agent="x"), {}, None)
    with pytest.raises(InvalidArgument) as info:
        batch_request([base(), base(intent_type="x")], None)
    assert info.value.details.startswith("intents[1].intent_type: ")


def test_default_sender_applies_only_when_unset() -> None:
    request = send_request(base(), {}, "svc")
    assert request.intent.sender == "svc"
    assert send_request(base(), {"sender": "other"}, "svc").intent.sender == "other"
    batch = batch_request([base(), base(sender="x")], "svc")
    assert [s.sender for s in batch.intents] == ["svc", "x"]


def test_state_filters() -> None:
    failed = intent_pb2.INTENT_STATE_FAILED
    assert state_values(None) == []
    assert state_values("FAILED") == [failed]
    assert state_values(["failed", "INTENT_STATE_PENDING", IntentState.COMPLETED]) == [
        failed,
        intent_pb2.INTENT_STATE_PENDING,
        intent_pb2.INTENT_STATE_COMPLETED,
    ]
    with pytest.raises(InvalidArgument, match=r"states\[1\]"):
        state_values(["FAILED", "DONE"])
    request = list_request(
        states=[IntentState.WAITING],
        intent_type=None,
        to_agent=AGENT,
        labels={"a": "b"},
        page_size=10,
        page_token="tok",
    )
    assert list(request.states) == [intent_pb2.INTENT_STATE_WAITING]
    assert request.intent_type == ""
    assert request.to_agent == AGENT
    assert dict(request.labels) == {"a": "b"}
    assert (request.page_size, request.page_token) == (10, "tok")


# ---------------------------------------------------------------- conversions


def ts(value: datetime) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    out = Timestamp()
    out.FromDatetime(value)
    return out


def make_intent(**overrides: Any) -> intent_pb2.Intent:
    fields: dict[str, Any] = dict(
        id=ID,
        tenant="default",
        intent_type=TYPE,
        to_agent=AGENT,
        sender="svc",
        payload=b'{"order":42,"big":9007199254740993}',
        idempotency_key="k1",
        deadline=ts(T0 + timedelta(hours=1)),
        labels={"team": "a"},
        state=intent_pb2.INTENT_STATE_FAILED,
        attempt=3,
        max_attempts=3,
        error=intent_pb2.IntentError(code="AGENT_ERROR", message="boom", retryable=False),
        create_time=ts(T0),
        update_time=ts(T0 + timedelta(seconds=5)),
        finish_time=ts(T0 + timedelta(seconds=5)),
        checkpoint=intent_pb2.CheckpointSummary(
            steps_completed=2, last_step="fetch", progress_message="half", progress_fraction=0.5
        ),
        cancel_reason="",
        last_event_seq=9,
    )
    fields.update(overrides)
    return intent_pb2.Intent(**fields)


def test_intent_from_proto() -> None:
    msg = make_intent()
    intent = intent_from_proto(msg)
    assert intent.id == ID
    assert intent.payload == {"order": 42, "big": 2**53 + 1}
    assert intent.idempotency_key == "k1"
    assert intent.deadline == T0 + timedelta(hours=1)
    assert intent.deadline.tzinfo is not None
    assert intent.labels == {"team": "a"}
    assert intent.state is IntentState.FAILED
    assert intent.terminal
    assert (intent.attempt, intent.max_attempts) == (3, 3)
    assert intent.result is None
    assert intent.error is not None
    assert (intent.error.code, intent.error.message) == ("AGENT_ERROR", "boom")
    assert intent.create_time == T0
    assert intent.finish_time == T0 + timedelta(seconds=5)
    assert (intent.steps_completed, intent.last_step) == (2, "fetch")
    assert intent.progress_fraction == 0.5
    assert intent.sender == "svc"
    assert intent.last_event_seq == 9
    assert intent.tenant == "default"
    assert intent.proto is msg
    assert "proto" not in repr(intent)


def test_intent_defaults_from_sparse_proto() -> None:
    intent = intent_from_proto(
        intent_pb2.Intent(id=ID, state=intent_pb2.INTENT_STATE_COMPLETED, result=b'"ok"')
    )
    assert intent.payload is None
    assert intent.result == "ok"
    assert intent.idempotency_key is None
    assert intent.deadline is None
    assert intent.error is None
    assert intent.finish_time is None
    assert intent.terminal


def test_intent_round_trip_through_bytes() -> None:
    msg = make_intent(state=intent_pb2.INTENT_STATE_IN_PROGRESS)
    again = intent_pb2.Intent.FromString(msg.SerializeToString())
    a, b = intent_from_proto(msg), intent_from_proto(again)
    assert a == b
    assert not a.terminal
    # The raw message is carried along but does not take part in equality.
    assert a == intent_from_proto(make_intent(state=intent_pb2.INTENT_STATE_IN_PROGRESS))


def test_event_from_proto() -> None:
    event = event_from_proto(
        intent_pb2.IntentEvent(
            intent_id=ID,
            seq=4,
            type=intent_pb2.EVENT_TYPE_STEP_COMPLETED,
            time=ts(T0),
            state=intent_pb2.INTENT_STATE_IN_PROGRESS,
            attempt=1,
            step_name="fetch",
            step_index=2,
            message="m",
            progress_fraction=0.25,
        )
    )
    assert event.type == "STEP_COMPLETED"
    assert event.seq == 4
    assert event.time == T0
    assert event.state is IntentState.IN_PROGRESS
    assert (event.step_name, event.step_index) == ("fetch", 2)
    assert event.error is None
    assert not event.terminal
    unknown = event_from_proto(
        intent_pb2.IntentEvent(seq=1, type=99, state=intent_pb2.INTENT_STATE_PENDING)  # type: ignore[arg-type]
    )
    assert unknown.type == "UNKNOWN_99"


def test_step_and_page_from_proto() -> None:
    step = step_from_proto(
        intent_pb2.StepRecord(index=1, name="fetch", result=b'{"rows":3}', attempt=2, record_time=ts(T0))
    )
    assert (step.index, step.name, step.result, step.attempt, step.record_time) == (
        1,
        "fetch",
        {"rows": 3},
        2,
        T0,
    )
    page = page_from_proto(pb.ListIntentsResponse(intents=[make_intent()], next_page_token="n"))
    assert [i.id for i in page.intents] == [ID]
    assert page.next_page_token == "n"


# ---------------------------------------------------------------- errors


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]  # grpc ships no stubs
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.INTERNAL, Internal),
        (grpc.StatusCode.CANCELLED, Cancelled),
    ],
)
def test_error_mapping(code: grpc.StatusCode, cls: type[ClientError]) -> None:
    err = from_rpc_error(FakeRpcError(code, "why"))
    assert type(err) is cls
    assert err.code == code
    assert err.details == "why"
    assert str(err) == f"{code.name}: why"


def test_error_mapping_fallback_and_aio() -> None:
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.ABORTED, "x"))
    # The client's root (was the client's own IntentdError, now under intentd's root).
    assert type(err) is ClientError
    assert isinstance(err, IntentdError)
    assert err.code == grpc.StatusCode.ABORTED
    aio = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), details="gone"
    )
    mapped = from_rpc_error(aio)
    assert isinstance(mapped, NotFound)
    assert mapped.details == "gone"
    bare = from_rpc_error(grpc.RpcError())
    assert bare.code == grpc.StatusCode.UNKNOWN


@pytest.mark.parametrize(
    ("state", "cls", "code"),
    [
        (intent_pb2.INTENT_STATE_FAILED, IntentFailed, grpc.StatusCode.ABORTED),
        (intent_pb2.INTENT_STATE_CANCELED, IntentCanceled, grpc.StatusCode.CANCELLED),
        (intent_pb2.INTENT_STATE_TIMED_OUT, IntentTimedOut, grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_wait_raises_outcome_errors(state: int, cls: type[IntentNotCompleted], code: Any) -> None:
    loop = WaitLoop(ID, None, raise_on_failure=True)
    resp = pb.WaitIntentResponse(intent=make_intent(state=state), terminal=True)
    with pytest.raises(cls) as info:
        loop.finish(resp)
    assert info.value.intent.id == ID
    assert info.value.code == code
    assert isinstance(info.value, IntentdError)
    # Without raise_on_failure the final intent is returned.
    final = WaitLoop(ID, None, raise_on_failure=False).finish(resp)
    assert final is not None and final.terminal


def test_completed_does_not_raise() -> None:
    loop = WaitLoop(ID, None, raise_on_failure=True)
    done = make_intent(state=intent_pb2.INTENT_STATE_COMPLETED, result=b"1")
    final = loop.finish(pb.WaitIntentResponse(intent=done, terminal=True))
    assert final is not None and final.result == 1


# ---------------------------------------------------------------- backoff and loops


def test_backoff_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    # The retry delays are intentd.core.backoff's one rule.
    import intentd.core.backoff as backoff

    policy = RetryPolicy(max_retries=3, initial_backoff=0.1, max_backoff=3.0)
    for attempt in range(30):
        cap = min(3.0, 0.1 * 2**attempt)
        monkeypatch.setattr(backoff.random, "random", lambda: 0.0)
        assert policy.delay(attempt) == pytest.approx(cap / 2)
        monkeypatch.setattr(backoff.random, "random", lambda: 1.0)
        assert policy.delay(attempt) == pytest.approx(cap)
        monkeypatch.undo()
        assert cap / 2 <= policy.delay(attempt) <= cap
    assert policy.delay(10_000) <= 3.0
    policy = RetryPolicy(max_retries=3, initial_backoff=0.2, max_backoff=1.0)
    assert 0.1 <= policy.delay(0) <= 0.2
    assert 0.5 <= policy.delay(5) <= 1.0


def test_retry_policy_decisions() -> None:
    policy = RetryPolicy(max_retries=2)
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")
    assert policy.after_failure(unavailable, 0) > 0
    assert policy.after_failure(unavailable, 1) > 0
    with pytest.raises(Unavailable, match="down"):
        policy.after_failure(unavailable, 2)
    with pytest.raises(DeadlineExceeded):
        policy.after_failure(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED), 0)


def test_settings_checks_and_channel_options() -> None:
    def make(**kw: Any) -> Settings:
        args: dict[str, Any] = dict(
            sender=None,
            max_retries=8,
            initial_backoff=0.1,
            max_backoff=3.0,
            timeout=30.0,
            channel_options=None,
            credentials=None,
            metadata=(),
        )
        args.update(kw)
        return Settings.make("host:1", **args)

    options = dict(make().channel_options)
    assert options["grpc.max_reconnect_backoff_ms"] == 3000
    user = dict(make(channel_options=[("grpc.max_reconnect_backoff_ms", 50)]).channel_options)
    assert user["grpc.max_reconnect_backoff_ms"] == 50
    assert make().call_metadata is None
    assert make(metadata=[("k", "v")]).call_metadata == (("k", "v"),)
    for bad in ({"max_retries": -1}, {"initial_backoff": 0}, {"max_backoff": 0.01}, {"timeout": 0}):
        with pytest.raises(ValueError):
            make(**bad)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_wait_loop_slices_and_timeout() -> None:
    clock = FakeClock()
    loop = WaitLoop(ID, 50.0, raise_on_failure=False, clock=clock)
    request, call_timeout = loop.next_call()
    assert request.id == ID
    assert request.timeout_ms == WAIT_SLICE_SECONDS * 1000
    assert call_timeout == WAIT_SLICE_SECONDS + WAIT_MARGIN_SECONDS
    pending = pb.WaitIntentResponse(
        intent=make_intent(state=intent_pb2.INTENT_STATE_PENDING), terminal=False
    )
    clock.now += 45
    assert loop.finish(pending) is None
    request, _ = loop.next_call()
    assert request.timeout_ms == 5000
    clock.now += 5
    with pytest.raises(WaitTimeout) as info:
        loop.finish(pending)
    assert info.value.intent.state is IntentState.PENDING
    assert isinstance(info.value, DeadlineExceeded)


def test_wait_loop_zero_timeout_asks_once() -> None:
    loop = WaitLoop(ID, 0, raise_on_failure=False, clock=FakeClock())
    request, _ = loop.next_call()
    # timeout_ms 0 means "forever" to the server.
    assert request.timeout_ms == 1
    with pytest.raises(WaitTimeout):
        loop.finish(pb.WaitIntentResponse(intent=make_intent(state=intent_pb2.INTENT_STATE_PENDING)))


def event_msg(seq: int, state: int = intent_pb2.INTENT_STATE_PENDING) -> pb.WatchIntentResponse:
    return pb.WatchIntentResponse(
        event=intent_pb2.IntentEvent(
            intent_id=ID, seq=seq, type=intent_pb2.EVENT_TYPE_PROGRESS, state=state  # type: ignore[arg-type]
        )
    )


def test_watch_cursor_resumes_without_duplicates() -> None:
    cursor = WatchCursor(ID, 2, RetryPolicy(max_retries=1))
    assert cursor.request().after_seq == 2
    assert cursor.accept(event_msg(2)) is None
    first = cursor.accept(event_msg(3))
    assert first is not None and first.seq == 3
    assert cursor.request().after_seq == 3
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE)
    cursor.after_failure(unavailable)
    # Progress restores the retry budget.
    assert cursor.accept(event_msg(4)) is not None
    cursor.after_failure(unavailable)
    with pytest.raises(Unavailable):
        cursor.after_failure(unavailable)
    with pytest.raises(InvalidArgument):
        WatchCursor(ID, -1, RetryPolicy())


# ---------------------------------------------------------------- clients over fake stubs


class FakeUnary:
    """Fails with the given codes, then answers."""

    def __init__(self, response: Any, failures: list[grpc.StatusCode]) -> None:
        self.response = response
        self.failures = list(failures)
        self.calls: list[tuple[Any, float | None]] = []

    def __call__(self, request: Any, *, timeout: float | None, metadata: Any) -> Any:
        self.calls.append((request, timeout))
        if self.failures:
            raise FakeRpcError(self.failures.pop(0), "fake")
        return self.response


class FakeAsyncUnary(FakeUnary):
    # The keyword is grpc's, so the fake must take it as such.
    async def __call__(
        self, request: Any, *, timeout: float | None, metadata: Any
    ) -> Any:
        return super().__call__(request, timeout=timeout, metadata=metadata)


class FakeStream:
    def __init__(self, items: list[Any], error: grpc.StatusCode | None) -> None:
        self.items = items
        self.error = error
        self.cancelled = False

    def _gen(self) -> Iterator[Any]:
        yield from self.items
        if self.error is not None:
            raise FakeRpcError(self.error, "stream broke")

    def __iter__(self) -> Iterator[Any]:
        return self._gen()

    async def _agen(self) -> AsyncIterator[Any]:
        for item in self._gen():
            yield item

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._agen()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeWatch:
    """Each call plays the next scripted stream, recording after_seq."""

    def __init__(self, streams: list[FakeStream]) -> None:
        self.streams = streams
        self.after: list[int] = []

    def __call__(self, request: pb.WatchIntentRequest, *, metadata: Any) -> FakeStream:
        self.after.append(request.after_seq)
        return self.streams.pop(0)


class _Stub:
    def __init__(self, methods: dict[str, Any]) -> None:
        self.__dict__.update(methods)


def fake_stub(**methods: Any) -> Any:
    return _Stub(methods)


FAST: dict[str, Any] = {"initial_backoff": 0.001, "max_backoff": 0.002}
U = grpc.StatusCode.UNAVAILABLE


def test_sync_client_retries_unavailable_with_the_same_key() -> None:
    send = FakeAsyncUnary(pb.SendIntentResponse(intent=make_intent(), created=True), [U, U])
    with IntentClient("127.0.0.1:1", sender="svc", timeout=7, **FAST) as client:
        client._aio._stub_instance = fake_stub(SendIntent=send)
        intent, created = client.send(base())
    assert intent.id == ID and created
    assert len(send.calls) == 3
    keys = {request.intent.idempotency_key for request, _ in send.calls}
    assert len(keys) == 1 and keys != {""}
    assert all(timeout == 7 for _, timeout in send.calls)
    assert send.calls[0][0].intent.sender == "svc"


def test_sync_client_gives_up_and_does_not_retry_other_codes() -> None:
    with IntentClient("127.0.0.1:1", max_retries=3, **FAST) as client:
        get = FakeAsyncUnary(pb.GetIntentResponse(intent=make_intent()), [U] * 10)
        client._aio._stub_instance = fake_stub(GetIntent=get)
        with pytest.raises(Unavailable):
            client.get(ID)
        assert len(get.calls) == 4
        missing = FakeAsyncUnary(None, [grpc.StatusCode.NOT_FOUND])
        client._aio._stub_instance = fake_stub(GetIntent=missing)
        with pytest.raises(NotFound) as info:
            client.get(ID)
        assert len(missing.calls) == 1
        assert isinstance(info.value.__cause__, grpc.RpcError)


def test_sync_watch_reconnects_after_the_last_seq() -> None:
    watch = FakeWatch(
        [
            FakeStream([event_msg(1), event_msg(2)], U),
            FakeStream([], U),
            # A replay overlapping what was already yielded is skipped.
            FakeStream([event_msg(2), event_msg(3, intent_pb2.INTENT_STATE_CANCELED)], None),
        ]
    )
    streams = list(watch.streams)
    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = fake_stub(WatchIntent=watch)
        events = list(client.watch(ID))
    assert [e.seq for e in events] == [1, 2, 3]
    assert watch.after == [0, 2, 2]
    assert all(s.cancelled for s in streams)


def test_sync_watch_raises_other_errors() -> None:
    watch = FakeWatch([FakeStream([event_msg(1)], grpc.StatusCode.NOT_FOUND)])
    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = fake_stub(WatchIntent=watch)
        seen = []
        with pytest.raises(NotFound):
            for event in client.watch(ID):
                seen.append(event.seq)
    assert seen == [1]


def test_sync_wait_for_chains_calls() -> None:
    pending = pb.WaitIntentResponse(intent=make_intent(state=intent_pb2.INTENT_STATE_PENDING))
    done = pb.WaitIntentResponse(
        intent=make_intent(state=intent_pb2.INTENT_STATE_CANCELED, cancel_reason="stop"),
        terminal=True,
    )
    wait = FakeUnary(None, [])
    answers = [pending, done]

    async def wait_intent(request: Any, *, timeout: float | None, metadata: Any) -> Any:
        wait.calls.append((request, timeout))
        return answers.pop(0)

    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = fake_stub(WaitIntent=wait_intent)
        with pytest.raises(IntentCanceled, match="stop"):
            client.wait_for(ID, raise_on_failure=True)
    assert len(wait.calls) == 2
    assert all(0 < r.timeout_ms <= WAIT_SLICE_SECONDS * 1000 for r, _ in wait.calls)


def test_sync_iter_intents_follows_pages() -> None:
    pages = [
        pb.ListIntentsResponse(intents=[make_intent(id="a" * 26)], next_page_token="p2"),
        pb.ListIntentsResponse(intents=[make_intent(id="b" * 26)], next_page_token=""),
    ]
    tokens: list[str] = []

    async def list_intents(request: Any, *, timeout: float | None, metadata: Any) -> Any:
        tokens.append(request.page_token)
        return pages.pop(0)

    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = fake_stub(ListIntents=list_intents)
        ids = [i.id for i in client.iter_intents(states="FAILED", page_size=1)]
    assert ids == ["a" * 26, "b" * 26]
    assert tokens == ["", "p2"]


def test_empty_batch_makes_no_call() -> None:
    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = fake_stub()
        assert client.send_intents([]) == []


def test_async_client_builds_outside_a_loop() -> None:
    client = AsyncIntentClient("127.0.0.1:1")
    assert client.target == "127.0.0.1:1"
    assert client._channel is None


async def test_async_client_retries_and_maps_errors() -> None:
    async with AsyncIntentClient("127.0.0.1:1", max_retries=2, **FAST) as client:
        send = FakeAsyncUnary(pb.SendIntentResponse(intent=make_intent(), created=False), [U, U])
        client._stub_instance = fake_stub(SendIntent=send)
        assert await client.send_intent(base()) == ID
        assert len({r.intent.idempotency_key for r, _ in send.calls}) == 1
        get = FakeAsyncUnary(None, [U, U, U])
        client._stub_instance = fake_stub(GetIntent=get)
        with pytest.raises(Unavailable):
            await client.get(ID)
        assert len(get.calls) == 3
        cancel = FakeAsyncUnary(None, [grpc.StatusCode.FAILED_PRECONDITION])
        client._stub_instance = fake_stub(CancelIntent=cancel)
        with pytest.raises(FailedPrecondition):
            await client.cancel(ID)


async def test_async_watch_reconnects_after_the_last_seq() -> None:
    watch = FakeWatch(
        [
            FakeStream([event_msg(1)], U),
            FakeStream([event_msg(1), event_msg(2, intent_pb2.INTENT_STATE_COMPLETED)], None),
        ]
    )
    async with AsyncIntentClient("127.0.0.1:1", **FAST) as client:
        client._stub_instance = fake_stub(WatchIntent=watch)
        events = [e async for e in client.watch(ID)]
    assert [e.seq for e in events] == [1, 2]
    assert events[-1].terminal
    assert watch.after == [0, 1]


async def test_async_wait_for_times_out() -> None:
    pending = pb.WaitIntentResponse(intent=make_intent(state=intent_pb2.INTENT_STATE_PENDING))
    async with AsyncIntentClient("127.0.0.1:1", **FAST) as client:
        client._stub_instance = fake_stub(WaitIntent=FakeAsyncUnary(pending, []))
        with pytest.raises(WaitTimeout) as info:
            await client.wait_for(ID, timeout=0)
    assert isinstance(info.value.intent, Intent)


# ---------------------------------------------------------------- one implementation: the loop thread


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("intentd-client-")]


class BlockingUnary:
    """Never answers; records whether the call was cancelled."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()

    async def __call__(self, request: Any, *, timeout: float | None, metadata: Any) -> Any:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def test_sync_client_starts_its_thread_at_first_use_and_stops_it_on_close() -> None:
    before = client_threads()
    client = IntentClient("127.0.0.1:1", **FAST)
    assert client_threads() == before  # built, never used: no thread
    client._aio._stub_instance = fake_stub(GetIntent=FakeAsyncUnary(pb.GetIntentResponse(intent=make_intent()), []))
    assert client.get(ID).id == ID
    assert len(client_threads()) == len(before) + 1
    client.close()
    client.close()  # idempotent
    assert client_threads() == before
    with pytest.raises(RuntimeError, match="closed"):
        client.get(ID)


def test_an_unclosed_sync_client_is_cleaned_up_when_collected() -> None:
    before = client_threads()
    client = IntentClient("127.0.0.1:1", **FAST)
    client._aio._stub_instance = fake_stub(GetIntent=FakeAsyncUnary(pb.GetIntentResponse(intent=make_intent()), []))
    client.get(ID)
    del client
    gc.collect()
    assert client_threads() == before


def test_close_ends_calls_of_other_threads() -> None:
    blocking = BlockingUnary()
    client = IntentClient("127.0.0.1:1", **FAST)
    client._aio._stub_instance = fake_stub(GetIntent=blocking)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.get(ID)
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert blocking.started.wait(5)
    client.close()
    caller.join(5)
    assert not caller.is_alive()
    assert blocking.cancelled.is_set()
    assert len(errors) == 1 and isinstance(errors[0], Cancelled), errors


def test_interrupting_a_blocking_call_cancels_it() -> None:
    blocking = BlockingUnary()
    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = fake_stub(WaitIntent=blocking)

        def interrupt() -> None:
            blocking.started.wait(5)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

        threading.Thread(target=interrupt).start()
        with pytest.raises(KeyboardInterrupt):
            client.wait_for(ID)
        assert blocking.cancelled.wait(5)


def test_leaving_a_sync_watch_early_cancels_the_stream() -> None:
    stream = FakeStream([event_msg(1), event_msg(2)], None)
    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = fake_stub(WatchIntent=FakeWatch([stream]))
        for event in client.watch(ID):
            assert event.seq == 1
            break
        gc.collect()
        assert stream.cancelled


REQUEST_TAG: contextvars.ContextVar[str] = contextvars.ContextVar("request_tag", default="")


def test_sync_calls_run_in_the_callers_context() -> None:
    seen: list[str] = []

    async def get(request: Any, *, timeout: float | None, metadata: Any) -> Any:
        seen.append(REQUEST_TAG.get())
        return pb.GetIntentResponse(intent=make_intent())

    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = fake_stub(GetIntent=get)
        token = REQUEST_TAG.set("from the caller")
        try:
            client.get(ID)
        finally:
            REQUEST_TAG.reset(token)
        client.get(ID)
    assert seen == ["from the caller", ""]


# ---------------------------------------------------------------- typed sends and handles


def test_typed_keywords_and_the_dict_form_build_the_same_request() -> None:
    send = FakeAsyncUnary(pb.SendIntentResponse(intent=make_intent(), created=True), [])
    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = fake_stub(SendIntent=send)
        assert client.send_intent(base(labels={"a": "b"}, max_attempts=4, idempotency_key="k")) == ID
        assert client.send_intent(intent_type=TYPE, to_agent=AGENT, payload={"n": 1}, labels={"a": "b"},
                                  max_attempts=4, idempotency_key="k") == ID
    first, second = (request for request, _ in send.calls)
    assert first == second
    with pytest.raises(TypeError, match="paylod"):
        build_spec(base(), paylod=1)  # type: ignore[call-arg]


def test_sync_handle() -> None:
    done = make_intent(state=intent_pb2.INTENT_STATE_COMPLETED, result=b'{"rows":3}')
    failed = make_intent(state=intent_pb2.INTENT_STATE_FAILED)
    send = FakeAsyncUnary(pb.SendIntentResponse(intent=make_intent(), created=True), [])
    waits = [pb.WaitIntentResponse(intent=done, terminal=True), pb.WaitIntentResponse(intent=failed, terminal=True)]
    cancel = FakeAsyncUnary(pb.CancelIntentResponse(intent=make_intent(state=intent_pb2.INTENT_STATE_CANCELED)), [])

    async def wait_intent(request: Any, *, timeout: float | None, metadata: Any) -> Any:
        assert request.id == ID
        return waits.pop(0)

    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = fake_stub(
            SendIntent=send,
            WaitIntent=wait_intent,
            CancelIntent=cancel,
            GetIntent=FakeAsyncUnary(pb.GetIntentResponse(intent=done), []),
            WatchIntent=FakeWatch([FakeStream([event_msg(1, intent_pb2.INTENT_STATE_COMPLETED)], None)]),
        )
        handle = client.start(base())
        assert (handle.id, handle.created) == (ID, True)
        assert handle.result(timeout=5) == {"rows": 3}
        with pytest.raises(IntentFailed):
            handle.result()
        assert handle.get().state is IntentState.COMPLETED
        assert [e.seq for e in handle.watch()] == [1]
        assert handle.cancel("stop").state is IntentState.CANCELED
        assert cancel.calls[0][0].reason == "stop"
        assert client.handle("other").id == "other"
        assert client.handle("other").created is None


async def test_async_handle() -> None:
    done = make_intent(state=intent_pb2.INTENT_STATE_COMPLETED, result=b"7")
    async with AsyncIntentClient("127.0.0.1:1", **FAST) as client:
        client._stub_instance = fake_stub(
            SendIntent=FakeAsyncUnary(pb.SendIntentResponse(intent=make_intent(), created=False), []),
            WaitIntent=FakeAsyncUnary(pb.WaitIntentResponse(intent=done, terminal=True), []),
            RetryIntent=FakeAsyncUnary(pb.RetryIntentResponse(intent=make_intent()), []),
            ListIntentSteps=FakeAsyncUnary(pb.ListIntentStepsResponse(), []),
        )
        handle = await client.start(intent_type=TYPE, to_agent=AGENT)
        assert (handle.id, handle.created) == (ID, False)
        assert await handle.result() == 7
        assert (await handle.wait()).state is IntentState.COMPLETED
        assert (await handle.retry(2)).id == ID
        assert await handle.steps() == []


# ---------------------------------------------------------------- admin calls


def test_intent_type_admin_calls() -> None:
    from intentd.generated.v1 import admin_service_pb2 as admin_pb

    stored = admin_pb.IntentType(intent_type=TYPE, max_attempts=5, retry_backoff_ms=100, update_time=ts(T0))
    put = FakeAsyncUnary(admin_pb.PutIntentTypeResponse(intent_type=stored), [U])
    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._admin_instance = fake_stub(
            PutIntentType=put,
            GetIntentType=FakeAsyncUnary(admin_pb.GetIntentTypeResponse(intent_type=stored), []),
            ListIntentTypes=FakeAsyncUnary(admin_pb.ListIntentTypesResponse(intent_types=[stored, stored]), []),
        )
        got = client.put_intent_type(IntentType(intent_type=TYPE, max_attempts=5))
        assert len(put.calls) == 2  # retried on UNAVAILABLE like every unary call
        sent = put.calls[0][0].intent_type
        assert (sent.intent_type, sent.max_attempts, sent.retry_backoff_ms, sent.heartbeat_timeout_ms) == (
            TYPE, 5, 100, 0)
        assert got == IntentType(intent_type=TYPE, max_attempts=5, update_time=T0)
        assert got.proto == stored
        assert client.get_intent_type(TYPE).max_attempts == 5
        assert [t.intent_type for t in client.list_intent_types()] == [TYPE, TYPE]


# ---------------------------------------------------------------- errors under intentd's root


def test_every_client_error_is_a_client_error_with_a_code() -> None:
    import intentd.client as client_pkg
    from intentd.core.errors import IntentdError as Root

    assert client_pkg.IntentdError is Root
    assert issubclass(ClientError, Root)
    error_classes = [
        obj for obj in vars(client_pkg).values()
        if isinstance(obj, type) and issubclass(obj, BaseException) and obj is not Root
    ]
    assert len(error_classes) >= 16
    for cls in error_classes:
        assert issubclass(cls, ClientError), cls
        assert isinstance(cls.code, grpc.StatusCode), cls


# ---------------------------------------------------------------- api_key, TLS and the environment


def test_api_key_goes_into_the_metadata_beside_the_callers() -> None:
    with IntentClient("127.0.0.1:1", api_key="k1.secret", metadata=[("x-team", "a")]) as client:
        assert client._settings.call_metadata == (("x-team", "a"), ("authorization", "Bearer k1.secret"))
    with pytest.raises(SettingsError, match="api_key"):
        IntentClient("127.0.0.1:1", api_key="two\nlines")
    with IntentClient("127.0.0.1:1", api_key="") as client:
        assert client._settings.call_metadata is None


def pem_files(tmp_path: Path) -> dict[str, Path]:
    # grpc reads PEM only when it connects; made-up contents do for the checks here.
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    return files


def test_tls_files_make_channel_credentials(tmp_path: Path) -> None:
    files = pem_files(tmp_path)
    with IntentClient("h:1", tls_ca_file=files["ca"]) as client:
        assert isinstance(client._settings.credentials, grpc.ChannelCredentials)
    mutual = AsyncIntentClient("h:1", tls_ca_file=str(files["ca"]), tls_cert_file=files["cert"],
                               tls_key_file=files["key"])
    assert mutual._settings.credentials is not None
    assert IntentClient("h:1")._settings.credentials is None
    with pytest.raises(SettingsError, match="tls_cert_file and tls_key_file go together"):
        IntentClient("h:1", tls_ca_file=files["ca"], tls_cert_file=files["cert"])
    with pytest.raises(SettingsError, match=r"^tls_ca_file: cannot read .*missing\.pem"):
        IntentClient("h:1", tls_ca_file=tmp_path / "missing.pem")
    with pytest.raises(SettingsError, match="not both"):
        IntentClient("h:1", tls_ca_file=files["ca"], credentials=grpc.ssl_channel_credentials())


def test_from_env(tmp_path: Path) -> None:
    files = pem_files(tmp_path)
    key_file = tmp_path / "key.txt"
    key_file.write_text("k2.from-file\n")
    client = IntentClient.from_env({}, sender="svc")
    assert client.target == "127.0.0.1:7300"
    assert client._settings.sender == "svc"
    assert client._settings.call_metadata is None and client._settings.credentials is None
    env = {"INTENTD_TARGET": "cp.example:7300", "INTENTD_API_KEY_FILE": str(key_file),
           "INTENTD_TLS_CA_FILE": str(files["ca"]), "INTENTD_TLS_CERT_FILE": str(files["cert"]),
           "INTENTD_TLS_KEY_FILE": str(files["key"])}
    aio = AsyncIntentClient.from_env(env, timeout=5)
    assert isinstance(aio, AsyncIntentClient)
    assert aio.target == "cp.example:7300"
    assert aio._settings.timeout == 5
    assert aio._settings.call_metadata == (("authorization", "Bearer k2.from-file"),)
    assert aio._settings.credentials is not None
    assert IntentClient.from_env({"INTENTD_API_KEY": "k3"})._settings.call_metadata == (
        ("authorization", "Bearer k3"),)


@pytest.mark.parametrize(
    ("env", "variable", "words"),
    [
        ({"INTENTD_TARGET": " "}, "INTENTD_TARGET", "empty"),
        ({"INTENTD_API_KEY": "a", "INTENTD_API_KEY_FILE": "/x"}, "INTENTD_API_KEY", "not both"),
        ({"INTENTD_API_KEY_FILE": "/nonexistent/key"}, "INTENTD_API_KEY_FILE", "cannot read"),
        ({"INTENTD_TLS_CA_FILE": "/nonexistent/ca.pem"}, "INTENTD_TLS_CA_FILE", "cannot read"),
        ({"INTENTD_TLS_KEY_FILE": "/nonexistent/k.pem"}, "INTENTD_TLS_CERT_FILE", "go together"),
    ],
)
def test_from_env_names_the_bad_variable(env: dict[str, str], variable: str, words: str) -> None:
    with pytest.raises(SettingsError) as info:
        IntentClient.from_env(env)
    assert str(info.value).startswith(variable) and words in str(info.value)
