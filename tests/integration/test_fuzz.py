"""Property-based abuse of every RPC of both services: random and malformed
messages get a proper status, the server stays up, the database stays
consistent."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intentd.generated.v1 import agent_service_pb2 as apb
from intentd.generated.v1 import agent_service_pb2_grpc as apb_grpc
from intentd.generated.v1 import delivery_pb2
from intentd.generated.v1 import intent_service_pb2 as pb
from intentd.generated.v1 import intent_service_pb2_grpc as pb_grpc
from tests.support import health_ok, run_sync

# Statuses a well-formed server may answer bad input with. Never INTERNAL or UNKNOWN.
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

nasty_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "intent.a.v1", "agent://a/b/c", "agent://A/B/C", "agent://a/b/c/d", "\x00",
                     "x" * 5000, "intent..v1", "💥.boom.v1", "agent://a/b/" + "c" * 300]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
payloads = st.one_of(
    st.binary(max_size=200),  # often invalid UTF-8 or not JSON
    json_values.map(lambda v: __import__("json").dumps(v).encode()),
    st.integers(1, 400).map(lambda depth: b"[" * depth + b"]" * depth),
    st.just(b'{"a": NaN}'),
    st.just(b'"\\u0000"'),
)


@pytest.fixture(scope="module")
def stubs(server) -> Iterator[tuple[pb_grpc.IntentServiceStub, apb_grpc.AgentServiceStub]]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.IntentServiceStub(channel), apb_grpc.AgentServiceStub(channel)


def _expect_ok_or_client_error(call, *args, **kwargs):
    try:
        return call(*args, timeout=10, **kwargs)
    except grpc.RpcError as err:
        assert err.code() in CLIENT_ERRORS, (err.code(), err.details())
        assert err.details()
        return None


@FUZZ
@given(
    intent_type=nasty_text, to_agent=nasty_text, payload=payloads, key=nasty_text,
    labels=st.dictionaries(nasty_text, nasty_text, max_size=3),
    max_attempts=st.integers(-(2**31), 2**31 - 1),
    deadline_seconds=st.one_of(st.none(), st.integers(-(2**40), 2**40)),
    deadline_nanos=st.integers(-(2**31), 2**31 - 1),
)
def test_send_intent(stubs, intent_type, to_agent, payload, key, labels, max_attempts, deadline_seconds,
                     deadline_nanos) -> None:
    intents, _ = stubs
    spec = pb.IntentSpec(intent_type=intent_type, to_agent=to_agent, payload=payload, idempotency_key=key,
                         labels=labels, max_attempts=max_attempts, sender="fuzz")
    if deadline_seconds is not None:
        spec.deadline.seconds = deadline_seconds
        spec.deadline.nanos = deadline_nanos
    _expect_ok_or_client_error(intents.SendIntent, pb.SendIntentRequest(intent=spec))


@FUZZ
@given(
    intent_id=nasty_text, after_seq=st.integers(-(2**63), 2**63 - 1), timeout_ms=st.integers(-(2**63), 100),
    page_size=st.integers(-(2**31), 2**31 - 1), page_token=nasty_text,
    states=st.lists(st.integers(-5, 20), max_size=3), extra=st.integers(-(2**31), 2**31 - 1),
    reason=nasty_text,
)
def test_read_and_change_rpcs(stubs, intent_id, after_seq, timeout_ms, page_size, page_token, states, extra,
                              reason) -> None:
    intents, _ = stubs
    _expect_ok_or_client_error(intents.GetIntent, pb.GetIntentRequest(id=intent_id))
    _expect_ok_or_client_error(intents.WaitIntent, pb.WaitIntentRequest(id=intent_id, timeout_ms=timeout_ms))
    _expect_ok_or_client_error(intents.CancelIntent, pb.CancelIntentRequest(id=intent_id, reason=reason))
    _expect_ok_or_client_error(intents.RetryIntent, pb.RetryIntentRequest(id=intent_id, extra_attempts=extra))
    _expect_ok_or_client_error(intents.ListIntentSteps, pb.ListIntentStepsRequest(id=intent_id))
    _expect_ok_or_client_error(intents.ListIntents, pb.ListIntentsRequest(
        states=states, page_size=page_size, page_token=page_token, to_agent=intent_id))
    try:
        for _ in intents.WatchIntent(pb.WatchIntentRequest(id=intent_id, after_seq=after_seq), timeout=5):
            break
    except grpc.RpcError as err:
        assert err.code() in CLIENT_ERRORS | {grpc.StatusCode.DEADLINE_EXCEEDED}, err.details()


@FUZZ
@given(raw=st.binary(max_size=300))
def test_undecodable_requests_are_invalid_argument(server, raw) -> None:
    with grpc.insecure_channel(server.address) as channel:
        for method in ("SendIntent", "GetIntent", "ListIntents", "CancelIntent"):
            call = channel.unary_unary(f"/intentd.v1.IntentService/{method}")
            try:
                call(raw, timeout=10)
            except grpc.RpcError as err:
                assert err.code() in CLIENT_ERRORS, (method, err.code(), err.details())


def _lease(intent_id: str, attempt: int, token: str) -> delivery_pb2.Lease:
    return delivery_pb2.Lease(intent_id=intent_id, attempt=attempt, token=token)


writes = st.builds(
    lambda op, intent_id, attempt, token, index, name, data, fraction, retryable: delivery_pb2.IntentWrite(
        lease=_lease(intent_id, attempt, token),
        **{
            "step": {"step": delivery_pb2.StepWrite(index=index, name=name, result=data)},
            "checkpoint": {"checkpoint": delivery_pb2.CheckpointWrite(state=data)},
            "progress": {"progress": delivery_pb2.ProgressWrite(message=name, fraction=fraction)},
            "complete": {"complete": delivery_pb2.CompleteWrite(result=data)},
            "fail": {"fail": delivery_pb2.FailWrite(code=name, message=name, retryable=retryable)},
            "release": {"release": delivery_pb2.ReleaseWrite(reason=name)},
            "none": {},
        }[op],
    ),
    op=st.sampled_from(["step", "checkpoint", "progress", "complete", "fail", "release", "none"]),
    intent_id=nasty_text, attempt=st.integers(-(2**31), 2**31 - 1),
    token=st.one_of(nasty_text, st.builds(lambda: str(uuid.uuid4()))),
    index=st.integers(-(2**31), 2**31 - 1), name=nasty_text, data=payloads,
    fraction=st.floats(allow_nan=True, allow_infinity=True), retryable=st.booleans(),
)


@FUZZ
@given(
    addresses=st.lists(nasty_text, max_size=3), types=st.lists(nasty_text, max_size=2),
    capacity=st.integers(-(2**31), 2**31 - 1), batch=st.lists(writes, max_size=6),
    held=st.lists(st.builds(_lease, nasty_text, st.integers(-5, 5), nasty_text), max_size=3),
)
def test_sidecar_stream_with_garbage(stubs, addresses, types, capacity, batch, held) -> None:
    _, agents = stubs
    requests = [apb.ConnectRequest(register=apb.Register(
        sidecar_id="fuzz", addresses=addresses, intent_types=types, capacity=capacity, held=held))]
    requests += [apb.ConnectRequest(write=apb.WriteRequest(request_id=i + 1, write=w)) for i, w in enumerate(batch)]
    answered: set[int] = set()
    try:
        for reply in agents.Connect(iter(requests), timeout=10):
            kind = reply.WhichOneof("msg")
            if kind == "write_result":
                code = grpc.StatusCode.OK if reply.write_result.code == 0 else next(
                    c for c in grpc.StatusCode if c.value[0] == reply.write_result.code)
                assert code in CLIENT_ERRORS | {grpc.StatusCode.OK}, reply.write_result
                answered.add(reply.write_result.request_id)
    except grpc.RpcError as err:
        assert err.code() in CLIENT_ERRORS | {grpc.StatusCode.CANCELLED}, (err.code(), err.details())


def test_server_alive_and_database_consistent_after_the_fuzz(server, database_url) -> None:
    import asyncpg

    assert health_ok(server.address)

    async def gaps() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return int(await conn.fetchval(
                "SELECT count(*) FROM intents i WHERE i.last_seq <> (SELECT count(*) FROM intent_events e"
                " WHERE e.intent_id = i.id) OR i.last_seq <> (SELECT coalesce(max(seq), 0) FROM intent_events e"
                " WHERE e.intent_id = i.id)"))
        finally:
            await conn.close()

    assert run_sync(gaps()) == 0


def test_someone_elses_live_lease_is_refused(server, agent_address) -> None:
    from intentd.client import IntentClient
    from tests.support import RawSidecar

    with IntentClient(server.address) as client:
        intent_id = client.send_intent(intent_type="intent.fuzz.lease.v1", to_agent=agent_address, payload={})
    owner = RawSidecar(server.address, agent_address, capacity=1, sidecar_id="owner")
    thief = RawSidecar(server.address, agent_address, capacity=0, sidecar_id="thief")
    try:
        assignment = owner.recv("assignment")
        assert assignment.intent.id == intent_id
        owner.send(ack=delivery_pb2.AckAssignment(lease=assignment.lease))
        step = delivery_pb2.IntentWrite(lease=assignment.lease, step=delivery_pb2.StepWrite(
            index=1, name="extract", result=b"1"))
        stolen = thief.write(1, step)
        assert stolen.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], stolen
        done = thief.write(2, delivery_pb2.IntentWrite(lease=assignment.lease,
                                                       complete=delivery_pb2.CompleteWrite(result=b"{}")))
        assert done.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], done
        # The holder's own writes go through.
        assert owner.write(1, step).code == 0
        assert owner.write(2, delivery_pb2.IntentWrite(
            lease=assignment.lease, complete=delivery_pb2.CompleteWrite(result=b'"ok"'))).code == 0
    finally:
        owner.close()
        thief.close()
    with IntentClient(server.address) as client:
        final = client.get(intent_id)
    assert final.result == "ok" and final.steps_completed == 1


@FUZZ
@given(batch=st.lists(writes, min_size=1, max_size=8))
def test_registered_stream_with_garbage_writes(server, batch) -> None:
    from tests.support import RawSidecar

    sidecar = RawSidecar(server.address, f"agent://fuzz/{uuid.uuid4().hex[:8]}/x", capacity=0)
    try:
        for i, write in enumerate(batch, start=1):
            result = sidecar.write(i, write)
            code = next(c for c in grpc.StatusCode if c.value[0] == result.code)
            assert code in CLIENT_ERRORS | {grpc.StatusCode.OK}, result
            assert code is not grpc.StatusCode.OK or write.WhichOneof("op") is None or False, result
    finally:
        sidecar.close()


def test_oversized_messages_are_resource_exhausted_and_the_server_lives_on(make_server, agent_address) -> None:
    srv = make_server(max_payload_bytes=64 * 1024, max_message_bytes=256 * 1024)
    with grpc.insecure_channel(srv.address, options=[("grpc.max_send_message_length", 8 * 1024 * 1024)]) as channel:
        stub = pb_grpc.IntentServiceStub(channel)
        huge = pb.SendIntentRequest(intent=pb.IntentSpec(
            intent_type="intent.fuzz.big.v1", to_agent=agent_address, payload=b'"' + b"x" * (1024 * 1024) + b'"'))
        with pytest.raises(grpc.RpcError) as err:
            stub.SendIntent(huge, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stub.ListIntents(pb.ListIntentsRequest(page_size=1), timeout=10)
    assert health_ok(srv.address)
