"""Issue 11, findings 5, 8, 10 and 14: what a sidecar claims, what its agent
inherits, the deadline guard of fail and release, and a frozen sidecar's
stream. Real server, real sidecar and agent processes, real SIGSTOP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from intentd.client import IntentClient, IntentState
from intentd.core.config import SettingsError
from intentd.generated.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    agent_service_pb2,
    agent_service_pb2_grpc,
    delivery_pb2,
)
from intentd.server.auth import KeyStore
from intentd.server.db import Database
from intentd.server.settings import ServerSettings
from intentd.server.sweepers import DeadlineSweeper
from tests.support import ROOT, Process, RawSidecar, run_sync, server_settings, wait_until

INTENTD = [sys.executable, "-m", "intentd.commands"]

TYPE = "test.hardening.work.v1"
BLOCK = "test.hardening.block.v1"
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


def sql(database_url: str, query: str, *args: Any) -> list[Any]:
    async def go() -> list[Any]:
        conn = await asyncpg.connect(database_url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return list(run_sync(go()))


def events(database_url: str, intent_id: str) -> list[tuple[str, str, int]]:
    rows = sql(database_url, "SELECT type, coalesce(message, '') AS message, attempt FROM intent_events"
               " WHERE intent_id = $1 ORDER BY seq", intent_id)
    return [(r["type"], r["message"], r["attempt"]) for r in rows]


class AgentSidecar(Process):
    """``intentd sidecar`` supervising tests/agents/hardening_agent.py."""

    def __init__(self, server: str, address: str, log_path: Path, *, agent_types: str, name: str = "agent",
                 sidecar_types: str | None = None, capacity: int = 1, args: tuple[str, ...] = (),
                 **env: str) -> None:
        socket_path = f"/tmp/intentd-hard-{uuid.uuid4().hex[:10]}.sock"
        argv = ["sidecar", "--server", server, "--address", address, "--capacity", str(capacity),
                "--listen", f"unix://{socket_path}", "--exec", f"{sys.executable} -m tests.agents.hardening_agent",
                *args]
        if sidecar_types:
            argv += ["--intent-type", sidecar_types]
        super().__init__(argv, {"TEST_AGENT_ADDRESS": address, "TEST_AGENT_TYPES": agent_types,
                                "TEST_AGENT_NAME": name, "TEST_AGENT_CAPACITY": str(capacity),
                                "PYTHONPATH": str(ROOT), "INTENTD_SIDECAR_ID": name, **env}, log_path)

    def kill_group(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def sidecars(tmp_path: Path) -> Iterator[Any]:
    started: list[AgentSidecar] = []

    def start(server: str, address: str, **kwargs: Any) -> AgentSidecar:
        sc = AgentSidecar(server, address, tmp_path / f"sidecar-{len(started)}.log", **kwargs)
        sc.start()
        started.append(sc)
        return sc

    start.logs = lambda: "\n".join(f"--- {p.log_path.name}\n{p.log()[-6000:]}" for p in started)  # type: ignore[attr-defined]
    yield start
    for sc in started:
        sc.kill_group()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INTENTD, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


# ---------------------------------------------------------------- finding 5


def test_an_intent_of_a_type_no_agent_handles_is_never_claimed(
        make_server: Any, database_url: str, agent_address: str, sidecars: Any) -> None:
    """Finding 5: the sidecar registered every type for its address (its
    agents announce theirs in AgentHello, but Register said "all"), so an
    intent of a type no agent handles was claimed, held for the placement
    timeout, released DRAINED with the attempt granted back, claimed again,
    forever. Now the sidecar offers only the types its agents announced: the
    typo waits PENDING at attempt 0, untouched, and `intentd get` says why."""
    srv = make_server()
    sidecars(srv.address, agent_address, agent_types=TYPE)
    with IntentClient(srv.address) as client:
        typo = client.send_intent(intent_type="test.hardening.wrok.v1", to_agent=agent_address, payload={})
        # Works for longer than two of the sidecar's placement timeouts (2 s).
        known = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={"sleep": 4.5})
        final = client.wait_for(known, timeout=60)
        assert final.state is IntentState.COMPLETED
        # A second one, after: the sidecar is up and claiming all along.
        again = client.wait_for(client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={}), 60)
        assert again.state is IntentState.COMPLETED
        waiting = client.get(typo)
    assert (waiting.state, waiting.attempt) == (IntentState.PENDING, 0)
    assert events(database_url, typo) == [("CREATED", "", 0)]
    shown = cli("get", typo, "--target", srv.address)
    assert shown.returncode == 0, shown.stderr
    assert "no agent has claimed it yet" in shown.stdout, shown.stdout


def test_repeated_drains_end_counted(make_server: Any, agent_address: str) -> None:
    """Finding 5: every DRAINED release granted its attempt back (max_attempts
    + 1), so a sidecar that keeps giving an intent back kept it alive for ever,
    its events growing. Now only a bounded number of drains per intent is
    granted back (counted in the row); the next ones count as attempts and the
    intent dead-letters."""
    srv = make_server()
    raw = RawSidecar(srv.address, agent_address, ping_every=0.1)
    releases = 0
    try:
        with IntentClient(srv.address) as client:
            intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={}, max_attempts=2)
            for n in range(60):
                if client.get(intent_id).state.terminal:
                    break
                assignment = raw.recv("assignment", timeout=10)
                result = raw.write(n + 1, delivery_pb2.IntentWrite(
                    lease=assignment.lease, release=delivery_pb2.ReleaseWrite(reason="DRAINED")))
                assert result.code == 0, result.message
                releases += 1
            final = client.get(intent_id)
    finally:
        raw.close()
    assert final.state is IntentState.FAILED, f"still {final.state.value} at attempt {final.attempt} after {releases}"
    assert final.error is not None and final.error.code == "ATTEMPTS_EXHAUSTED"
    assert "DRAINED" in final.error.message
    assert releases == final.attempt < 60


def test_a_sidecar_offers_the_types_its_agents_handle() -> None:
    from intentd.sidecar.dispatch import Dispatcher

    offers: list[tuple[int, list[str] | None]] = []

    class Link:
        def ack(self, lease: Any) -> None: ...

        def set_capacity(self, capacity: int, intent_types: Any = None) -> None:
            offers.append((capacity, None if intent_types is None else list(intent_types)))

        async def write(self, write: Any) -> Any: ...

    anything = Dispatcher(Link(), capacity=10)  # type: ignore[arg-type]
    first = anything.attach(["b.t.v1", "a.t.v1"], 2)
    assert offers[-1] == (2, ["a.t.v1", "b.t.v1"])
    anything.attach(["c.t.v1"], 3)
    assert offers[-1] == (5, ["a.t.v1", "b.t.v1", "c.t.v1"])
    anything.detach(first)
    assert offers[-1] == (3, ["c.t.v1"])
    anything.attach([], 1)  # an agent that handles every type
    assert offers[-1] == (4, [])
    # Within the sidecar's own list; an agent with nothing in it brings no capacity.
    limited = Dispatcher(Link(), capacity=10, intent_types=["a.t.v1"])  # type: ignore[arg-type]
    limited.attach(["c.t.v1"], 3)
    assert offers[-1] == (0, ["a.t.v1"])
    limited.attach(["a.t.v1", "b.t.v1"], 2)
    assert offers[-1] == (2, ["a.t.v1"])
    limited.drain()
    assert offers[-1] == (0, ["a.t.v1"])


def test_stream_offering_malformed_intent_types_is_refused(make_server: Any, agent_address: str) -> None:
    srv = make_server()
    raw = RawSidecar(srv.address, agent_address)
    try:
        raw.send(set_capacity=agent_service_pb2.SetCapacity(
            capacity=1, intent_types=agent_service_pb2.IntentTypeSet(intent_types=["Not A Type"])))
        with pytest.raises(grpc.RpcError) as info:
            raw.recv("assignment", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "set_capacity.intent_types" in (info.value.details() or "")  # type: ignore[attr-defined]
    finally:
        raw.close()


# ---------------------------------------------------------------- finding 8


def make_keys(database_url: str, tenant: str, address: str) -> tuple[str, str]:
    async def go() -> tuple[str, str]:
        db = Database(database_url, min_size=1, max_size=1)
        await db.open(run_migrations=False)
        try:
            _, agent = await KeyStore(db).create(tenant, "sidecar", ["agent"], (address,), None, None)
            _, client = await KeyStore(db).create(tenant, "client", ["client"], (), None, None)
            return agent, client
        finally:
            await db.close()

    keys: tuple[str, str] = run_sync(go())
    return keys


def test_supervised_agent_gets_no_api_key_and_the_key_can_come_from_a_file(
        make_server: Any, database_url: str, agent_address: str, sidecars: Any, tmp_path: Path) -> None:
    """Finding 8: the agent under --exec inherited the sidecar's whole
    environment, INTENTD_API_KEY included, and the key could only be given in
    the environment or on the command line (where the process list shows it)."""
    srv = make_server(auth="on")
    tenant = f"hard{uuid.uuid4().hex[:6]}"
    agent_key, client_key = make_keys(database_url, tenant, agent_address)
    key_file = tmp_path / "agent.key"
    key_file.write_text(agent_key + "\n")
    key_file.chmod(0o600)
    from_env, from_file = tmp_path / "env-1.json", tmp_path / "env-2.json"
    sidecars(srv.address, agent_address, agent_types=TYPE, name="env", INTENTD_API_KEY=agent_key,
             TEST_ENV_DUMP=str(from_env))
    sidecars(srv.address, agent_address, agent_types=TYPE, name="file", INTENTD_API_KEY_FILE=str(key_file),
             TEST_ENV_DUMP=str(from_file))
    metadata = [("authorization", f"Bearer {client_key}")]
    with IntentClient(srv.address, metadata=metadata) as client:
        ran = {client.wait_for(client.send_intent(intent_type=TYPE, to_agent=agent_address,
                                                  payload={"sleep": 0.5}), timeout=60).result["by"]
               for _ in range(6)}
    # Both authenticated (each ran something, or at least registered: the
    # server saw two streams for the address).
    assert ran, sidecars.logs()
    streams = srv.call(_streams(srv, agent_address))
    assert sorted(streams) == ["env", "file"], sidecars.logs()
    for dump in (from_env, from_file):
        wait_until(dump.exists, 30, what=f"{dump.name} written by the agent")
        environment = json.loads(dump.read_text())
        leaked = {k for k, v in environment.items() if k.startswith("INTENTD_API_KEY") or agent_key in v}
        assert not leaked, f"the agent's environment holds {sorted(leaked)}"
        assert environment["INTENTD_SIDECAR_ADDRESS"].startswith("unix://")
    # The CLI reads a key file too, and warns about a key on its command line.
    intent_id = sql(database_url, "SELECT id FROM intents WHERE tenant = $1 LIMIT 1", tenant)[0]["id"]
    client_file = tmp_path / "client.key"
    client_file.write_text(client_key)
    shown = cli("get", intent_id, "--target", srv.address, "--api-key-file", str(client_file))
    assert shown.returncode == 0 and intent_id in shown.stdout, shown.stderr
    shown = cli("get", intent_id, "--target", srv.address, env={"INTENTD_API_KEY_FILE": str(client_file)})
    assert shown.returncode == 0 and intent_id in shown.stdout, shown.stderr
    shown = cli("get", intent_id, "--target", srv.address, "--api-key", client_key)
    assert shown.returncode == 0 and "process list" in shown.stderr, shown.stderr


async def _streams(srv: Any, address: str) -> list[str]:
    return [s.sidecar_id for s in srv.plane.agents.streams if address in s.addresses and not s.closed]


def test_api_key_file_settings_are_checked_at_start(tmp_path: Path) -> None:
    from intentd.sidecar.settings import SidecarSettings

    base = {"addresses": ["agent://acme/prod/x"]}
    with pytest.raises(SettingsError, match="INTENTD_API_KEY_FILE"):
        replace(SidecarSettings(**base), api_key_file=tmp_path / "missing").validate()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SettingsError, match="INTENTD_API_KEY_FILE"):
        replace(SidecarSettings(**base), api_key_file=empty).validate()
    good = tmp_path / "good"
    good.write_text("ik_x.y\n")
    with pytest.raises(SettingsError, match="INTENTD_API_KEY"):
        replace(SidecarSettings(**base), api_key="ik_x.y", api_key_file=good).validate()
    settings = replace(SidecarSettings(**base), api_key_file=good)
    settings.validate()
    assert settings.bearer_key() == "ik_x.y"


# ---------------------------------------------------------------- finding 10


def test_fail_and_release_after_the_deadline_end_timed_out(
        make_server: Any, databases: Any, agent_address: str) -> None:
    """Finding 10: fail_intents and release_intents had no deadline guard, so
    an agent's failure (or a release) landing after the deadline but before the
    deadline sweeper ran made the intent FAILED (or PENDING again) instead of
    TIMED_OUT."""
    # A database of its own: the run's shared one is swept often by the
    # session's server, which would time the intents out before the late writes.
    srv = make_server(database_url=databases.create(), sweep_interval_s=30)  # sweeps are rare
    raw = RawSidecar(srv.address, agent_address, capacity=2, ping_every=0.1)
    try:
        with IntentClient(srv.address) as client:
            ids = [client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={}, max_attempts=1,
                                      deadline=timedelta(seconds=1.0)) for _ in range(2)]
            leases = {}
            for _ in ids:
                assignment = raw.recv("assignment")
                leases[assignment.lease.intent_id] = assignment.lease
                raw.send(ack=delivery_pb2.AckAssignment(lease=assignment.lease))
            for intent_id in ids:
                wait_until(lambda i=intent_id: client.get(i).state is IntentState.IN_PROGRESS, 10, what="IN_PROGRESS")
            deadline = max(d for d in (client.get(i).deadline for i in ids) if d is not None)
            time.sleep(max(0.0, (deadline - datetime.now(UTC)).total_seconds()) + 0.3)
            failed = raw.write(1, delivery_pb2.IntentWrite(lease=leases[ids[0]], fail=delivery_pb2.FailWrite(
                code="BAD_INPUT", message="late", retryable=False)))
            released = raw.write(2, delivery_pb2.IntentWrite(
                lease=leases[ids[1]], release=delivery_pb2.ReleaseWrite(reason="AGENT_DIED")))
            states = [client.get(i).state for i in ids]
            sweeper = next(s for s in srv.plane.services if isinstance(s, DeadlineSweeper))
            srv.call(sweeper.run_once())
            finals = [client.get(i) for i in ids]
    finally:
        raw.close()
    assert states == [IntentState.IN_PROGRESS] * 2, f"the late writes made them {states}"
    for result in (failed, released):
        assert result.code == FAILED_PRECONDITION and "deadline" in result.message, result
    assert [f.state for f in finals] == [IntentState.TIMED_OUT] * 2


# ---------------------------------------------------------------- finding 14


def test_heartbeat_timeout_shorter_than_three_ping_intervals_is_refused(
        make_server: Any, database_url: str) -> None:
    """Finding 14: a heartbeat timeout of two ping intervals was accepted,
    though the server closes a silent stream only after three."""
    with pytest.raises(SettingsError, match="INTENTD_HEARTBEAT_TIMEOUT_MS"):
        server_settings(database_url, ping_interval_ms=1000, heartbeat_timeout_ms=2000)
    ServerSettings(database_url=database_url, ping_interval_ms=1000, heartbeat_timeout_ms=3000).validate()
    srv = make_server(ping_interval_ms=500, heartbeat_timeout_ms=5000)
    refused = cli("types", "put", "test.hardening.short.v1", "--target", srv.address, "--heartbeat-timeout-ms", "1000")
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr, refused
    assert "1500" in refused.stderr, refused.stderr
    accepted = cli("types", "put", "test.hardening.short.v1", "--target", srv.address, "--heartbeat-timeout-ms", "1500")
    assert accepted.returncode == 0, accepted.stderr


def test_never_acknowledged_attempt_says_so(make_server: Any, agent_address: str) -> None:
    """Finding 14: an attempt whose delivery was never acknowledged ended
    with "lost its lease (no heartbeat)"."""
    srv = make_server(ack_timeout_ms=500)
    raw = RawSidecar(srv.address, agent_address, ping_every=0.1)
    try:
        with IntentClient(srv.address) as client:
            intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={}, max_attempts=1)
            raw.recv("assignment")  # and never acknowledged
            final = client.wait_for(intent_id, timeout=30)
    finally:
        raw.close()
    assert final.state is IntentState.FAILED and final.error is not None
    assert "not acknowledged within the ack timeout" in final.error.message, final.error.message
    assert "heartbeat" not in final.error.message


class SilentSidecar:
    """Registers, then says nothing at all (not even pongs): a frozen sidecar."""

    def __init__(self, address: str, agent_address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._quiet = threading.Event()

        def requests() -> Iterator[agent_service_pb2.ConnectRequest]:
            yield agent_service_pb2.ConnectRequest(register=agent_service_pb2.Register(
                sidecar_id="silent", addresses=[agent_address], capacity=1))
            self._quiet.wait()

        self._call = agent_service_pb2_grpc.AgentServiceStub(self._channel).Connect(requests())
        self.received: list[str] = []
        self.ended = threading.Event()

        def pump() -> None:
            with contextlib.suppress(grpc.RpcError):
                for message in self._call:
                    self.received.append(message.WhichOneof("msg") or "")
            self.ended.set()

        threading.Thread(target=pump, daemon=True).start()
        wait_until(lambda: "registered" in self.received or self.ended.is_set(), 10, what="Registered")

    def close(self) -> None:
        self._quiet.set()
        self._call.cancel()
        self._channel.close()


async def _silent_for(srv: Any, sidecar_id: str, seconds: float) -> bool:
    now = time.monotonic()
    return any(s.sidecar_id == sidecar_id and now - s.last_heard > seconds for s in srv.plane.agents.streams)


def test_nothing_is_claimed_for_a_silent_stream(make_server: Any, database_url: str, agent_address: str) -> None:
    """Finding 14: a stream counted as live until the server closed it after
    three silent ping intervals, and intents were claimed for it all that
    time; each waited out the ack timeout, its attempt spent."""
    srv = make_server()  # pings every 200 ms
    silent = SilentSidecar(srv.address, agent_address)
    try:
        wait_until(lambda: srv.call(_silent_for(srv, "silent", 0.35)), 10, what="the stream silent")
        with IntentClient(srv.address) as client:
            intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
            assert silent.ended.wait(10), "the server did not close the silent stream"
            waiting = client.get(intent_id)
    finally:
        silent.close()
    assert "assignment" not in silent.received
    assert (waiting.state, waiting.attempt) == (IntentState.PENDING, 0)
    assert events(database_url, intent_id) == [("CREATED", "", 0)]


def test_claims_for_a_stream_that_fell_silent_meanwhile_are_given_back(
        make_server: Any, database_url: str, agent_address: str) -> None:
    """Finding 14: what a dispatcher claimed went to the stream whatever it
    had heard from it meanwhile (here the claim takes longer than the stream
    may be silent, as when PostgreSQL stalls)."""
    srv = make_server()
    leases = srv.plane.agents.leases
    claim = leases.claim

    async def slow_claim(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.5)
        return await claim(*args, **kwargs)

    leases.claim = slow_claim
    with IntentClient(srv.address) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
        silent = SilentSidecar(srv.address, agent_address)
        try:
            assert silent.ended.wait(10), "the server did not close the silent stream"
            wait_until(lambda: client.get(intent_id).state is IntentState.PENDING
                       and client.get(intent_id).attempt == 1, 10, what="the claim given back")
            back = client.get(intent_id)
        finally:
            silent.close()
            leases.claim = claim
    assert "assignment" not in silent.received
    assert events(database_url, intent_id) == [("CREATED", "", 0), ("DELIVERED", "", 1), ("RELEASED", "DRAINED", 1)]
    assert back.max_attempts == 4  # never sent: the attempt is given back


def _put_type(address: str, intent_type: str, heartbeat_ms: int, max_attempts: int) -> None:
    with grpc.insecure_channel(address) as channel:
        admin_service_pb2_grpc.AdminServiceStub(channel).PutIntentType(admin_service_pb2.PutIntentTypeRequest(
            intent_type=admin_service_pb2.IntentType(intent_type=intent_type, max_attempts=max_attempts,
                                                     heartbeat_timeout_ms=heartbeat_ms)), timeout=10)


async def _live_stream(srv: Any, sidecar_id: str, fresh_s: float) -> bool:
    now = time.monotonic()
    return any(s.sidecar_id == sidecar_id and not s.closed and s.free > 0 and now - s.last_heard < fresh_s
               for s in srv.plane.agents.streams)


def test_frozen_sidecar_never_gets_its_lapsed_intent_back(
        make_server: Any, database_url: str, agent_address: str, sidecars: Any, tmp_path: Path) -> None:
    """Finding 14: a frozen (SIGSTOP) sidecar's stream stays open on the
    server for three ping intervals; when its lease lapsed sooner, the next
    attempt was claimed for that same frozen stream and waited out the ack
    timeout, and with max_attempts 2 the intent dead-lettered although
    another sidecar for the address was about to be free. Now a dispatcher
    does not claim for a stream silent longer than it may be."""
    ping_ms = 500
    srv = make_server(ping_interval_ms=ping_ms, heartbeat_timeout_ms=5000, ack_timeout_ms=2000)
    intent_type = f"test.hardening.freeze{uuid.uuid4().hex[:6]}.v1"
    _put_type(srv.address, intent_type, 3 * ping_ms + 100, 2)  # just above the least allowed
    frozen = sidecars(srv.address, agent_address, agent_types=intent_type, name="A",
                      sidecar_types=intent_type)
    other = sidecars(srv.address, agent_address, agent_types=f"{intent_type},{BLOCK}", name="B",
                     sidecar_types=f"{intent_type},{BLOCK}")
    with IntentClient(srv.address) as client:
        for sidecar_id in ("A", "B"):
            wait_until(lambda s=sidecar_id: srv.call(_live_stream(srv, s, 5.0)), 60, what=f"sidecar {sidecar_id} up")
        for round_no in range(3):
            flag = tmp_path / f"unblock-{round_no}"
            # B is busy (capacity 1) while A takes the intent and freezes.
            blocker = client.send_intent(intent_type=BLOCK, to_agent=agent_address,
                                         payload={"block_until": str(flag)})
            wait_until(lambda b=blocker: client.get(b).state is IntentState.IN_PROGRESS, 30, what="B busy")
            target = client.send_intent(intent_type=intent_type, to_agent=agent_address,
                                        payload={"hang_on": "A"}, max_attempts=2)
            wait_until(lambda t=target: client.get(t).state is IntentState.IN_PROGRESS, 30, what="A running it")
            os.kill(frozen.pid, signal.SIGSTOP)
            try:
                wait_until(lambda t=target: client.get(t).state is not IntentState.IN_PROGRESS, 30,
                           what="the frozen sidecar's lease to lapse")
                flag.touch()  # B is free from now on
                final = client.wait_for(target, timeout=60)
                deliveries = [e for e in events(database_url, target) if e[0] == "DELIVERED"]
                assert final.state is IntentState.COMPLETED, (
                    f"round {round_no}: {final.state.value} ({final.error}); events "
                    f"{events(database_url, target)}\n{sidecars.logs()}")
                assert final.attempt == 2 and len(deliveries) == 2
                assert final.result == {"by": "B", "attempt": 2}
                assert client.wait_for(blocker, timeout=30).state is IntentState.COMPLETED
            finally:
                os.kill(frozen.pid, signal.SIGCONT)
            # The woken sidecar finds its stream dead, reconnects and is free again.
            wait_until(lambda: srv.call(_live_stream(srv, "A", 1.0)), 30, what="sidecar A back")
    assert other.alive() and frozen.alive()
