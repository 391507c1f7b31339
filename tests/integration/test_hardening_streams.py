"""Issue 11, the streams' part: what one key can cost the server and other
tenants (buffers in bytes, stream and watcher caps, acks, write rates), and
what a key may still do after it was revoked or outside its scope (wait,
watch, assignments, rebinds, pattern grammar, key look-ups, /metrics)."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from intentd.client import IntentClient
from intentd.generated.v1 import agent_service_pb2 as apb
from intentd.generated.v1 import agent_service_pb2_grpc as apb_grpc
from intentd.generated.v1 import delivery_pb2
from intentd.generated.v1 import intent_service_pb2 as pb
from intentd.generated.v1 import intent_service_pb2_grpc as pb_grpc
from intentd.server import auth as auth_module
from intentd.server.auth import Caller, check_patterns
from intentd.server.errors import InvalidArgument, Unauthenticated
from intentd.testing.database import connection
from tests.support import Keys, RawSidecar, ServerProcess, ServerThread, bearer, run_sync, server_settings, wait_until

TYPE = "intent.hardening.work.v1"
STEP_BYTES = 120 * 1024


def tenant_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def sql(url: str, query: str, *args: Any) -> list[Any]:
    async def go() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    result: list[Any] = run_sync(go())
    return result


@pytest.fixture(scope="module")
def secure(database_url: str) -> Iterator[ServerThread]:
    srv = ServerThread(server_settings(database_url, auth="on", max_streams_per_key=2, max_streams_per_tenant=3,
                                       max_watches_per_key=20)).start()
    yield srv
    srv.stop()


def step_write(lease: Any, index: int, size: int) -> delivery_pb2.IntentWrite:
    result = json.dumps({"blob": "x" * (size - 12)}).encode()
    return delivery_pb2.IntentWrite(lease=lease, step=delivery_pb2.StepWrite(index=index, name="big", result=result))


class Unread:
    """A Connect stream that sends what it is given and never reads a reply:
    how many of its messages gRPC took shows whether it was pushed back."""

    def __init__(self, address: str, register: apb.Register, metadata: list[tuple[str, str]]) -> None:
        self.outgoing: queue.Queue[apb.ConnectRequest | None] = queue.Queue()
        self.taken = 0
        self.channel = grpc.insecure_channel(address)

        def requests() -> Iterator[apb.ConnectRequest]:
            yield apb.ConnectRequest(register=register)
            while (item := self.outgoing.get()) is not None:
                self.taken += 1
                yield item

        self.call = apb_grpc.AgentServiceStub(self.channel).Connect(requests(), metadata=metadata)

    def close(self) -> None:
        self.outgoing.put(None)
        self.call.cancel()
        self.channel.close()


# ---------------------------------------------------------------- finding 1: memory


def test_a_sidecar_that_never_reads_is_pushed_back_and_the_server_stays_bounded(database_url, tmp_path) -> None:
    """3,000 repeats of a recorded 120 KiB step, each answered with the whole
    record, from a stream that never reads: before, the server read them all
    and queued every answer (54 -> 466 MiB); now it stops reading once the
    stream's buffer (2 MiB) is full and then ends the stream."""
    keys = Keys(database_url)
    tenant = tenant_name("mem")
    address = f"agent://{tenant}/prod/big"
    agent_key = keys.create(tenant, "agent", ["agent"], (f"agent://{tenant}/prod/*",))
    client_key = keys.create(tenant, "client", ["client"])
    server = ServerProcess(database_url, tmp_path / "server.log", INTENTD_AUTH="on",
                           INTENTD_HEARTBEAT_TIMEOUT_MS="60000", INTENTD_ACK_TIMEOUT_MS="60000").start()
    attack = None
    try:
        with IntentClient(server.address, metadata=bearer(client_key)) as client:
            client.send_intent(intent_type=TYPE, to_agent=address, payload={})
        reader = RawSidecar(server.address, address, metadata=bearer(agent_key), ping_every=0.1)
        assignment = reader.recv("assignment")
        lease = assignment.lease
        reader.send(ack=delivery_pb2.AckAssignment(lease=lease))
        assert reader.write(1, step_write(lease, 1, STEP_BYTES)).code == 0
        reader.close()
        before = rss_mib(server.pid)
        attack = Unread(server.address, apb.Register(sidecar_id="unread", addresses=[address], capacity=0,
                                                     held=[lease]), bearer(agent_key))
        for n in range(3000):
            if n % 20 == 0:
                attack.outgoing.put(apb.ConnectRequest(ping=apb.Ping(nonce=n)))
            attack.outgoing.put(apb.ConnectRequest(write=apb.WriteRequest(
                request_id=n + 2, write=step_write(lease, 1, STEP_BYTES))))
        peak = before
        deadline = time.monotonic() + 30
        while "has not read its stream" not in server.log() and attack.taken < 3150 and time.monotonic() < deadline:
            peak = max(peak, rss_mib(server.pid))
            time.sleep(0.05)
        settle = time.monotonic() + 3  # what it takes on after that
        while time.monotonic() < settle:
            peak = max(peak, rss_mib(server.pid))
            time.sleep(0.05)
        print(f"server RSS {before:.0f} MiB -> peak {peak:.0f} MiB; the stream sent {attack.taken} of 3150")
        assert attack.taken < 1000, "the server kept reading a stream that does not read"
        assert peak - before < 150, f"the server grew by {peak - before:.0f} MiB"
        # What the stream says once its sidecar reads again: the answers
        # queued before the end, then why it ended.
        ending: list[Any] = []

        def drain() -> None:
            try:
                for _ in attack.call:
                    pass
            except grpc.RpcError as exc:
                ending.append(exc)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        drainer.join(30)
        assert ending, "the stream did not end"
        assert ending[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ending[0].details()
        assert "does not read its stream" in (ending[0].details() or "")
        assert server.alive()
    finally:
        if attack is not None:
            attack.close()
        server.kill()


def test_stream_caps_per_key_and_per_tenant(secure, database_url) -> None:
    keys = Keys(database_url)
    tenant, other = tenant_name("cap"), tenant_name("cap")
    one = keys.create(tenant, "one", ["agent"], (f"agent://{tenant}/*",))
    two = keys.create(tenant, "two", ["agent"], (f"agent://{tenant}/*",))
    elsewhere = keys.create(other, "one", ["agent"], (f"agent://{other}/*",))
    address = f"agent://{tenant}/prod/x"
    streams = [RawSidecar(secure.address, address, metadata=bearer(one), ping_every=0.1) for _ in range(2)]
    try:
        with pytest.raises(grpc.RpcError) as err:
            RawSidecar(secure.address, address, metadata=bearer(one))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "API key 'one' has 2 sidecar streams" in (err.value.details() or "")
        streams.append(RawSidecar(secure.address, address, metadata=bearer(two), ping_every=0.1))
        with pytest.raises(grpc.RpcError) as err:
            RawSidecar(secure.address, address, metadata=bearer(two))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"tenant {tenant!r} has 3 sidecar streams" in (err.value.details() or "")
        # Another tenant is not affected.
        streams.append(RawSidecar(secure.address, f"agent://{other}/prod/x", metadata=bearer(elsewhere)))
        # A closed stream frees its place.
        streams.pop(0).close()
        wait_until(lambda: sum(s.caller.key_id == one.split("_")[1] for s in secure.plane.agents.streams) == 1,
                   what="the closed stream to be gone")
        streams.append(RawSidecar(secure.address, address, metadata=bearer(one)))
    finally:
        for stream in streams:
            stream.close()


def test_acks_for_unknown_leases_are_bounded_like_writes(secure, database_url) -> None:
    """Each ack was a task of its own, without bound: 100,000 acks for leases
    nobody holds grew the server by 65 MiB. Now they take the stream's write
    slots, and the reader waits for one."""
    keys = Keys(database_url)
    tenant = tenant_name("ack")
    key = keys.create(tenant, "agent", ["agent"], (f"agent://{tenant}/*",))
    stream = RawSidecar(secure.address, f"agent://{tenant}/prod/x", metadata=bearer(key), batches=True,
                        ping_every=0.1)

    async def tasks() -> int:
        return len(asyncio.all_tasks())

    try:
        idle = secure.call(tasks())
        frames = 40
        for _ in range(frames):
            acks = [apb.ConnectRequest(ack=delivery_pb2.AckAssignment(lease=delivery_pb2.Lease(
                intent_id=uuid.uuid4().hex[:26], attempt=1, token=str(uuid.uuid4())))) for _ in range(256)]
            stream.send(batch=apb.ConnectRequestBatch(messages=acks))
        most = idle
        watch_until = time.monotonic() + 4
        while time.monotonic() < watch_until:
            most = max(most, secure.call(tasks()))
            time.sleep(0.01)
        print(f"server tasks: {idle} idle, at most {most} under {frames * 256} acks")
        assert most - idle <= 256 + 64, f"{most - idle} tasks for acks in flight"
    finally:
        stream.close()


# ---------------------------------------------------------------- finding 4: write rates


def test_write_rates_per_stream_and_per_tenant_push_back_and_refuse_nothing(database_url, make_server) -> None:
    srv = make_server(auth="on", stream_writes_per_second=40, tenant_writes_per_second=60)
    keys = Keys(database_url)
    tenant, other = tenant_name("rate"), tenant_name("rate")
    key = keys.create(tenant, "agent", ["agent"], (f"agent://{tenant}/*",))
    other_key = keys.create(other, "agent", ["agent"], (f"agent://{other}/*",))
    a = RawSidecar(srv.address, f"agent://{tenant}/prod/a", metadata=bearer(key), ping_every=0.1)
    b = RawSidecar(srv.address, f"agent://{tenant}/prod/b", metadata=bearer(key), ping_every=0.1)
    c = RawSidecar(srv.address, f"agent://{other}/prod/c", metadata=bearer(other_key), ping_every=0.1)
    lease = delivery_pb2.Lease(intent_id="01m8dsnxs4vrf409wync0kdayv", attempt=1, token=str(uuid.uuid4()))
    progress = delivery_pb2.IntentWrite(lease=lease, progress=delivery_pb2.ProgressWrite(message="x"))
    started = time.monotonic()
    for stream in (a, b):
        for n in range(90):
            stream.send(write=apb.WriteRequest(request_id=n + 1, write=progress))
    # The other tenant's budget is its own: 30 writes in its first second.
    for n in range(30):
        c.send(write=apb.WriteRequest(request_id=n + 1, write=progress))
    other_done = [c.recv("write_result", 30) for _ in range(30)]
    other_took = time.monotonic() - started
    answers = [stream.recv("write_result", 30) for stream in (a, b) for _ in range(90)]
    took = time.monotonic() - started
    print(f"180 writes of one tenant at 60/s took {took:.2f}s; the other tenant's 30 {other_took:.2f}s")
    # Every write was answered on its own merits (the lease is unknown),
    # none refused for the rate: the reader waited instead.
    assert {r.code for r in answers + other_done} == {grpc.StatusCode.NOT_FOUND.value[0]}
    # 180 writes at 60/s with one second of burst: at least 2 s. The
    # streams' own 40/s would allow 90 each in about 1.25 s.
    assert took >= 1.9
    for stream in (a, b, c):
        stream.close()


def test_a_tenant_of_its_own_write_budget_is_held_to_it(database_url, make_server) -> None:
    """tenants.max_writes_per_second overrides the server's tenant budget for
    that tenant alone, so one flooder can be held down without the others."""
    srv = make_server(auth="on", stream_writes_per_second=0, tenant_writes_per_second=10_000)
    keys = Keys(database_url)
    tenant = tenant_name("budget")
    key = keys.create(tenant, "agent", ["agent"], (f"agent://{tenant}/*",))
    asyncio.run(_execute(database_url, "UPDATE tenants SET max_writes_per_second = 20 WHERE name = $1", tenant))
    raw = RawSidecar(srv.address, f"agent://{tenant}/prod/a", metadata=bearer(key), ping_every=0.1)
    lease = delivery_pb2.Lease(intent_id="01m8dsnxs4vrf409wync0kdayv", attempt=1, token=str(uuid.uuid4()))
    progress = delivery_pb2.IntentWrite(lease=lease, progress=delivery_pb2.ProgressWrite(message="x"))
    started = time.monotonic()
    for n in range(60):
        raw.send(write=apb.WriteRequest(request_id=n + 1, write=progress))
    answers = [raw.recv("write_result", 30) for _ in range(60)]
    took = time.monotonic() - started
    assert {r.code for r in answers} == {grpc.StatusCode.NOT_FOUND.value[0]}
    # 60 writes at 20/s with one second of burst: at least 2 s (10,000/s would take none).
    assert took >= 1.9, took
    raw.close()


async def _execute(url: str, query: str, *args: Any) -> None:
    async with connection(url) as conn:
        await conn.execute(query, *args)


def test_a_stream_held_back_by_its_write_budget_is_not_closed_as_silent(make_server) -> None:
    """While the reader waits for a stream's write budget it reads nothing,
    not even the sidecar's pings behind the writes: that wait is the
    server's doing and must never count as the sidecar's silence (the stream
    was closed after three ping intervals, and its leases redelivered)."""
    srv = make_server(stream_writes_per_second=1)
    address = f"agent://{tenant_name('held')}/prod/a"
    raw = RawSidecar(srv.address, address, ping_every=0.1)
    lease = delivery_pb2.Lease(intent_id="01m8dsnxs4vrf409wync0kdayv", attempt=1, token=str(uuid.uuid4()))
    progress = delivery_pb2.IntentWrite(lease=lease, progress=delivery_pb2.ProgressWrite(message="x"))
    for n in range(3):  # one a second: the reader waits about 1 s, over 3 pings of 200 ms, twice
        raw.send(write=apb.WriteRequest(request_id=n + 1, write=progress))
    # A stream closed meanwhile raises here instead of answering.
    answers = [raw.recv("write_result", 30) for _ in range(3)]
    assert {r.code for r in answers} == {grpc.StatusCode.NOT_FOUND.value[0]}
    assert raw.write(4, progress, timeout=30).code == grpc.StatusCode.NOT_FOUND.value[0]  # still open
    raw.close()


# ---------------------------------------------------------------- finding 7: revocation


def test_revoked_keys_get_no_result_no_event_and_no_assignment(secure, database_url) -> None:
    keys = Keys(database_url)
    tenant = tenant_name("rev")
    address = f"agent://{tenant}/prod/rv"
    admin = keys.create(tenant, "admin", ["admin"])
    waiter_name, agent_name = f"waiter-{uuid.uuid4().hex[:6]}", f"agent-{uuid.uuid4().hex[:6]}"
    waiter = keys.create(tenant, waiter_name, ["client"])
    agent_key = keys.create(tenant, agent_name, ["agent"], (f"agent://{tenant}/prod/*",))
    with IntentClient(secure.address, metadata=bearer(admin)) as client:
        waited = client.send_intent(intent_type=TYPE, to_agent=f"agent://{tenant}/prod/nobody", payload={})
    outcomes: dict[str, Any] = {}

    def wait() -> None:
        with grpc.insecure_channel(secure.address) as channel:
            try:
                outcomes["wait"] = pb_grpc.IntentServiceStub(channel).WaitIntent(
                    pb.WaitIntentRequest(id=waited), metadata=bearer(waiter), timeout=60)
            except grpc.RpcError as exc:
                outcomes["wait"] = exc
            outcomes["wait_at"] = time.monotonic()

    def watch() -> None:
        with grpc.insecure_channel(secure.address) as channel:
            try:
                outcomes["events"] = [r.event.type for r in pb_grpc.IntentServiceStub(channel).WatchIntent(
                    pb.WatchIntentRequest(id=waited), metadata=bearer(waiter), timeout=60)]
            except grpc.RpcError as exc:
                outcomes["watch"] = exc
            outcomes["watch_at"] = time.monotonic()

    threads = [threading.Thread(target=wait), threading.Thread(target=watch)]
    for thread in threads:
        thread.start()
    sidecar = RawSidecar(secure.address, address, capacity=10, metadata=bearer(agent_key), ping_every=0.1)
    wait_until(lambda: len(secure.plane.hub._intents.get(waited, ())) == 2, what="the wait and the watch")
    try:
        keys.revoke(tenant, waiter_name)
        keys.revoke(tenant, agent_name)
        revoked = time.monotonic()
        with IntentClient(secure.address, metadata=bearer(admin)) as client:
            # The waited intent ends right after: a revoked caller must not get it.
            client.cancel(waited, reason="after the revocation")
            for _ in range(5):
                client.send_intent(intent_type=TYPE, to_agent=address, payload={})
        for thread in threads:
            thread.join(30)
        with pytest.raises(grpc.RpcError) as err:
            sidecar.recv("never", timeout=30)
        ended = time.monotonic()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert isinstance(outcomes.get("wait"), grpc.RpcError), f"WaitIntent answered {outcomes.get('wait')}"
        assert outcomes["wait"].code() == grpc.StatusCode.UNAUTHENTICATED
        assert isinstance(outcomes.get("watch"), grpc.RpcError), f"the watch ended with {outcomes.get('events')}"
        assert outcomes["watch"].code() == grpc.StatusCode.UNAUTHENTICATED
        assert sidecar.of("assignment") == []
        # Liveness, generously: the README promises about 2 s.
        for at in (outcomes["wait_at"], outcomes["watch_at"], ended):
            assert at - revoked < 6
    finally:
        sidecar.close()


def test_without_the_announcement_a_revoked_stream_still_ends_within_about_two_seconds(
        databases, make_server) -> None:
    """The README's figure when the revocation is not announced (a replica's
    listener was away): the one-second cache and the one-second re-check."""
    url = databases.create()
    sql(url, "ALTER TABLE api_keys DISABLE TRIGGER api_keys_notify")
    srv = make_server(database_url=url, auth="on")
    keys = Keys(url)
    tenant = tenant_name("quiet")
    name = f"agent-{uuid.uuid4().hex[:6]}"
    key = keys.create(tenant, name, ["agent"], (f"agent://{tenant}/prod/*",))
    sidecar = RawSidecar(srv.address, f"agent://{tenant}/prod/x", metadata=bearer(key), ping_every=0.1)
    try:
        keys.revoke(tenant, name)
        revoked = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            sidecar.recv("never", timeout=30)
        took = time.monotonic() - revoked
        print(f"a revoked key's stream ended {took:.2f}s after the revocation, unannounced")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert took < 3.5  # 2 s and the time to read the key and end the stream, generously
    finally:
        sidecar.close()


# ---------------------------------------------------------------- finding 9: rebind scope


def test_a_lease_is_not_rebound_to_a_stream_outside_its_address_scope(secure, database_url) -> None:
    keys = Keys(database_url)
    tenant = tenant_name("scope")
    prod = keys.create(tenant, "prod", ["agent"], (f"agent://{tenant}/prod/*",))
    dev = keys.create(tenant, "dev", ["agent"], (f"agent://{tenant}/dev/*",))
    client_key = keys.create(tenant, "client", ["client"])
    with IntentClient(secure.address, metadata=bearer(client_key)) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=f"agent://{tenant}/prod/pay", payload={})
        owner = RawSidecar(secure.address, f"agent://{tenant}/prod/pay", metadata=bearer(prod), ping_every=0.1)
        try:
            lease = owner.recv("assignment").lease
            owner.send(ack=delivery_pb2.AckAssignment(lease=lease))
            wait_until(lambda: client.get(intent_id).state.name == "IN_PROGRESS", what="the ack")
            thief = RawSidecar(secure.address, f"agent://{tenant}/dev/x", metadata=bearer(dev), held=[lease],
                               ping_every=0.1)
            try:
                assert [held.intent_id for held in thief.registered.lost] == [intent_id]
                assert list(thief.registered.kept) == []
                done = thief.write(1, delivery_pb2.IntentWrite(
                    lease=lease, complete=delivery_pb2.CompleteWrite(result=b"{}")))
                assert done.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            finally:
                thief.close()
            assert client.get(intent_id).state.name == "IN_PROGRESS"
            assert owner.write(2, delivery_pb2.IntentWrite(
                lease=lease, complete=delivery_pb2.CompleteWrite(result=b"{}"))).code == 0
        finally:
            owner.close()


