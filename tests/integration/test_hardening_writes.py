"""Issue 11, findings 3, 4 and 6: the group commit never re-runs a committed
write blind nor lets one tenant's bad write hurt the others' batch, no
PostgreSQL text reaches a client, values the server could not read back are
refused, and the live-intents quota is decided by the database."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from intentd.client import IntentClient
from intentd.client.errors import ResourceExhausted
from intentd.generated.v1 import admin_service_pb2 as admin_pb
from intentd.generated.v1 import admin_service_pb2_grpc as admin_grpc
from intentd.generated.v1 import delivery_pb2
from intentd.generated.v1 import intent_service_pb2 as pb
from intentd.generated.v1 import intent_service_pb2_grpc as pb_grpc
from intentd.server import errors
from intentd.server.batcher import WriteBatcher, _Write
from intentd.server.db import Database
from intentd.server.fenced import Progress
from intentd.server.leases import LeaseRef, LeaseStore
from intentd.server.store import IntentStore, NewIntent
from tests.support import RawSidecar, ServerThread, run_sync

TYPE = "intent.hardening.write.v1"
# What PostgreSQL says and a client must never see.
PG_TEXT = ("DETAIL", "Key (", "violates", "constraint", "0x00", "SELECT", "INSERT", "syntax")


def _no_pg_text(message: str) -> None:
    for needle in PG_TEXT:
        assert needle not in message, message


@pytest.fixture
def stubs(server: ServerThread) -> Iterator[tuple[pb_grpc.IntentServiceStub, admin_grpc.AdminServiceStub]]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.IntentServiceStub(channel), admin_grpc.AdminServiceStub(channel)


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def _sql(url: str, query: str, *args: Any) -> Any:
    async def go() -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return run_sync(go())


# ------------------------------------------- finding 3: values, in-doubt commits


def test_out_of_range_type_settings_are_invalid_argument_at_the_admin_call(stubs) -> None:
    _, admin = stubs
    for field, spec in [
        # 10^15 ms: a default deadline past year 9999, which could be stored but never read back.
        ("default_deadline_ms", admin_pb.IntentType(intent_type=TYPE, default_deadline_ms=10**15)),
        ("default_deadline_ms", admin_pb.IntentType(intent_type=TYPE, default_deadline_ms=-1)),
        ("retry_backoff_ms", admin_pb.IntentType(intent_type=TYPE, retry_backoff_ms=2**31 - 1)),
        ("retry_backoff_max_ms", admin_pb.IntentType(intent_type=TYPE, retry_backoff_max_ms=2**31 - 1)),
    ]:
        code, details = _code(lambda spec=spec: admin.PutIntentType(
            admin_pb.PutIntentTypeRequest(intent_type=spec), timeout=10))
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (field, code, details)
        assert f"intent_type.{field}" in details
    # The largest allowed default deadline works end to end.
    ok = admin_pb.IntentType(intent_type=TYPE, default_deadline_ms=100 * 366 * 86_400_000)
    admin.PutIntentType(admin_pb.PutIntentTypeRequest(intent_type=ok), timeout=10)


def test_a_deadline_beyond_the_horizon_is_invalid_argument(stubs, agent_address) -> None:
    intents, _ = stubs
    far = Timestamp()
    far.FromDatetime(datetime(9000, 1, 1, tzinfo=UTC))
    code, details = _code(lambda: intents.SendIntent(pb.SendIntentRequest(intent=pb.IntentSpec(
        intent_type=TYPE, to_agent=agent_address, payload=b"{}", deadline=far)), timeout=10))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "intent.deadline" in details, (code, details)


def test_the_database_refuses_values_it_could_not_give_back(database_url) -> None:
    """A CHECK behind the validation: no path can store a row whose reading
    would fail (GetIntent and ListIntents answered INTERNAL for it)."""
    with pytest.raises(asyncpg.CheckViolationError):
        _sql(database_url, "INSERT INTO intent_types (tenant, intent_type, default_deadline_ms)"
                           " VALUES ('default', $1, $2)", "intent.hardening.huge.v1", 10**15)
    with pytest.raises(asyncpg.CheckViolationError):
        _sql(database_url, "INSERT INTO intents (id, tenant, intent_type, to_agent, sender, payload,"
                           " max_attempts, heartbeat_timeout_ms, available_at, create_time, update_time, deadline)"
                           " VALUES ($1, 'default', $2, 'agent://a/b/c', 's', '{}', 3, 1000, now(), now(), now(),"
                           " now() + interval '8000 years')", uuid.uuid4().hex[:26], TYPE)


def test_sends_whose_batch_lost_its_connection_after_the_commit_all_get_their_intents(
    make_server, agent_address
) -> None:
    """The connection of a one-statement batch of sends (it commits with its
    statement) is killed right after the statement: every sender, whatever
    its tenant or key, gets its own new intent, once, and it reads back."""
    srv: ServerThread = make_server(pool_max_size=2)  # one batch worker: sends group
    batcher = srv.plane.batcher
    assert batcher is not None
    killed = threading.Event()

    async def kill_after_commit(conn: asyncpg.Connection, batch: list[_Write]) -> None:
        if not killed.is_set() and len(batch) >= 2 and all(w.kind.name == "insert" for w in batch):
            killed.set()
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    batcher.after_statements = kill_after_commit
    senders = [f"tenant-{n}-{uuid.uuid4().hex[:6]}" for n in range(3)]
    results: list[tuple[str, int, grpc.StatusCode, str, Any]] = []
    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.IntentServiceStub(channel)

        def send(sender: str, n: int) -> tuple[str, int, grpc.StatusCode, str, Any]:
            spec = pb.IntentSpec(intent_type="intent.hardening.send.v1", to_agent=agent_address, sender=sender,
                                 payload=f'{{"n": {n}}}'.encode(),
                                 idempotency_key=f"k{n}" if n % 2 else "")
            try:
                reply = stub.SendIntent(pb.SendIntentRequest(intent=spec), timeout=30)
            except grpc.RpcError as err:
                return sender, n, err.code(), err.details() or "", None
            return sender, n, grpc.StatusCode.OK, "", reply

        with ThreadPoolExecutor(30) as pool:
            for round_ in range(10):  # until a batch of several sends formed and lost its connection
                jobs = [pool.submit(send, s, round_ * 100 + n) for s in senders for n in range(10)]
                results += [j.result() for j in jobs]
                if killed.is_set():
                    break
        assert killed.is_set(), "no batch of sends formed"
        failures = [r for r in results if r[2] is not grpc.StatusCode.OK]
        assert not failures, failures[:3]
        for _, _, _, details, _ in results:
            _no_pg_text(details)
        assert all(r[4].created for r in results)
        ids = [r[4].intent.id for r in results]
        assert len(set(ids)) == len(ids)
        # Each is stored once, with one CREATED event, and every read works.
        rows = _sql(srv.settings.database_url,
                    "SELECT i.id, i.sender, i.payload::text AS payload, count(e.*) AS events FROM intents i"
                    " JOIN intent_events e ON e.intent_id = i.id WHERE i.sender = ANY($1) GROUP BY i.id",
                    senders)
        assert sorted(r["id"] for r in rows) == sorted(ids)
        assert all(r["events"] == 1 for r in rows)
        for intent_id in ids:
            assert stub.GetIntent(pb.GetIntentRequest(id=intent_id), timeout=10).intent.id == intent_id
        listed = stub.ListIntents(pb.ListIntentsRequest(to_agent=agent_address, page_size=1000), timeout=10)
        assert {i.id for i in listed.intents} >= set(ids)
    assert batcher.redone >= 1


# ------------------------------------------------- finding 4: text, isolation


def test_nul_in_any_client_field_is_invalid_argument_naming_it(stubs, agent_address) -> None:
    intents, admin = stubs

    def send(**fields: Any) -> tuple[grpc.StatusCode, str]:
        spec = pb.IntentSpec(**{"intent_type": TYPE, "to_agent": agent_address, "payload": b"{}", **fields})
        return _code(lambda: intents.SendIntent(pb.SendIntentRequest(intent=spec), timeout=10))

    cases = {
        "intent.intent_type": send(intent_type="intent.a\x00.v1"),
        "intent.to_agent": send(to_agent=agent_address + "\x00"),
        "intent.sender": send(sender="me\x00"),
        "intent.idempotency_key": send(idempotency_key="k\x00"),
        "intent.labels": send(labels={"team": "a\x00b"}),
        "intent.payload": send(payload=b'"\\u0000"'),
    }
    sent = intents.SendIntent(pb.SendIntentRequest(intent=pb.IntentSpec(
        intent_type=TYPE, to_agent=agent_address, payload=b"{}")), timeout=10)
    cases["reason"] = _code(lambda: intents.CancelIntent(pb.CancelIntentRequest(
        id=sent.intent.id, reason="because\x00"), timeout=10))
    cases["intent_type.intent_type"] = _code(lambda: admin.PutIntentType(admin_pb.PutIntentTypeRequest(
        intent_type=admin_pb.IntentType(intent_type="intent.b\x00.v1")), timeout=10))
    for field, (code, details) in cases.items():
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (field, code, details)
        assert details.startswith(field), (field, details)
        _no_pg_text(details)


def test_nul_in_any_fenced_write_is_invalid_argument_and_never_reaches_a_batch(server, agent_address) -> None:
    with grpc.insecure_channel(server.address) as channel:
        intents = pb_grpc.IntentServiceStub(channel)
        sent = intents.SendIntent(pb.SendIntentRequest(intent=pb.IntentSpec(
            intent_type=TYPE, to_agent=agent_address, payload=b"{}")), timeout=10)
    owner = RawSidecar(server.address, agent_address, capacity=1, sidecar_id="owner")
    # A capacity-0 sidecar with no intents, as in the finding's flood.
    hostile = RawSidecar(server.address, agent_address, capacity=0, sidecar_id="hostile")
    batcher = server.plane.batcher
    try:
        assignment = owner.recv("assignment")
        assert assignment.intent.id == sent.intent.id
        owner.send(ack=delivery_pb2.AckAssignment(lease=assignment.lease))
        lease = assignment.lease
        bad_lease = delivery_pb2.Lease(intent_id=lease.intent_id[:-1] + "\x00", attempt=lease.attempt,
                                       token=lease.token)
        W = delivery_pb2.IntentWrite
        poison = {
            "step.name": W(lease=lease, step=delivery_pb2.StepWrite(index=1, name="ex\x00tract", result=b"1")),
            "progress.message": W(lease=lease, progress=delivery_pb2.ProgressWrite(message="half\x00", fraction=0.5)),
            "fail.message": W(lease=lease, fail=delivery_pb2.FailWrite(code="E", message="bad\x00", retryable=True)),
            "fail.code": W(lease=lease, fail=delivery_pb2.FailWrite(code="E\x00", message="m", retryable=True)),
            "lease.intent_id": W(lease=bad_lease, step=delivery_pb2.StepWrite(index=1, name="extract", result=b"1")),
        }
        # A well-formed write first: it waits for the ack to commit.
        go = W(lease=lease, progress=delivery_pb2.ProgressWrite(message="go", fraction=0.1))
        assert owner.write(100, go).code == 0
        for sidecar in (owner, hostile):
            writes_before = batcher.writes if batcher else 0
            for n, (field, write) in enumerate(poison.items(), start=1):
                result = sidecar.write(n, write)
                assert result.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], (field, result)
                assert result.message.startswith(field), (field, result.message)
                _no_pg_text(result.message)
            # Refused before the group commit: no batch carried any of them.
            assert (batcher.writes if batcher else 0) == writes_before
        # The lease is untouched by all that: the holder goes on.
        step = W(lease=lease, step=delivery_pb2.StepWrite(index=1, name="extract", result=b"1"))
        assert owner.write(10, step).code == 0
        assert owner.write(11, W(lease=lease, complete=delivery_pb2.CompleteWrite(result=b'"ok"'))).code == 0
    finally:
        owner.close()
        hostile.close()


async def _acked_leases(db: Database, address: str, n: int) -> tuple[LeaseStore, list[LeaseRef]]:
    """``n`` intents sent to ``address``, claimed and acked on the stream
    "s1": a lease store without a batcher, and their leases."""
    leases = LeaseStore(db, max_payload_bytes=128 * 1024)
    await IntentStore(db).send("default", [NewIntent(TYPE, address, "{}", "test") for _ in range(n)])
    rows, _ = await leases.claim("s1", [address], None, n, 60_000)
    refs = [LeaseRef(r["id"], r["attempt"], r["lease_token"]) for r in rows]
    for ref in refs:
        await leases.ack(ref, stream="s1")
    return leases, refs


async def test_a_refused_write_is_isolated_and_the_rest_of_its_batch_commits_once(db, agent_address) -> None:
    """A write PostgreSQL refuses (here a NUL, sent past the validation) in a
    batch of 20: it alone is refused, the 19 others are applied exactly once,
    in one commit, not retried one by one."""
    _, refs = await _acked_leases(db, agent_address, 20)
    batcher = WriteBatcher(db, workers=1)
    batcher.start()
    try:
        def progress(ref: LeaseRef, message: str) -> Any:
            return batcher.write(Progress(ref, None, "s1", message=message, fraction=0.5))

        outcomes = await asyncio.gather(*(progress(ref, "poison\x00" if i == 7 else f"m{i}")
                                          for i, ref in enumerate(refs)), return_exceptions=True)
        assert isinstance(outcomes[7], errors.InvalidArgument)
        _no_pg_text(outcomes[7].message)
        assert all(not isinstance(o, BaseException) and o[0] is not None for i, o in enumerate(outcomes) if i != 7)
        assert (batcher.batches, batcher.isolated) == (1, 1)
        assert batcher.writes == 19
    finally:
        await batcher.close()
    async with db.connection() as conn:
        counts = await conn.fetch("SELECT intent_id, count(*) AS n FROM intent_events WHERE type = 'PROGRESS'"
                                  " AND intent_id = ANY($1) GROUP BY intent_id", [r.intent_id for r in refs])
    assert sorted(r["n"] for r in counts) == [1] * 19
    assert refs[7].intent_id not in {r["intent_id"] for r in counts}


async def test_a_committed_fail_or_release_repeated_is_answered_as_it_was(db, agent_address) -> None:
    """What resolves an in-doubt batch: applying a committed fail or release
    again is recognised from the attempt's own event, never refused."""
    leases, (failing, releasing) = await _acked_leases(db, agent_address, 2)
    first = await leases.fail(failing, "E", "boom", True, stream="s1")
    again = await leases.fail(failing, "E", "boom", True, stream="s1")
    assert (again["state"], again["error_code"]) == (first["state"], first["error_code"]) == ("PENDING", "E")
    first = await leases.release(releasing, "AGENT_DIED", stream="s1")
    again = await leases.release(releasing, "AGENT_DIED", stream="s1")
    assert again["state"] == first["state"] == "PENDING"
    # A different write under the ended lease is still refused.
    with pytest.raises(errors.StaleLease):
        await leases.release(failing, "AGENT_DIED", stream="s1")


