"""Failover without loss: a primary and a synchronous streaming standby made
on this machine (initdb, pg_basebackup), the control plane on a multi-host
URL with target_session_attrs=read-write; the primary is SIGKILLed under
load and the standby promoted. Every send acknowledged before the kill is
there, the agent mid-pipeline carries on, no step is recorded twice or run
after it was recorded. The settings it needs: docs/operating.md, "Failover"."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from intentd.client import IntentClient, IntentState
from intentd.server.migrate import migrate
from tests.stack import TYPE, begins, ledger
from tests.support import free_port, run_sync, wait_until

PG_BIN = Path(os.environ.get("INTENTD_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
_BINARIES = ("initdb", "pg_ctl", "pg_basebackup")

pytestmark = [
    pytest.mark.skipif(not all((PG_BIN / b).is_file() for b in _BINARIES),
                       reason=f"needs the PostgreSQL server binaries ({', '.join(_BINARIES)}) in {PG_BIN} "
                       "(or INTENTD_TEST_PG_BIN)"),
    pytest.mark.timeout(180),
]

STANDBY_NAME = "intentd_standby"


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its binaries as postgres."""
    if os.geteuid() != 0:
        return []
    entry = pwd.getpwnam("postgres")
    return [shutil.which("setpriv") or "setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
            "--init-groups"]


