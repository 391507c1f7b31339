"""Child intents through a real server and hand-driven sidecar streams: a
start and an AGENT wait over the wire, the hold window answering a parent
whose children finish fast (no park, no redelivery), the cascade revoking a
running child's lease at its sidecar, and the client API's view of a
family (GetIntent, ListIntents by parent, CHILD_* events)."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from intentd.client import IntentClient
from intentd.core.waits import AGENT, ALL, record_name, start_record_name
from intentd.generated.v1 import delivery_pb2, intent_pb2, intent_service_pb2, intent_service_pb2_grpc
from tests.support import RawSidecar, sql

PARENT = "intent.family.parent.v1"
CHILD = "intent.family.child.v1"


def _start(lease: Any, index: int, address: str, count: int, **kw: Any) -> delivery_pb2.IntentWrite:
    return delivery_pb2.IntentWrite(lease=lease, start_children=delivery_pb2.StartChildrenWrite(
        index=index, step_name=start_record_name(CHILD), children=[
            delivery_pb2.ChildSpec(to_agent=address, intent_type=CHILD, payload=json.dumps({"n": n}).encode(), **kw)
            for n in range(count)]))


def _gather(lease: Any, index: int, ids: list[str], timeout_ms: int = 0) -> delivery_pb2.IntentWrite:
    return delivery_pb2.IntentWrite(lease=lease, wait=delivery_pb2.WaitWrite(
        index=index, step_name=record_name(AGENT, ALL), kind=intent_pb2.WAIT_KIND_AGENT, timeout_ms=timeout_ms,
        children=delivery_pb2.ChildWait(intent_ids=ids, mode=delivery_pb2.CHILD_WAIT_MODE_ALL)))


def _child_ids(result: Any) -> list[str]:
    assert result.code == 0, result
    return [c["id"] for c in json.loads(result.step.result)["children"]]


def _complete(raw: RawSidecar, request_id: int) -> str:
    assignment = raw.recv("assignment")
    raw.send(ack=delivery_pb2.AckAssignment(lease=assignment.lease))
    done = raw.write(request_id, delivery_pb2.IntentWrite(lease=assignment.lease, complete=delivery_pb2.CompleteWrite(
        result=json.dumps({"child": json.loads(assignment.intent.payload)}).encode())))
    assert done.code == 0, done
    return str(assignment.lease.intent_id)


def test_a_held_gather_is_answered_when_fast_children_finish(server, database_url, agent_address) -> None:
    workers = f"{agent_address}-w"
    with IntentClient(server.address) as client:
        parent_id = client.send_intent(intent_type=PARENT, to_agent=agent_address, payload={})
    sql(database_url, "UPDATE intents SET wait_hold_ms = 30000 WHERE id = $1", parent_id)
    parent = RawSidecar(server.address, agent_address, ping_every=0.2)
    worker = RawSidecar(server.address, workers, capacity=2, sidecar_id="workers", ping_every=0.2)
    try:
        lease = parent.recv("assignment").lease
        parent.send(ack=delivery_pb2.AckAssignment(lease=lease))
        ids = _child_ids(parent.write(1, _start(lease, 1, workers, 2)))
        # Repeated (an answer lost): the same children.
        assert _child_ids(parent.write(2, _start(lease, 1, workers, 2))) == ids
        parent.send(write=parent.apb.WriteRequest(request_id=3, write=_gather(lease, 2, ids)))
        finished = {_complete(worker, 10), _complete(worker, 11)}
        assert finished == set(ids)
        answer = parent.recv("write_result", timeout=15)
        while answer.request_id != 3:
            answer = parent.recv("write_result", timeout=15)
        assert answer.code == 0 and not answer.wait.parked, answer
        value = json.loads(answer.wait.step.result)
        assert [c["id"] for c in value["children"]] == ids
        assert [c["result"] for c in value["children"]] == [{"child": {"n": 0}}, {"child": {"n": 1}}]
        (row,) = sql(database_url, "SELECT state::text, parked_attempts, attempt FROM intents WHERE id = $1",
                      parent_id)
        assert tuple(row) == ("IN_PROGRESS", 0, 1)  # the hold window: no park, no redelivery
    finally:
        parent.close()
        worker.close()
    stub = intent_service_pb2_grpc.IntentServiceStub(grpc.insecure_channel(server.address))
    child = stub.GetIntent(intent_service_pb2.GetIntentRequest(id=ids[0])).intent
    assert (child.parent_id, child.parent_step_index, child.detached) == (parent_id, 1, False)
    assert stub.GetIntent(intent_service_pb2.GetIntentRequest(id=parent_id)).intent.child_count == 2
    listed = stub.ListIntents(intent_service_pb2.ListIntentsRequest(parent_id=parent_id, page_size=1))
    assert [i.id for i in listed.intents] == ids[:1] and listed.next_page_token
    rest = stub.ListIntents(intent_service_pb2.ListIntentsRequest(parent_id=parent_id,
                                                                 page_token=listed.next_page_token))
    assert [i.id for i in rest.intents] == ids[1:] and not rest.next_page_token
    with pytest.raises(grpc.RpcError) as bad:
        stub.ListIntents(intent_service_pb2.ListIntentsRequest(parent_id="nope"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    rows = sql(database_url, "SELECT type, child_id, child_state FROM intent_events WHERE intent_id = $1 "
                "AND type LIKE 'CHILD_%' ORDER BY seq", parent_id)
    assert [(r["type"], r["child_id"], r["child_state"]) for r in rows[:2]] == [
        ("CHILD_STARTED", ids[0], "PENDING"), ("CHILD_STARTED", ids[1], "PENDING")]
    assert {(r["type"], r["child_id"], r["child_state"]) for r in rows[2:]} == {
        ("CHILD_FINISHED", ids[0], "COMPLETED"), ("CHILD_FINISHED", ids[1], "COMPLETED")}


def test_canceling_a_parent_revokes_its_running_childs_lease(server, database_url, agent_address) -> None:
    workers = f"{agent_address}-w"
    with IntentClient(server.address) as client:
        parent_id = client.send_intent(intent_type=PARENT, to_agent=agent_address, payload={})
        parent = RawSidecar(server.address, agent_address, ping_every=0.2)
        worker = RawSidecar(server.address, workers, capacity=3, sidecar_id="workers", ping_every=0.2)
        try:
            lease = parent.recv("assignment").lease
            parent.send(ack=delivery_pb2.AckAssignment(lease=lease))
            ids = _child_ids(parent.write(1, _start(lease, 1, workers, 3)))
            running = []
            for _ in ids:
                assignment = worker.recv("assignment")
                worker.send(ack=delivery_pb2.AckAssignment(lease=assignment.lease))
                running.append(assignment.lease.intent_id)
            assert sorted(running) == sorted(ids)
            client.cancel(parent_id, reason="operator")
            revoked = {worker.recv("revocation", timeout=15).lease.intent_id for _ in ids}
            assert revoked == set(ids)
            assert parent.recv("revocation", timeout=15).lease.intent_id == parent_id
        finally:
            parent.close()
            worker.close()
    states = sql(database_url, "SELECT state::text, cancel_reason FROM intents WHERE parent_id = $1", parent_id)
    assert {(r["state"], r["cancel_reason"]) for r in states} == {("CANCELED", f"parent {parent_id} ended CANCELED")}


def test_hostile_family_writes_get_clear_codes(server, database_url, agent_address) -> None:
    with IntentClient(server.address) as client:
        client.send_intent(intent_type=PARENT, to_agent=agent_address, payload={})
        stranger = client.send_intent(intent_type=PARENT, to_agent=f"{agent_address}-x", payload={})
    parent = RawSidecar(server.address, agent_address, ping_every=0.2)
    try:
        lease = parent.recv("assignment").lease
        parent.send(ack=delivery_pb2.AckAssignment(lease=lease))
        invalid = 3  # INVALID_ARGUMENT
        too_many = _start(lease, 1, f"{agent_address}-w", 1001)
        assert parent.write(1, too_many).code == invalid
        assert parent.write(2, _start(lease, 1, "agent://bad address", 1)).code == invalid
        assert parent.write(3, _gather(lease, 1, [stranger])).code == invalid
        assert parent.write(4, _gather(lease, 1, ["not-an-id"])).code == invalid
        assert parent.write(5, _gather(lease, 1, [stranger, stranger])).code == invalid
        huge = _start(lease, 1, f"{agent_address}-w", 1)
        huge.start_children.children[0].payload = json.dumps("x" * (200 * 1024)).encode()
        assert parent.write(6, huge).code == 8  # RESOURCE_EXHAUSTED
        stale = delivery_pb2.Lease(intent_id=lease.intent_id, attempt=lease.attempt + 5, token=lease.token)
        assert parent.write(7, _start(stale, 1, f"{agent_address}-w", 1)).code == 9  # FAILED_PRECONDITION
    finally:
        parent.close()
    assert not sql(database_url, "SELECT 1 FROM intents WHERE parent_id = $1", lease.intent_id)