# ---------------------------------------------------------------- finding 11: key look-ups


def test_unknown_ids_and_wrong_secrets_take_one_path_and_are_cached(secure, database_url, monkeypatch) -> None:
    keys = Keys(database_url)
    announced: list[str] = []
    secure.plane.hub.on_key(announced.append)
    real = keys.create(tenant_name("look"), "k", ["client"])
    # The new key's announcement bumps the cache's generation, and a look-up
    # it overtakes is not cached: wait for it, or a loaded machine delivers
    # it during the first try and the count below is off by one.
    parsed = auth_module.parse_key(real)
    assert parsed is not None
    wait_until(lambda: parsed[0] in announced, 10, 0.01, "the new key's announcement")
    authenticator = secure.plane.auth
    reads: list[str] = []
    connection = authenticator.db.connection

    def counted() -> Any:
        reads.append("db")
        return connection()

    monkeypatch.setattr(authenticator.db, "connection", counted)
    # Five tries take well under the cache's second, except on a loaded
    # machine: what is tested is that the cache answers, not how fast.
    monkeypatch.setattr(auth_module, "KEY_CACHE_SECONDS", 60.0)
    compared: list[bytes] = []
    digest = auth_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return digest(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    unknown = "intentd_" + uuid.uuid4().hex[:12] + "_" + "q" * 52
    wrong = real[: real.rindex("_") + 1] + "w" * 52
    for key in (unknown, wrong):
        del reads[:]
        heard = len(announced)
        for _ in range(5):
            with pytest.raises(Unauthenticated, match=r"^invalid API key$"):
                secure.call(authenticator.verify(key, "client"))
        # One database look-up, then the cache answers, found or not. A key
        # change announced meanwhile (another test's, on the shared
        # database) rightly empties the cache: one more look-up each.
        changes = announced[heard:]
        assert 1 <= len(reads) <= 1 + len(changes), (
            f"{len(reads)} look-ups for 5 tries of {key[:20]}, key changes announced meanwhile: {changes}")
    assert len(compared) == 10


def test_connect_with_a_bad_key_fails_before_any_message(secure) -> None:
    with grpc.insecure_channel(secure.address) as channel:
        nothing = threading.Event()

        def silent() -> Iterator[apb.ConnectRequest]:
            nothing.wait(20)
            return
            yield

        call = apb_grpc.AgentServiceStub(channel).Connect(
            silent(), metadata=bearer("intentd_aaaaaaaaaaaa_" + "b" * 52), timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            next(iter(call))
        nothing.set()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------- finding 12: patterns


PATTERNS = [
    # pattern, address, serves
    ("agent://acme/prod/*", "agent://acme/prod/billing", True),
    ("agent://acme/prod/*", "agent://acme/production/billing", False),
    ("agent://acme/*", "agent://acme/prod/billing", True),
    ("agent://acme/**", "agent://acme/dev/x", True),
    ("agent://acme/**", "agent://acmecorp/dev/x", False),
    ("agent://acme/*/billing", "agent://acme/prod/billing", True),
    ("agent://acme/*/billing", "agent://acme/prod/billing-2", False),
    ("agent://acme/prod-*/x", "agent://acme/prod-eu/x", True),
    ("agent://acme/prod-*/x", "agent://acme/prod/x", False),
    ("agent://acme/prod/etl-*", "agent://acme/prod/etl-1", True),
    ("agent://acme/prod/etl-*", "agent://acme/prod/loader", False),
    ("agent://acme/prod/billing", "agent://acme/prod/billing", True),
    ("agent://acme/prod/billing", "agent://acme/prod/billing2", False),
    ("agent://*", "agent://anyone/any/thing", True),
]
REFUSED = ["agent://acme/prod*", "agent://acme/pr?d/*", "agent://acme/[a-z]*/x", "agent://acme/**/x",
           "agent://acme/prod/x/y", "agent://acme//x", "acme/prod/*", "agent://Acme/prod/*", "agent://acme/prod",
           "agent://acme/prod/x**"]


@pytest.mark.parametrize(("pattern", "address", "serves"), PATTERNS)
def test_pattern_grammar_serves(pattern: str, address: str, serves: bool) -> None:
    check_patterns([pattern])
    assert Caller("t", "k", frozenset({"agent"}), (pattern,)).may_serve(address) is serves


@pytest.mark.parametrize("pattern", REFUSED)
def test_pattern_grammar_refuses(pattern: str) -> None:
    with pytest.raises(InvalidArgument, match="address pattern"):
        check_patterns([pattern])


def test_a_stored_pattern_outside_the_grammar_serves_nothing() -> None:
    # Made before the grammar: agent://acme/prod* once served agent://acme/production-billing/x.
    old = Caller("t", "k", frozenset({"agent"}), ("agent://acme/prod*",))
    assert not old.may_serve("agent://acme/production-billing/x")
    assert not old.may_serve("agent://acme/prod/x")


def test_key_creation_refuses_a_bad_pattern(database_url) -> None:
    with pytest.raises(InvalidArgument, match=r"agent://acme/prod\*.*within one segment"):
        Keys(database_url).create(tenant_name("pat"), "k", ["agent"], ("agent://acme/prod*",))


# ---------------------------------------------------------------- finding 13: metrics and watchers


def test_metrics_need_the_token_when_keys_are_on(tmp_path, make_server) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("s3cret-metrics-token-0123456789\n")
    with_token = make_server(auth="on", metrics_listen="127.0.0.1:0", metrics_token_file=token_file)
    without = make_server(auth="on", metrics_listen="127.0.0.1:0")
    assert with_token.plane.metrics_server is not None and without.plane.metrics_server is not None
    url = with_token.plane.metrics_server.url
    for headers, code in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                          ({"Authorization": "Bearer s3cret-metrics-token-012345678"}, 401)):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
        assert err.value.code == code
    ok = urllib.request.urlopen(urllib.request.Request(
        url, headers={"Authorization": "Bearer s3cret-metrics-token-0123456789"}), timeout=10)
    assert b"intentd_connected_sidecars" in ok.read()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(without.plane.metrics_server.url, timeout=10)
    assert err.value.code == 403


def xact_commit(url: str) -> int:
    return int(sql(url, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")[0][0])


def test_idle_watchers_cost_no_transactions_and_are_capped_per_key(databases, tmp_path) -> None:
    """1,500 watch streams of one key took PostgreSQL from 6 to 1,198
    transactions/s while nothing changed: each re-read its intent every 2 s.
    Now a waiting watcher sleeps until the hub wakes it."""
    url = databases.create()
    # A process of its own: the watchers' asyncio gRPC is then alone in this one.
    srv = ServerProcess(url, tmp_path / "server.log", INTENTD_AUTH="on", INTENTD_MAX_WATCHES_PER_KEY="2000",
                        INTENTD_SWEEP_INTERVAL_S="1.0").start()
    keys = Keys(url)
    tenant = tenant_name("watch")
    key = keys.create(tenant, "watcher", ["client"])
    count = 1500

    async def go() -> tuple[float, float, int]:
        # Connections of their own (a server takes 1,000 streams per connection).
        channels = [grpc.aio.insecure_channel(srv.address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(4)]
        stubs = [pb_grpc.IntentServiceStub(c) for c in channels]
        sent = await stubs[0].SendIntent(pb.SendIntentRequest(intent=pb.IntentSpec(
            intent_type=TYPE, to_agent=f"agent://{tenant}/prod/none")), metadata=bearer(key))
        intent_id = sent.intent.id

        async def first_seconds(seconds: float) -> float:
            start = await asyncio.to_thread(xact_commit, url)
            await asyncio.sleep(seconds)
            return (await asyncio.to_thread(xact_commit, url) - start) / seconds

        # PostgreSQL publishes a backend's counts within a second or so.
        await asyncio.sleep(1.5)
        baseline = await first_seconds(4)
        # Opened a hundred at a time: 1,500 opened at once on this machine
        # lose a few to CANCELLED in the client before their first message.
        for channel in channels:
            await channel.channel_ready()
        calls: list[Any] = []
        waiting = 0
        for start in range(0, count, 100):
            batch = [stubs[i % 4].WatchIntent(pb.WatchIntentRequest(id=intent_id), metadata=bearer(key))
                     for i in range(start, min(count, start + 100))]
            calls += batch
            first = await asyncio.wait_for(asyncio.gather(*(call.read() for call in batch)), 60)
            waiting += sum(isinstance(reply, pb.WatchIntentResponse) for reply in first)  # CREATED
        # Each still reads once more after its first event before it sleeps:
        # on a busy machine that takes a while. Settled, nothing is read.
        # PostgreSQL counts a backend's transactions in pg_stat_database only
        # when it flushes them, and an idle backend flushes what it ran last
        # up to 10 s later (PGSTAT_IDLE_INTERVAL): those first reads would
        # show up inside the measured window. Let that lag pass first.
        await asyncio.sleep(11)
        settle_until = time.monotonic() + 30
        while time.monotonic() < settle_until and await first_seconds(2) > baseline + 10:
            pass
        watching = await first_seconds(5)
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()
        return baseline, watching, waiting

    try:
        baseline, watching, waiting = run_sync(go(), timeout=120)
        print(f"PostgreSQL transactions/s: {baseline:.1f} idle, {watching:.1f} with {waiting} idle watchers")
        assert waiting == count
        assert watching - baseline < 50
    finally:
        srv.kill()


def test_watch_and_wait_calls_are_capped_per_key(secure, database_url) -> None:
    keys = Keys(database_url)
    tenant = tenant_name("wcap")
    key, other = keys.create(tenant, "one", ["client"]), keys.create(tenant, "two", ["client"])
    with IntentClient(secure.address, metadata=bearer(key)) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=f"agent://{tenant}/prod/none", payload={})
    with grpc.insecure_channel(secure.address) as channel:
        stub = pb_grpc.IntentServiceStub(channel)
        watches = [stub.WatchIntent(pb.WatchIntentRequest(id=intent_id), metadata=bearer(key)) for _ in range(20)]
        try:
            for watch in watches:
                next(watch)  # open and waiting
            with pytest.raises(grpc.RpcError) as err:
                next(stub.WatchIntent(pb.WatchIntentRequest(id=intent_id), metadata=bearer(key), timeout=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "has 20 WatchIntent/WaitIntent calls open" in (err.value.details() or "")
            with pytest.raises(grpc.RpcError) as err:
                stub.WaitIntent(pb.WaitIntentRequest(id=intent_id, timeout_ms=100), metadata=bearer(key), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Per key: another key of the tenant still waits.
            waited = stub.WaitIntent(pb.WaitIntentRequest(id=intent_id, timeout_ms=100), metadata=bearer(other),
                                     timeout=10)
            assert not waited.terminal
            watches.pop().cancel()
            wait_until(lambda: secure.plane.server is not None and _waits_left(stub, intent_id, key),
                       what="the place of the canceled watch")
        finally:
            for watch in watches:
                watch.cancel()


def _waits_left(stub: Any, intent_id: str, key: str) -> bool:
    try:
        stub.WaitIntent(pb.WaitIntentRequest(id=intent_id, timeout_ms=1), metadata=bearer(key), timeout=10)
        return True
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False
