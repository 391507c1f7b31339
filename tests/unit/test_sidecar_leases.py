"""SidecarLeases, the one record of the sidecar's leases: the moves of a
lease's life (sidecar/leases.py) and when the record is forgotten."""

from __future__ import annotations

from intentd.generated.v1 import delivery_pb2
from intentd.sidecar.leases import GONE_MEMORY, Place, SidecarLeases


def assignment(n: int, heartbeat_ms: int = 0) -> delivery_pb2.Assignment:
    return delivery_pb2.Assignment(
        lease=delivery_pb2.Lease(intent_id=f"i{n}", attempt=1, token=f"t{n}"), heartbeat_timeout_ms=heartbeat_ms)


def test_an_arrival_is_bound_and_new_and_a_duplicate_is_refused() -> None:
    leases = SidecarLeases()
    held = leases.arrive(assignment(1, heartbeat_ms=4000))
    assert held is not None and held.bound and held.place is Place.NEW and not held.local
    assert held.heartbeat_timeout_s == 4.0
    assert leases.arrive(assignment(1)) is None
    assert leases.get("t1") is held and leases.placed("t1") is None
    assert leases.bound() == [held] and not leases.local()
    unspecified = leases.arrive(assignment(2))
    assert unspecified is not None and unspecified.heartbeat_timeout_s == 10.0  # the server's default


def test_a_lease_is_forgotten_once_neither_the_stream_nor_an_agent_holds_it() -> None:
    leases = SidecarLeases()
    on_agent = leases.arrive(assignment(1))
    assert on_agent is not None
    leases.wait(on_agent)
    assert leases.waiting() == [on_agent]
    leases.place(on_agent, agent_id=7)
    assert leases.placed("t1") is on_agent and on_agent.agent_id == 7 and not leases.waiting()
    # A complete answered for good unbinds it; the agent's slot is freed after.
    assert leases.unbind("t1") is on_agent
    assert leases.get("t1") is on_agent and not leases.bound()
    assert leases.finish(on_agent)
    assert leases.get("t1") is None

    # Given back: no agent runs it, but the stream holds it until the release is answered.
    released = leases.arrive(assignment(2))
    assert released is not None
    assert not leases.finish(released)  # it was never placed
    assert released.place is Place.DONE and leases.bound() == [released]
    leases.unbind("t2")
    assert leases.get("t2") is None and leases.gone("t2") is None


def test_slots_are_counted_per_agent() -> None:
    leases = SidecarLeases()
    records = [leases.arrive(assignment(n)) for n in range(3)]
    for held in records:
        assert held is not None
        leases.wait(held)
        leases.place(held, agent_id=1)
    assert leases.count_on(1) == 3 and leases.count_on(2) == 0
    first = records[0]
    assert first is not None
    leases.finish(first)
    assert leases.count_on(1) == 2 and set(leases.on_agent(1)) == set(records[1:])
    assert first.place is Place.DONE and first.agent_id is None


def test_the_ack_is_taken_once() -> None:
    leases = SidecarLeases()
    held = leases.arrive(assignment(1))
    assert held is not None
    assert leases.ack(held)
    assert not leases.ack(held)
    assert held.acked and not held.ack_sent


def test_revoked_and_lost_tokens_are_remembered_up_to_a_limit() -> None:
    leases = SidecarLeases()
    held = leases.arrive(assignment(1))
    assert held is not None
    leases.unbind("t1", gone="LEASE_LOST")
    assert leases.gone("t1") == "LEASE_LOST" and leases.get("t1") is None
    # Assigned again: it is ours once more.
    assert leases.arrive(assignment(1)) is not None and leases.gone("t1") is None
    for n in range(GONE_MEMORY + 1):
        leases.unbind(f"old{n}", gone="revoked")
    assert leases.gone("old0") is None and leases.gone(f"old{GONE_MEMORY}") == "revoked"


def test_the_queue_and_the_local_count_follow_every_move() -> None:
    leases = SidecarLeases()
    first, second, third = (leases.arrive(assignment(100 + i)) for i in range(3))
    assert first is not None and second is not None and third is not None
    for held in (first, second, third):
        leases.wait(held)
    leases.wait(second)  # waiting again is no second count
    assert leases.waiting() == [first, second, third] and leases.local_count() == 3
    leases.place(second, 1)
    assert leases.waiting() == [first, third] and leases.local_count() == 3
    leases.finish(second)
    leases.finish(first)
    assert leases.waiting() == [third] and leases.local_count() == 1
    leases.finish(first)  # finished twice: counted once
    assert leases.local_count() == 1 == len(leases.local())
    leases.finish(third)
    assert leases.waiting() == [] and leases.local_count() == 0 == len(leases.local())
