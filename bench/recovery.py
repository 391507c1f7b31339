"""Scenario 5, recovery: how long an intent is stranded after a SIGKILL.

Agent killed, sidecar alive: one sidecar with three bench agents attached
(started by the bench, capacity 1 each, so a killed one is replaced at once,
without the supervisor's crash backoff). A ``bench.hang.v1`` intent starts a
step that never ends; the agent process holding it is SIGKILLed. Measured:
kill -> the intent's next DELIVERED event (``intent_events.time``, the
database clock of this machine) and kill -> the handler running again (the
agent's own ``time.time()``). Baseline: send -> first DELIVERED of the same
intents.

Sidecar killed: two sidecars, each supervising one agent; the process group
of the sidecar whose agent holds the intent is SIGKILLed (sidecar and agent
die without a word), so the lease lapses after the intent type's heartbeat
timeout and the lease sweeper returns it. Measured: kill -> next DELIVERED
(on the other sidecar). A replacement sidecar is started at once; each kill
starts at a random phase of the 1 s ping and sweep ticks (else the loop
locks onto the sweeper and measures one point).

After each kill the intent is canceled and the bench waits for the agent
running attempt 2 to report the revocation (``<id>.2.stopped``). When it
does not arrive, the revocation was lost: that is counted (``lost_revocations``)
and the agent (or its sidecar) is replaced so its slot is not leaked into
the next kill.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from bench.harness import Proc, Server, Sidecar, agent_proc, fresh_database, percentile, put_intent_type
from bench.suite import Run
from intentd.client import AsyncIntentClient

ADDRESS = "agent://bench/recovery/hang"
TYPE = "bench.hang.v1"
# The least heartbeat timeout the server takes with its 1 s pings.
HEARTBEAT_MS = 3000
DELIVERED = ("SELECT extract(epoch FROM time)::float8 FROM intent_events"
             " WHERE intent_id = $1 AND type = 'DELIVERED' AND attempt = $2")
REVOCATION_WAIT_S = 3.0


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


async def _wait_file(path: Path, timeout: float = 30.0) -> str | None:
    """The marker a bench agent writes (see bench/agents/noop.py); None on timeout."""
    deadline = time.monotonic() + timeout
    while not (text := _read(path)):
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.005)
    return text


async def _wait_delivered(conn: asyncpg.Connection, intent_id: str, attempt: int, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = await conn.fetchval(DELIVERED, intent_id, attempt)
        if value is not None:
            return float(value)
        if time.monotonic() > deadline:
            raise RuntimeError(f"intent {intent_id} not delivered for attempt {attempt} after {timeout}s")
        await asyncio.sleep(0.005)


def _pid(marker: str | None) -> int | None:
    return int(marker.split()[0]) if marker else None


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


@dataclass
class Kills:
    first: list[float] = field(default_factory=list)  # send -> DELIVERED (attempt 1)
    redelivered: list[float] = field(default_factory=list)  # kill -> DELIVERED (attempt 2)
    resumed: list[float] = field(default_factory=list)  # kill -> handler of attempt 2 running
    lost_revocations: int = 0
    not_resumed: int = 0
    # "revoking ... LEASE_LOST" lines in the server log: no lease was lost here
    lease_lost_revocations: int = 0


async def _settle_attempt_two(client: AsyncIntentClient, state: Path, intent_id: str, kills: Kills) -> int | None:
    """Cancels the intent; returns the pid of an agent that kept running
    attempt 2 (its revocation was lost), else None."""
    await client.cancel(intent_id, reason="bench: measured")
    running = await _wait_file(state / f"{intent_id}.2", timeout=0.1)
    if running is None:
        return None
    if await _wait_file(state / f"{intent_id}.2.stopped", timeout=REVOCATION_WAIT_S) is None:
        kills.lost_revocations += 1
        return _pid(running)
    return None


async def _first_attempt(client: AsyncIntentClient, conn: asyncpg.Connection, state: Path,
                         kills: Kills) -> tuple[str, int]:
    """Sends an intent and times its first delivery; returns its id and the
    pid of the agent running its attempt 1."""
    sent = time.time()
    intent_id = await client.send_intent(intent_type=TYPE, to_agent=ADDRESS, payload={})
    pid = _pid(await _wait_file(state / f"{intent_id}.1"))
    if pid is None:
        raise RuntimeError(f"intent {intent_id} never started")
    kills.first.append((await _wait_delivered(conn, intent_id, 1) - sent) * 1000)
    return intent_id, pid


async def agent_kills(run: Run, url: str, state: Path) -> Kills:
    kills = Kills()
    server = Server(url).start()
    sidecar: Sidecar | None = None
    agents: list[Proc] = []
    env = {"BENCH_STATE_DIR": str(state)}
    try:
        await server.ready()
        await put_intent_type(server.address, TYPE, max_attempts=10, heartbeat_timeout_ms=HEARTBEAT_MS)
        sidecar = Sidecar(server.address, ADDRESS, capacity=3, agent=None).start()
        await sidecar.ready(agents=0)
        agents = [agent_proc(sidecar, ADDRESS, 1, **env).start() for _ in range(3)]
        started = 3
        await sidecar.wait_log("attached (python", count=started)
        conn = await asyncpg.connect(url)
        client = AsyncIntentClient(server.address)
        try:
            for _ in range(run.config.kills):
                intent_id, pid = await _first_attempt(client, conn, state, kills)
                os.kill(pid, signal.SIGKILL)
                killed = time.time()
                kills.redelivered.append((await _wait_delivered(conn, intent_id, 2) - killed) * 1000)
                resumed = await _wait_file(state / f"{intent_id}.2", timeout=10.0)
                if resumed is None:
                    kills.not_resumed += 1
                else:
                    kills.resumed.append((float(resumed.split()[2]) - killed) * 1000)
                stuck = await _settle_attempt_two(client, state, intent_id, kills)
                if resumed is None and stuck is None:
                    stuck = -1  # attempt 2 never ran: some agent's slot may be held; replace all
                victims = [a for a in agents if a.pid == pid or a.pid == stuck or stuck == -1]
                for victim in victims:
                    victim.kill_group()
                    agents.remove(victim)
                    agents.append(agent_proc(sidecar, ADDRESS, 1, **env).start())
                    started += 1
                await sidecar.wait_log("attached (python", count=started)
        finally:
            await client.close()
            await conn.close()
    finally:
        for proc in [*agents, *([sidecar] if sidecar else [])]:
            proc.kill_group()
        kills.lease_lost_revocations = server.log().count(": LEASE_LOST")
        server.stop(grace=3.0)
    return kills


async def sidecar_kills(run: Run, url: str, state: Path) -> Kills:
    kills = Kills()
    server = Server(url).start()
    env = {"BENCH_STATE_DIR": str(state)}
    sidecars: list[Sidecar] = []

    def replace(victim: Sidecar) -> Sidecar:
        victim.kill_group()
        sidecars.remove(victim)
        fresh = Sidecar(server.address, ADDRESS, capacity=1, env=env).start()
        sidecars.append(fresh)
        return fresh

    try:
        await server.ready()
        await put_intent_type(server.address, TYPE, max_attempts=10, heartbeat_timeout_ms=HEARTBEAT_MS)
        sidecars = [Sidecar(server.address, ADDRESS, capacity=1, env=env).start() for _ in range(2)]
        await asyncio.gather(*(s.ready() for s in sidecars))
        conn = await asyncpg.connect(url)
        client = AsyncIntentClient(server.address)
        try:
            for _ in range(run.config.kills):
                await asyncio.sleep(random.uniform(0.0, 1.0))
                intent_id, pid = await _first_attempt(client, conn, state, kills)
                holder = next(s for s in sidecars if s.pid == _parent(pid))
                fresh = [replace(holder)]  # SIGKILLs the sidecar's process group
                killed = time.time()
                kills.redelivered.append((await _wait_delivered(conn, intent_id, 2) - killed) * 1000)
                stuck = await _settle_attempt_two(client, state, intent_id, kills)
                if stuck is not None:
                    leaking = next((s for s in sidecars if s.pid == _parent(stuck)), None)
                    if leaking is not None:
                        fresh.append(replace(leaking))
                await asyncio.gather(*(s.ready() for s in fresh))
        finally:
            await client.close()
            await conn.close()
    finally:
        for proc in sidecars:
            proc.kill_group()
        kills.lease_lost_revocations = server.log().count(": LEASE_LOST")
        server.stop(grace=3.0)
    return kills


async def run(run: Run) -> None:
    with tempfile.TemporaryDirectory(prefix="intentd-bench-state-") as tmp:
        async with fresh_database("recovery") as url:
            agent = await agent_kills(run, url, Path(tmp))
        async with fresh_database("recovery") as url:
            sidecar = await sidecar_kills(run, url, Path(tmp))
    k = run.config.kills
    iqr = {"spread": "IQR"}
    run.figure("recovery.first_p50", f"Live: send -> DELIVERED p50 ({k} intents)", "ms", agent.first,
               baseline="limits.pg1_p50", **iqr)
    run.figure("recovery.agent_p50", f"Agent SIGKILL -> next DELIVERED p50 ({k} kills)", "ms",
               agent.redelivered, baseline="recovery.first_p50", target="<=250", **iqr)
    run.figure("recovery.agent_p99", f"Agent SIGKILL -> next DELIVERED p99 ({k} kills)", "ms",
               [percentile(agent.redelivered, 99)], baseline="recovery.first_p50")
    run.figure("recovery.agent_resume_p50", "Agent SIGKILL -> handler running again p50", "ms",
               agent.resumed or [math.nan], baseline="recovery.first_p50", **iqr)
    run.figure("recovery.heartbeat", "Heartbeat timeout (setting, bench.hang.v1)", "ms", [HEARTBEAT_MS],
               baseline="recovery.heartbeat", note="configured per intent type; server ping 1 s, sweep 1 s")
    run.figure("recovery.sidecar_p50", f"Sidecar SIGKILL -> next DELIVERED p50 ({k} kills)", "ms",
               sidecar.redelivered, baseline="recovery.heartbeat", **iqr)
    run.figure("recovery.sidecar_p99", f"Sidecar SIGKILL -> next DELIVERED p99 ({k} kills)", "ms",
               [percentile(sidecar.redelivered, 99)], baseline="recovery.heartbeat")
    run.figure("recovery.sidecar_margin_p50", "Sidecar kill: margin over the heartbeat timeout p50", "ms",
               [x - HEARTBEAT_MS for x in sidecar.redelivered], baseline="recovery.heartbeat", **iqr)
    run.note("recovery", heartbeat_timeout_ms=HEARTBEAT_MS, server_ping_interval_ms=1000, sweep_interval_s=1.0,
             agent_kills=agent.__dict__, sidecar_kills=sidecar.__dict__)
