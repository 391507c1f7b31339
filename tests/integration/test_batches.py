"""Batch frames on the sidecar stream (docs/protocol.md, Connect step 8):
negotiated at registration, unpacked in order, never sent to a sidecar that
did not ask for them, and a nested batch is refused."""

from __future__ import annotations

import grpc
import pytest

from intentd.client import IntentClient, IntentState
from intentd.generated.v1 import agent_service_pb2 as apb
from intentd.generated.v1 import delivery_pb2
from tests.support import RawSidecar

TYPE = "intent.batches.noop.v1"


def _send(server, agent_address: str, n: int) -> list[str]:
    with IntentClient(server.address) as client:
        return client.send_intents([{"intent_type": TYPE, "to_agent": agent_address, "payload": i}
                                    for i in range(n)])


def _assignments(sidecar: RawSidecar, n: int) -> list[delivery_pb2.Assignment]:
    return [sidecar.recv("assignment") for _ in range(n)]


@pytest.mark.parametrize("batches", [True, False])
def test_assignments_queued_together_go_as_one_frame_only_to_a_sidecar_that_takes_batches(
    server, agent_address, batches: bool
) -> None:
    ids = _send(server, agent_address, 20)
    sidecar = RawSidecar(server.address, agent_address, capacity=20, batches=batches)
    try:
        assert sidecar.registered.accepts_batches
        got = _assignments(sidecar, 20)
        assert sorted(a.intent.id for a in got) == sorted(ids)
        # One claim queues all 20 before the stream's writer runs: they leave
        # in one frame (with a ping, should one have been queued meanwhile).
        if batches:
            assert sidecar.frames and max(sidecar.frames) >= 20, sidecar.frames
        else:
            assert sidecar.frames == []
    finally:
        sidecar.close()


def test_a_batch_is_applied_in_order(server, agent_address) -> None:
    (intent_id,) = _send(server, agent_address, 1)
    sidecar = RawSidecar(server.address, agent_address, capacity=1, batches=True)
    try:
        (assignment,) = _assignments(sidecar, 1)
        lease = assignment.lease
        # The ack, the step and the completion of an attempt back to back in
        # one frame, as a busy sidecar sends them.
        sidecar.send(batch=apb.ConnectRequestBatch(messages=[
            apb.ConnectRequest(ack=delivery_pb2.AckAssignment(lease=lease)),
            apb.ConnectRequest(write=apb.WriteRequest(request_id=1, write=delivery_pb2.IntentWrite(
                lease=lease, step=delivery_pb2.StepWrite(index=1, name="only", result=b"1")))),
            apb.ConnectRequest(write=apb.WriteRequest(request_id=2, write=delivery_pb2.IntentWrite(
                lease=lease, complete=delivery_pb2.CompleteWrite(result=b'"done"')))),
        ]))
        results = {r.request_id: r for r in (sidecar.recv("write_result") for _ in range(2))}
        # The completion may not overtake the step: the step commits first.
        assert (results[1].code, results[1].step.name) == (0, "only"), results[1]
        assert results[2].code == 0, results[2]
    finally:
        sidecar.close()
    with IntentClient(server.address) as client:
        final = client.get(intent_id)
        events = [e.type for e in client.watch(intent_id)]
    assert (final.state, final.result, final.steps_completed) == (IntentState.COMPLETED, "done", 1)
    assert events == ["CREATED", "DELIVERED", "ACKNOWLEDGED", "STEP_COMPLETED", "COMPLETED"]


def test_a_batch_inside_a_batch_ends_the_stream_as_invalid(server, agent_address) -> None:
    sidecar = RawSidecar(server.address, agent_address, capacity=0, batches=True)
    try:
        inner = apb.ConnectRequest(batch=apb.ConnectRequestBatch(messages=[
            apb.ConnectRequest(ping=apb.Ping(nonce=1))]))
        sidecar.send(batch=apb.ConnectRequestBatch(messages=[inner]))
        with pytest.raises(grpc.RpcError) as ended:
            sidecar.recv("pong")
        assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch" in (ended.value.details() or "")
    finally:
        sidecar.close()