async def test_fenced_writes_whose_batch_lost_its_connection_after_the_commit_are_answered_as_committed(
    db, agent_address
) -> None:
    """A one-statement batch of fails, then one of releases, each losing its
    connection right after it committed: every attempt ended once, and every
    caller is told so (not that its lease was stale)."""
    _, refs = await _acked_leases(db, agent_address, 16)
    batcher = WriteBatcher(db, workers=1)
    killed: list[str] = []  # the kinds whose first batch of several lost its connection

    async def kill_after_commit(conn: asyncpg.Connection, batch: list[_Write]) -> None:
        kinds = {w.kind.name for w in batch}
        if len(batch) >= 2 and len(kinds) == 1 and not kinds & set(killed):
            killed.extend(kinds)
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    batcher.after_statements = kill_after_commit
    batcher.start()
    grouped = LeaseStore(db, max_payload_bytes=128 * 1024, batcher=batcher)
    try:
        failed = await asyncio.gather(*(grouped.fail(ref, "E", "boom", True, stream="s1") for ref in refs[:8]))
        released = await asyncio.gather(*(grouped.release(ref, "AGENT_DIED", stream="s1") for ref in refs[8:]))
    finally:
        await batcher.close()
    assert killed == ["fail", "release"] and batcher.redone == 2, killed
    assert all(r["state"] == "PENDING" for r in [*failed, *released])
    async with db.connection() as conn:
        ended = await conn.fetch("SELECT intent_id, count(*) AS n FROM intent_events WHERE type IN"
                                 " ('RELEASED', 'FAILED') AND intent_id = ANY($1) GROUP BY intent_id",
                                 [r.intent_id for r in refs])
    assert sorted(r["n"] for r in ended) == [1] * 16


