"""The client API end to end: real server on loopback, real PostgreSQL,
both clients. Every error is checked for its status code and for nothing
having been written."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from intentd.client import (
    AlreadyExists,
    AsyncIntentClient,
    FailedPrecondition,
    IntentCanceled,
    IntentClient,
    IntentState,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    WaitTimeout,
)
from intentd.generated.v1 import intent_service_pb2 as pb
from intentd.generated.v1 import intent_service_pb2_grpc as pb_grpc
from intentd.server.ids import new_id

TYPE = "intent.pipeline.process.v1"


async def insert_raw_intent(pg: asyncpg.Connection, to_agent: str = "agent://test/raw/x") -> str:
    """A PENDING intent written straight to the table, for schema tests."""
    intent_id = new_id()
    await pg.execute(
        "INSERT INTO intents (id, tenant, intent_type, to_agent, sender, payload, max_attempts,"
        " heartbeat_timeout_ms, available_at, create_time, update_time)"
        " VALUES ($1, 'default', $2, $3, 'test', '{}', 3, 10000, now(), now(), now())",
        intent_id, TYPE, to_agent,
    )
    return intent_id


async def count_intents(pg: asyncpg.Connection, to_agent: str) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM intents WHERE to_agent = $1", to_agent))


async def count_events(pg: asyncpg.Connection, intent_id: str) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM intent_events WHERE intent_id = $1", intent_id))


# ------------------------------------------------------------------ happy paths


async def test_async_client_round_trip(server, agent_address) -> None:
    async with AsyncIntentClient(server.address) as client:
        intent_id = await client.send_intent(
            {"intent_type": TYPE, "to_agent": agent_address, "payload": {"rows": 50, "big": 2**53 + 1}},
            labels={"team": "data"},
        )
        intent = await client.get(intent_id)
        assert intent.id == intent_id
        assert intent.state is IntentState.PENDING
        assert intent.payload == {"rows": 50, "big": 2**53 + 1}  # exact, unlike a double
        assert intent.labels == {"team": "data"}
        assert intent.attempt == 0 and intent.max_attempts == 3
        assert intent.idempotency_key  # the client made one, so its retries are safe
        page = await client.list(to_agent=agent_address)
        assert [i.id for i in page.intents] == [intent_id]
        canceled = await client.cancel(intent_id, reason="no longer needed")
        assert canceled.state is IntentState.CANCELED
        assert canceled.cancel_reason == "no longer needed"
        final = await client.wait_for(intent_id, timeout=5)
        assert final.state is IntentState.CANCELED
        events = [e async for e in client.watch(intent_id)]
        assert [(e.seq, e.type, e.state) for e in events] == [
            (1, "CREATED", IntentState.PENDING),
            (2, "CANCELED", IntentState.CANCELED),
        ]
        assert await client.steps(intent_id) == []


def test_sync_client_round_trip(server, agent_address) -> None:
    with IntentClient(server.address) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload=[1, "two", None])
        intent = client.get(intent_id)
        assert intent.payload == [1, "two", None]
        assert intent.state is IntentState.PENDING
        ids = client.send_intents([
            {"intent_type": TYPE, "to_agent": agent_address, "payload": {"n": n}} for n in range(3)
        ])
        assert len(set(ids)) == 3
        assert [i.payload for i in client.list(to_agent=agent_address, page_size=10).intents][:3] == [
            {"n": 2}, {"n": 1}, {"n": 0}]
        with pytest.raises(WaitTimeout) as waited:
            client.wait_for(intent_id, timeout=0.3)
        assert waited.value.intent.state is IntentState.PENDING
        client.cancel(intent_id, reason="test")
        with pytest.raises(IntentCanceled):
            client.wait_for(intent_id, timeout=5, raise_on_failure=True)
        assert [e.type for e in client.watch(intent_id)] == ["CREATED", "CANCELED"]


async def test_list_filters_and_keyset_pagination(server, agent_address) -> None:
    async with AsyncIntentClient(server.address) as client:
        sent = []
        for n in range(7):
            sent.append(await client.send_intent(
                intent_type=TYPE if n % 2 else "intent.other.thing.v2", to_agent=agent_address,
                payload={"n": n}, labels={"parity": "odd" if n % 2 else "even", "run": "x"}))
        await client.cancel(sent[0])
        seen: list[str] = []
        token = ""
        while True:
            page = await client.list(to_agent=agent_address, page_size=3, page_token=token)
            seen += [i.id for i in page.intents]
            token = page.next_page_token
            if not token:
                break
        assert seen == list(reversed(sent))
        odd = await client.list(to_agent=agent_address, labels={"parity": "odd"})
        assert {i.id for i in odd.intents} == {sent[1], sent[3], sent[5]}
        typed = await client.list(to_agent=agent_address, intent_type="intent.other.thing.v2")
        assert {i.id for i in typed.intents} == {sent[0], sent[2], sent[4], sent[6]}
        canceled = await client.list(to_agent=agent_address, states=[IntentState.CANCELED])
        assert [i.id for i in canceled.intents] == [sent[0]]
        live = await client.list(to_agent=agent_address, states=["PENDING"])
        assert len(live.intents) == 6


# ------------------------------------------------------------------ idempotency


async def test_idempotent_send_same_and_different_payload(server, agent_address, pg) -> None:
    async with AsyncIntentClient(server.address, sender="billing") as client:
        key = f"k-{uuid.uuid4()}"
        first, created = await client.send(
            intent_type=TYPE, to_agent=agent_address, payload={"a": 1}, idempotency_key=key)
        again, created_again = await client.send(
            intent_type=TYPE, to_agent=agent_address, payload={"a": 1}, idempotency_key=key)
        assert created and not created_again and again.id == first.id
        with pytest.raises(AlreadyExists, match="different intent_type, to_agent or payload"):
            await client.send(intent_type=TYPE, to_agent=agent_address, payload={"a": 2}, idempotency_key=key)
        assert await count_intents(pg, agent_address) == 1
    # Keys are scoped per sender: another sender may use the same key.
    async with AsyncIntentClient(server.address, sender="search") as other:
        _, created_other = await other.send(intent_type=TYPE, to_agent=agent_address, payload={"a": 2},
                                            idempotency_key=key)
        assert created_other
    assert await count_intents(pg, agent_address) == 2


async def test_fifty_concurrent_sends_with_one_key_make_one_intent(server, agent_address, pg) -> None:
    key = f"storm-{uuid.uuid4()}"
    async with AsyncIntentClient(server.address) as client:
        results = await asyncio.gather(*(
            client.send(intent_type=TYPE, to_agent=agent_address, payload={"x": 1}, idempotency_key=key)
            for _ in range(50)
        ))
    assert len({intent.id for intent, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert await count_intents(pg, agent_address) == 1
    intent_id = results[0][0].id
    assert await count_events(pg, intent_id) == 1


async def test_batch_send_is_all_or_nothing(server, agent_address, pg) -> None:
    async with AsyncIntentClient(server.address) as client:
        key = f"b-{uuid.uuid4()}"
        await client.send_intent(intent_type=TYPE, to_agent=agent_address, payload=1, idempotency_key=key)
        batch = [
            {"intent_type": TYPE, "to_agent": agent_address, "payload": 2},
            {"intent_type": TYPE, "to_agent": agent_address, "payload": 3, "idempotency_key": key},
        ]
        with pytest.raises(AlreadyExists):
            await client.send_intents(batch)
        assert await count_intents(pg, agent_address) == 1
        bad = [{"intent_type": TYPE, "to_agent": agent_address, "payload": 4},
               {"intent_type": "Bad Type", "to_agent": agent_address, "payload": 5}]
        with pytest.raises(InvalidArgument, match=r"intents\[1\]\.intent_type"):
            await client.send_intents(bad)
        assert await count_intents(pg, agent_address) == 1


async def test_batch_send_matches_keys_within_the_batch_and_earlier_sends(server, agent_address, pg) -> None:
    async with AsyncIntentClient(server.address) as client:
        key, other = f"k-{uuid.uuid4()}", f"k-{uuid.uuid4()}"
        earlier = await client.send_intent(intent_type=TYPE, to_agent=agent_address, payload="e",
                                           idempotency_key=other)
        batch = [
            {"intent_type": TYPE, "to_agent": agent_address, "payload": "a", "idempotency_key": key},
            {"intent_type": TYPE, "to_agent": agent_address, "payload": {"n": 1}, "max_attempts": 7},
            {"intent_type": TYPE, "to_agent": agent_address, "payload": "a", "idempotency_key": key},
            {"intent_type": TYPE, "to_agent": agent_address, "payload": "e", "idempotency_key": other},
        ]
        ids = await client.send_intents(batch)
        assert ids[0] == ids[2] and ids[3] == earlier and len(set(ids)) == 3
        assert await count_intents(pg, agent_address) == 3
        plain = await client.get(ids[1])
        assert (plain.payload, plain.max_attempts, plain.state) == ({"n": 1}, 7, IntentState.PENDING)
        # The same batch again: the keyed sends match, the unkeyed one is a new send.
        again = await client.send_intents(batch)
        assert (again[0], again[2], again[3]) == (ids[0], ids[2], ids[3]) and again[1] not in ids
        assert await count_intents(pg, agent_address) == 4
        ids.append(again[1])
        # One key reused in the batch for another payload: nothing is written.
        clash = [{"intent_type": TYPE, "to_agent": agent_address, "payload": 1, "idempotency_key": "x" + key},
                 {"intent_type": TYPE, "to_agent": agent_address, "payload": 2, "idempotency_key": "x" + key}]
        with pytest.raises(AlreadyExists):
            await client.send_intents(clash)
        assert await count_intents(pg, agent_address) == 4
        events = await pg.fetchval("SELECT count(*) FROM intent_events WHERE intent_id = ANY ($1::text[])",
                                   list(set(ids)))
        assert events == 4  # one CREATED each, none for the matched sends


# ------------------------------------------------------------------ errors


def _raw_stub(server) -> tuple[grpc.Channel, pb_grpc.IntentServiceStub]:
    channel = grpc.insecure_channel(server.address)
    return channel, pb_grpc.IntentServiceStub(channel)


def _spec(agent: str, **kw) -> pb.IntentSpec:
    base = {"intent_type": TYPE, "to_agent": agent, "payload": b"{}"}
    base.update(kw)
    return pb.IntentSpec(**base)


@pytest.mark.parametrize(
    ("overrides", "code", "field"),
    [
        ({"intent_type": "process"}, grpc.StatusCode.INVALID_ARGUMENT, "intent.intent_type"),
        ({"intent_type": "intent.pipeline.process"}, grpc.StatusCode.INVALID_ARGUMENT, "intent.intent_type"),
        ({"to_agent": "https://acme/prod/x"}, grpc.StatusCode.INVALID_ARGUMENT, "intent.to_agent"),
        ({"to_agent": "agent://acme/prod"}, grpc.StatusCode.INVALID_ARGUMENT, "intent.to_agent"),
        ({"payload": b"{not json"}, grpc.StatusCode.INVALID_ARGUMENT, "intent.payload"),
        ({"payload": b"\xff\xfe"}, grpc.StatusCode.INVALID_ARGUMENT, "intent.payload"),
        ({"payload": b"[" * 100 + b"]" * 100}, grpc.StatusCode.INVALID_ARGUMENT, "intent.payload"),
        ({"payload": b"NaN"}, grpc.StatusCode.INVALID_ARGUMENT, "intent.payload"),
        ({"payload": b'"' + b"x" * (128 * 1024) + b'"'}, grpc.StatusCode.RESOURCE_EXHAUSTED, "intent.payload"),
        ({"max_attempts": -1}, grpc.StatusCode.INVALID_ARGUMENT, "intent.max_attempts"),
        ({"labels": {"bad key!": "v"}}, grpc.StatusCode.INVALID_ARGUMENT, "intent.labels"),
    ],
)
async def test_send_rejects_bad_input_and_writes_nothing(server, agent_address, pg, overrides, code, field) -> None:
    channel, stub = _raw_stub(server)
    with channel:
        spec = _spec(agent_address if "to_agent" not in overrides else overrides.pop("to_agent"), **overrides)
        with pytest.raises(grpc.RpcError) as err:
            stub.SendIntent(pb.SendIntentRequest(intent=spec))
    assert err.value.code() == code
    assert field in err.value.details()
    assert await count_intents(pg, agent_address) == 0


async def test_deadline_in_the_past_is_invalid(server, agent_address, pg) -> None:
    async with AsyncIntentClient(server.address) as client:
        with pytest.raises(InvalidArgument, match=r"intent\.deadline"):
            await client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={},
                                     deadline=datetime.now(UTC) - timedelta(seconds=1))
    assert await count_intents(pg, agent_address) == 0


async def test_missing_intent_and_unknown_enum(server, agent_address) -> None:
    async with AsyncIntentClient(server.address) as client:
        for call in (client.get, client.cancel, client.steps, client.retry):
            with pytest.raises(NotFound):
                await call(new_id())
        with pytest.raises(NotFound):
            await client.get("definitely-not-an-id")
        with pytest.raises(NotFound):
            async for _ in client.watch(new_id()):
                pass
    channel, stub = _raw_stub(server)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            stub.ListIntents(pb.ListIntentsRequest(states=[42]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "states[0]" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.ListIntents(pb.ListIntentsRequest(page_token="garbage!"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.SendIntent(pb.SendIntentRequest())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancel_of_terminal_intent_is_failed_precondition(server, agent_address, pg) -> None:
    async with AsyncIntentClient(server.address) as client:
        intent_id = await client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
        await client.cancel(intent_id, reason="first")
        events_before = await count_events(pg, intent_id)
        with pytest.raises(FailedPrecondition, match="terminal"):
            await client.cancel(intent_id, reason="second")
        assert await count_events(pg, intent_id) == events_before
        assert (await client.get(intent_id)).cancel_reason == "first"
        with pytest.raises(FailedPrecondition, match="only FAILED"):
            await client.retry(intent_id)


async def test_oversized_batch_is_resource_exhausted(make_server, agent_address, pg) -> None:
    srv = make_server(max_batch_size=5)
    async with AsyncIntentClient(srv.address) as client:
        with pytest.raises(ResourceExhausted, match="limit is 5"):
            await client.send_intents(
                [{"intent_type": TYPE, "to_agent": agent_address, "payload": i} for i in range(6)])
    assert await count_intents(pg, agent_address) == 0


# ------------------------------------------------------------------ watch and wait


async def test_watch_replays_after_seq_then_tails_changes_made_elsewhere(server, agent_address, pg) -> None:
    async with AsyncIntentClient(server.address) as client:
        intent_id = await client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
        # Append events through another connection, as another replica would.
        for n in range(3):
            await pg.execute(
                "WITH u AS (UPDATE intents SET progress_message=$2, last_seq=last_seq+1 WHERE id=$1 RETURNING *)"
                " INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, message)"
                " SELECT id, last_seq, 'PROGRESS', now(), state, attempt, $2 FROM u", intent_id, f"p{n}")
        seen: list[tuple[int, str]] = []
        got_four = asyncio.Event()

        async def follow() -> None:
            async for event in client.watch(intent_id, after_seq=1):
                seen.append((event.seq, event.type))
                if event.seq == 4:
                    got_four.set()

        task = asyncio.create_task(follow())
        await asyncio.wait_for(got_four.wait(), 10)
        assert seen == [(2, "PROGRESS"), (3, "PROGRESS"), (4, "PROGRESS")]
        # Now live: changes made while the watch is tailing.
        await pg.execute(
            "WITH u AS (UPDATE intents SET last_seq=last_seq+1 WHERE id=$1 RETURNING *)"
            " INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, message)"
            " SELECT id, last_seq, 'PROGRESS', now(), state, attempt, 'live' FROM u", intent_id)
        async with AsyncIntentClient(server.address) as other:
            await other.cancel(intent_id, reason="done watching")
        await asyncio.wait_for(task, 10)
        assert [s for s, _ in seen] == [2, 3, 4, 5, 6]
        assert seen[-1] == (6, "CANCELED")


async def test_wait_returns_when_another_connection_finishes_the_intent(server, agent_address) -> None:
    async with AsyncIntentClient(server.address) as client:
        intent_id = await client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
        waiter = asyncio.create_task(client.wait_for(intent_id, timeout=20))
        await asyncio.sleep(0)  # let the wait reach the server before the cancel
        done = threading.Event()

        def cancel_from_thread() -> None:
            with IntentClient(server.address) as sync_client:
                sync_client.cancel(intent_id, reason="elsewhere")
            done.set()

        await asyncio.to_thread(cancel_from_thread)
        final = await asyncio.wait_for(waiter, 10)
        assert final.state is IntentState.CANCELED and done.is_set()


# ------------------------------------------------------------------ deadlines


async def test_deadline_sweeper_times_out_live_intents(server, agent_address, pg) -> None:
    async with AsyncIntentClient(server.address) as client:
        soon = await client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={},
                                        deadline=timedelta(milliseconds=300))
        later = await client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={},
                                         deadline=timedelta(hours=1))
        final = await client.wait_for(soon, timeout=10)
        assert final.state is IntentState.TIMED_OUT
        assert final.error is not None and final.error.code == "DEADLINE_EXCEEDED"
        assert (await client.get(later)).state is IntentState.PENDING
        # Move the clock instead of waiting an hour: the sweep itself takes `now`.
        from intentd.server.sweepers import DeadlineSweeper

        sweeper = next(s for s in server.plane.services if isinstance(s, DeadlineSweeper))
        server.call(sweeper.run_once(now=datetime.now(UTC) + timedelta(hours=2)))
        assert (await client.get(later)).state is IntentState.TIMED_OUT
        assert [e.type for e in [e async for e in client.watch(later)]][-1] == "TIMED_OUT"


async def test_two_sweepers_at_once_time_out_each_intent_once(server, agent_address, pg) -> None:
    async with AsyncIntentClient(server.address) as client:
        ids = await client.send_intents([
            {"intent_type": TYPE, "to_agent": agent_address, "payload": i, "deadline": timedelta(hours=1)}
            for i in range(40)
        ])
    from intentd.server.db import Database
    from intentd.server.store import IntentStore

    db = Database(server.plane.database_url or "", min_size=2, max_size=4)
    await db.open(run_migrations=False)
    try:
        store = IntentStore(db)
        future = datetime.now(UTC) + timedelta(hours=2)
        a, b = await asyncio.gather(store.expire_deadlines(future, 10), store.expire_deadlines(future, 10))
        while True:
            more = await store.expire_deadlines(future, 10)
            if not more:
                break
    finally:
        await db.close()
    rows = await pg.fetch("SELECT state::text, last_seq FROM intents WHERE id = ANY($1)", ids)
    assert {r["state"] for r in rows} == {"TIMED_OUT"}
    assert {r["last_seq"] for r in rows} == {2}
    assert not set(r["id"] for r in a) & set(r["id"] for r in b)


def test_payload_json_text_round_trips(server, agent_address) -> None:
    with IntentClient(server.address) as client:
        raw = json.dumps({"unicode": "żółw ✓", "nested": {"list": [1.5, True, None]}}).encode()
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload=raw)
        assert client.get(intent_id).payload == json.loads(raw)