def _pg(binary: str, *args: str, timeout: float = 60) -> None:
    done = subprocess.run([*_as_postgres(), str(PG_BIN / binary), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{binary} {' '.join(args)} failed: {done.stderr}{done.stdout}")


@dataclass
class Node:
    data: Path
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        _pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """SIGKILL the postmaster and every process of the cluster at once,
        as when its machine dies: no shutdown, no last WAL sent."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        victims = [pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                        victims.append(int(entry.name))
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            _pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30)


def _sql(url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return [dict(r) for r in await conn.fetch(query, *args)]
        finally:
            await conn.close()

    return list(run_sync(go()))


@dataclass
class Pair:
    primary: Node
    standby: Node
    database: str = "intentd_failover"

    @property
    def url(self) -> str:
        """What the control plane is given: both hosts, the writable one wins."""
        return (f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}/"
                f"{self.database}?target_session_attrs=read-write")

    def url_of(self, node: Node) -> str:
        return f"postgresql://postgres@127.0.0.1:{node.port}/{self.database}"


@pytest.fixture
def pair() -> Iterator[Pair]:
    root = Path(tempfile.mkdtemp(prefix="intentd-failover-", dir="/var/tmp"))
    if os.geteuid() == 0:
        os.chown(root, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)
    primary = Node(root / "primary", free_port(), root / "primary.log")
    standby = Node(root / "standby", free_port(), root / "standby.log")
    try:
        _pg("initdb", "-D", str(primary.data), "-U", "postgres", "--auth=trust", "--no-sync", timeout=120)
        (primary.data / "postgresql.auto.conf").write_text(
            f"port = {primary.port}\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{root}'\n"
            "wal_level = replica\n"
            "max_wal_senders = 4\n"
            # A commit is acknowledged once the standby has flushed it: what
            # makes an acknowledged send survive losing the primary.
            f"synchronous_standby_names = '{STANDBY_NAME}'\n"
            "synchronous_commit = on\n"
            "hot_standby = on\n"
            "max_connections = 100\n"
            "shared_buffers = 32MB\n"
        )
        primary.start()
        _pg("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres", "-D", str(standby.data),
            "-X", "stream", "--checkpoint=fast", "-R", timeout=120)
        with (standby.data / "postgresql.auto.conf").open("a") as f:
            # Promoted, it has no standby of its own: with the primary's
            # synchronous_standby_names (copied by pg_basebackup) every commit
            # would wait forever for one. Ignored while it is a standby.
            f.write(f"port = {standby.port}\n"
                    "synchronous_standby_names = ''\n"
                    f"primary_conninfo = 'host=127.0.0.1 port={primary.port} user=postgres "
                    f"application_name={STANDBY_NAME}'\n")
        standby.start()
        wait_until(lambda: _sql(primary.url, "SELECT 1 FROM pg_stat_replication WHERE application_name = $1"
                                " AND sync_state = 'sync' AND state = 'streaming'", STANDBY_NAME), 60,
                   0.1, "the standby streaming synchronously")
        yield Pair(primary, standby)
    finally:
        primary.kill()
        standby.stop()
        standby.kill()
        shutil.rmtree(root, ignore_errors=True)


def test_sigkilled_primary_promoted_standby_loses_no_acknowledged_send(pair: Pair, cluster: Any) -> None:
    _sql(pair.primary.url, f'CREATE DATABASE "{pair.database}"')

    async def migrated() -> None:
        conn = await asyncpg.connect(pair.url_of(pair.primary))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    run_sync(migrated())
    # The side-effect ledger stays on the shared PostgreSQL (cluster.db): it is
    # the outside world, which the failover does not touch.
    server = cluster.server(INTENTD_DATABASE_URL=pair.url, INTENTD_HEARTBEAT_TIMEOUT_MS="4000")
    cluster.sidecar(server.address, capacity="8")

    acked: list[str] = []
    send_errors: list[str] = []
    stop_sending = threading.Event()

    def keep_sending() -> None:
        with IntentClient(server.address, sender="failover", max_retries=200, max_backoff=0.5) as sender:
            while not stop_sending.is_set():
                try:
                    acked.append(sender.send_intent(intent_type=TYPE, to_agent=cluster.address,
                                                    payload={"steps": 3}))
                except Exception as exc:  # reported below: a send the client gave up on is not acknowledged
                    send_errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)

    with IntentClient(server.address, max_retries=200, max_backoff=0.5) as client:
        long_id = client.send_intent(intent_type=TYPE, to_agent=cluster.address,
                                     payload={"steps": 40, "step_seconds": 0.1})
        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        wait_until(lambda: begins(ledger(cluster.db, long_id))[8], 60, 0.05, what="the long intent at step 8")
        wait_until(lambda: len(acked) >= 20, 30, what="20 sends acknowledged")

        acked_before_kill = list(acked)
        steps_at_kill = max(begins(ledger(cluster.db, long_id)))
        killed_at = time.monotonic()
        pair.primary.kill()
        _pg("pg_ctl", "-D", str(pair.standby.data), "-w", "-t", "60", "promote")
        promoted_after = time.monotonic() - killed_at
        # Sends go on through the failover (the client retries UNAVAILABLE
        # with its idempotency key); some must be acknowledged after it.
        count_at_promotion = len(acked)
        try:
            wait_until(lambda: len(acked) >= count_at_promotion + 10, 60, what="sends acknowledged after the promotion")
        except AssertionError:
            raise AssertionError(f"{send_errors}\n{cluster.logs()}") from None
        stop_sending.set()
        sender.join(30)
        finals = {i: client.wait_for(i, timeout=90) for i in [long_id, *acked]}

    new_primary = pair.url_of(pair.standby)
    stored = {r["id"]: r for r in _sql(new_primary, "SELECT id, state::text AS state, attempt, sender FROM intents")}
    missing = [i for i in acked_before_kill if i not in stored]
    assert not missing, f"acknowledged before the kill, gone after the promotion: {missing}\n{cluster.logs()}"
    assert all(i in stored for i in acked), "an acknowledged send is missing"
    # No send was stored twice by the client's retries through the failover.
    assert sum(1 for r in stored.values() if r["sender"] == "failover") == len(acked), (len(acked), send_errors)
    assert not send_errors, send_errors
    assert {i: f.state for i, f in finals.items() if f.state != IntentState.COMPLETED} == {}, cluster.logs()

    # The agent mid-pipeline resumed: the same attempt carried on, every step ran once.
    assert finals[long_id].attempt == 1, cluster.logs()
    ran = begins(ledger(cluster.db, long_id))
    assert sorted(ran) == list(range(1, 41)) and set(ran.values()) == {1}, ran
    assert steps_at_kill < 40, "the primary died after the long intent had finished: no failover mid-pipeline"

    # Nothing recorded twice, nothing run after it was recorded.
    steps = _sql(new_primary, "SELECT intent_id, idx, record_time FROM intent_steps")
    events = _sql(new_primary, "SELECT intent_id, step_index FROM intent_events WHERE type = 'STEP_COMPLETED'")
    twice = [k for k, n in Counter((e["intent_id"], e["step_index"]) for e in events).items() if n > 1]
    assert not twice, twice
    assert len(events) == len(steps)
    recorded = {(s["intent_id"], s["idx"]): s["record_time"] for s in steps}
    late = _sql(cluster.db, "SELECT intent_id, step, at FROM test_ledger WHERE intent_id = ANY($1) AND phase = 'begin'",
                list(finals))
    after_record = [(r["intent_id"], r["step"]) for r in late
                    if (r["intent_id"], r["step"]) in recorded and r["at"] > recorded[(r["intent_id"], r["step"])]]
    assert not after_record, after_record
    print(f"failover: promoted {promoted_after:.2f}s after the kill; {len(acked_before_kill)} sends acknowledged "
          f"before it, {len(acked)} in all, {len(finals)} intents completed")


def test_a_write_on_a_standby_is_unavailable_not_internal(pair: Pair) -> None:
    # A session that reached the standby before its promotion (a URL without
    # target_session_attrs, or a load balancer that moved) must be told to
    # retry, never INTERNAL.
    from intentd.server import errors
    from intentd.server.db import convert_error

    async def write_on_standby() -> BaseException:
        conn = await asyncpg.connect(pair.standby.url)
        try:
            await conn.execute("CREATE TABLE nope (x int)")
        except asyncpg.PostgresError as exc:
            return exc
        finally:
            await conn.close()
        raise AssertionError("the standby took a write")

    exc = run_sync(write_on_standby())
    assert isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError)
    assert isinstance(convert_error(exc), errors.Unavailable)