# ------------------------------------------------------- finding 6: live quota


def _send_all(addresses: list[str], specs: list[list[pb.IntentSpec]]) -> list[grpc.StatusCode]:
    """Each list of specs as one call (SendIntent for one, SendIntents for
    more) at once, spread over the servers."""
    channels = [grpc.insecure_channel(a) for a in addresses]
    stubs = [pb_grpc.IntentServiceStub(c) for c in channels]
    barrier = threading.Barrier(len(specs))

    def call(n: int) -> grpc.StatusCode:
        stub = stubs[n % len(stubs)]
        barrier.wait()
        try:
            if len(specs[n]) == 1:
                stub.SendIntent(pb.SendIntentRequest(intent=specs[n][0]), timeout=30)
            else:
                stub.SendIntents(pb.SendIntentsRequest(intents=specs[n]), timeout=30)
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    try:
        with ThreadPoolExecutor(len(specs)) as pool:
            return list(pool.map(call, range(len(specs))))
    finally:
        for c in channels:
            c.close()


def _live(url: str) -> int:
    return int(_sql(url, "SELECT count(*) AS n FROM intents WHERE state IN"
                         " ('PENDING', 'DELIVERED', 'IN_PROGRESS', 'WAITING')")[0]["n"])


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_live_quota_is_exact_under_concurrent_sends(databases, make_server, replicas) -> None:
    url = databases.create()
    _sql(url, "UPDATE tenants SET max_live_intents = 5 WHERE name = 'default'")
    servers = [make_server(database_url=url) for _ in range(replicas)]
    addresses = [s.address for s in servers]
    address = f"agent://quota/q{uuid.uuid4().hex[:6]}/x"

    def spec(n: int, key: str = "") -> pb.IntentSpec:
        return pb.IntentSpec(intent_type=TYPE, to_agent=address, payload=f'{{"n": {n}}}'.encode(),
                             idempotency_key=key)

    # 20 single sends at once: exactly 5 are admitted.
    codes = _send_all(addresses, [[spec(n, f"single-{n}")] for n in range(20)])
    assert codes.count(grpc.StatusCode.OK) == 5, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 15, codes
    assert _live(url) == 5
    # A retry of an admitted send is matched, not refused, though the quota is full.
    admitted = [n for n, c in enumerate(codes) if c is grpc.StatusCode.OK]
    with grpc.insecure_channel(addresses[0]) as channel:
        again = pb_grpc.IntentServiceStub(channel).SendIntent(
            pb.SendIntentRequest(intent=spec(admitted[0], f"single-{admitted[0]}")), timeout=10)
        assert not again.created
    _sql(url, "UPDATE intents SET state = 'CANCELED', finish_time = now() WHERE state = 'PENDING'")
    # 20 batch sends of 5 at once: exactly one batch fits.
    codes = _send_all(addresses, [[spec(100 * b + n) for n in range(5)] for b in range(20)])
    assert codes.count(grpc.StatusCode.OK) == 1, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 19, codes
    assert _live(url) == 5


def test_a_tenant_without_quota_is_not_limited(make_server, databases) -> None:
    url = databases.create()
    srv = make_server(database_url=url)
    address = f"agent://quota/free{uuid.uuid4().hex[:6]}/x"
    specs = [[pb.IntentSpec(intent_type=TYPE, to_agent=address, payload=b"{}")] for _ in range(30)]
    assert set(_send_all([srv.address], specs)) == {grpc.StatusCode.OK}
    assert _live(url) == 30



def test_a_retry_is_admitted_by_the_live_quota_like_a_send(databases, make_server) -> None:
    """RetryIntent brings a dead letter back to live: it skipped the quota,
    so a tenant at max_live_intents could go past it one retry at a time."""
    url = databases.create()
    srv = make_server(database_url=url)
    address = f"agent://quota/r{uuid.uuid4().hex[:6]}/x"
    raw = RawSidecar(srv.address, address, ping_every=0.1)
    try:
        with IntentClient(srv.address) as client:
            dead = client.send_intent(intent_type=TYPE, to_agent=address, payload={}, max_attempts=1)
            assignment = raw.recv("assignment")
            raw.send(ack=delivery_pb2.AckAssignment(lease=assignment.lease))
            failed = raw.write(1, delivery_pb2.IntentWrite(lease=assignment.lease, fail=delivery_pb2.FailWrite(
                code="BAD_INPUT", message="no", retryable=False)))
            assert failed.code == 0 and client.get(dead).state.name == "FAILED"
            raw.close()
            live = client.send_intent(intent_type=TYPE, to_agent=address, payload={})
            _sql(url, "UPDATE tenants SET max_live_intents = 1 WHERE name = 'default'")
            with pytest.raises(ResourceExhausted):
                client.retry(dead)
            assert client.get(dead).state.name == "FAILED" and _live(url) == 1
            client.cancel(live, reason="room for the retry")
            assert client.retry(dead).state.name == "PENDING"
            assert _live(url) == 1
    finally:
        raw.close()
