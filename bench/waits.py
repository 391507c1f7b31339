"""Scenario 8, durable waits.

(a) Hold window: an intent whose handler waits for a signal while its
    attempt still holds the wait (the intent type's ``wait_hold_ms`` is 10 s);
    the bench sends the signal once GetIntent says the intent waits, and the
    agent returns ``time.time()`` taken as the wait returned: signal -> wait
    returns, p50/p99 (aim: p50 <= 10 ms). Same clock, same machine.
(b) Parked: the same with ``wait_hold_ms`` 0 and 50 recorded steps before the
    wait: the intent parks (WAITING, no lease); the signal wakes it, a new
    delivery replays the 50 steps and the wait returns (aim: p50 <= 30 ms).
    The baseline for both: send -> handler start of a plain intent
    (``latency.dispatch_p50``), measured here in the same run.
(c) Timers: 50 intents at once each sleep 1 s durably and park (hold 0):
    how late each timer fired (its TIMER_FIRED event against its due time,
    both on the database clock), p50/p99 (the sweep runs every 0.2 s; aim:
    within 1 s).
(d) 10,000 parked intents: send -> handler start and SendIntent latency of
    other intents with an empty table, then with 10,000 intents WAITING on
    the same addresses (aim: within 1.2x).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import grpc

from bench.harness import fresh_database, percentile, start_cluster
from bench.latency import sample
from bench.suite import Run
from intentd.client import AsyncIntentClient, IntentState
from intentd.generated.v1 import admin_service_pb2, admin_service_pb2_grpc

ADDRESS = "agent://bench/waits/noop"
HELD = "bench.wait.held.v1"
PARKED = "bench.wait.parked.v1"
TIMER = "bench.wait.timer.v1"
LATENESS = """
SELECT extract(epoch FROM e.time - w.due_at)::float8 * 1000 AS ms
FROM intent_waits w JOIN intent_events e ON e.intent_id = w.intent_id AND e.type = 'TIMER_FIRED'
WHERE w.intent_id = ANY($1::text[]) AND w.kind = 'TIME'
"""
WAITING_COUNT = "SELECT count(*) FROM intents WHERE state = 'WAITING' AND intent_type = $1"


async def put_hold(server: str, intent_type: str, hold_ms: int) -> None:
    async with grpc.aio.insecure_channel(server) as channel:
        await admin_service_pb2_grpc.AdminServiceStub(channel).PutIntentType(admin_service_pb2.PutIntentTypeRequest(
            intent_type=admin_service_pb2.IntentType(intent_type=intent_type, wait_hold_ms=hold_ms)), timeout=10)


async def until_waiting(client: AsyncIntentClient, intent_id: str, *, parked: bool, timeout: float = 60) -> None:
    """Until the intent's handler reached its wait (parked: the intent is WAITING)."""
    stop = time.monotonic() + timeout
    while time.monotonic() < stop:
        intent = await client.get(intent_id)
        if intent.waiting is not None and (not parked or intent.state is IntentState.WAITING):
            return
        await asyncio.sleep(0.002)
    raise RuntimeError(f"intent {intent_id} never reached its wait")


async def signal_latency(client: AsyncIntentClient, intent_type: str, n: int, steps: int,
                         parked: bool) -> list[float]:
    """Milliseconds from SignalIntent to the wait's return, ``n`` intents one at a time."""
    out = []
    for _ in range(n):
        intent_id = await client.send_intent(intent_type=intent_type, to_agent=ADDRESS,
                                             payload={"steps": steps})
        await until_waiting(client, intent_id, parked=parked)
        t0 = time.time()
        await client.signal(intent_id, "go", {"n": 1})
        final = await client.wait_for(intent_id, timeout=60)
        if final.state is not IntentState.COMPLETED:
            raise RuntimeError(f"wait intent ended {final.state.value}: {final.error}")
        if parked and final.parked_attempts != 1:
            raise RuntimeError(f"intent {intent_id} was expected to park once, parked {final.parked_attempts}")
        if not parked and final.attempt != 1:
            raise RuntimeError(f"intent {intent_id} was redelivered ({final.attempt}) within the hold window")
        out.append((final.result["returned"] - t0) * 1000)
    return out


async def timer_lateness(client: AsyncIntentClient, conn: asyncpg.Connection, n: int) -> list[float]:
    """Milliseconds each of ``n`` parked one-second timers fired after its due time."""
    ids = await client.send_intents([{"intent_type": TIMER, "to_agent": ADDRESS, "payload": {"seconds": 1.0}}
                                     for _ in range(n)])
    finals = await asyncio.gather(*(client.wait_for(i, timeout=60) for i in ids))
    if any(f.state is not IntentState.COMPLETED or f.parked_attempts != 1 for f in finals):
        raise RuntimeError("a timer intent did not park once and complete")
    return [float(r["ms"]) for r in await conn.fetch(LATENESS, ids)]


async def park_many(client: AsyncIntentClient, conn: asyncpg.Connection, count: int) -> None:
    for start in range(0, count, 500):
        await client.send_intents([{"intent_type": PARKED, "to_agent": ADDRESS, "payload": {"steps": 0}}
                                   for _ in range(min(500, count - start))])
    stop = time.monotonic() + 600
    while await conn.fetchval(WAITING_COUNT, PARKED) < count:
        if time.monotonic() > stop:
            raise RuntimeError("the parked intents did not all reach WAITING in 10 minutes")
        await asyncio.sleep(0.2)


async def run(run: Run) -> None:
    cfg = run.config
    n = 20 if cfg.quick else 50
    parked_n = 1000 if cfg.quick else 10_000
    held, parked, base_dispatch = [], [], []
    late: list[list[float]] = []
    empty: dict[str, list[float]] = {"dispatch": [], "send": []}
    full: dict[str, list[float]] = {"dispatch": [], "send": []}
    async with fresh_database("waits") as url:
        cluster = await start_cluster(url, ADDRESS, cfg.e2e_sidecars, cfg.e2e_capacity)
        client = AsyncIntentClient(cluster.server.address)
        conn = await asyncpg.connect(url)
        try:
            await put_hold(cluster.server.address, HELD, 10_000)
            await put_hold(cluster.server.address, PARKED, 0)
            await put_hold(cluster.server.address, TIMER, 0)
            await signal_latency(client, HELD, 5, 0, parked=False)  # warm-up
            await signal_latency(client, PARKED, 5, 50, parked=True)
            await sample(client, 20, ADDRESS)
            for _ in range(cfg.reps):
                base = await sample(client, n, ADDRESS)
                base_dispatch.append(percentile(base["dispatch"], 50))
                held.append(await signal_latency(client, HELD, n, 0, parked=False))
                parked.append(await signal_latency(client, PARKED, n, 50, parked=True))
            late += [await timer_lateness(client, conn, 50) for _ in range(cfg.reps)]
            for _ in range(cfg.reps):
                rep = await sample(client, cfg.latency_n, ADDRESS)
                empty["dispatch"].append(percentile(rep["dispatch"], 50))
                empty["send"].append(percentile(rep["send"], 50))
            began = time.monotonic()
            await park_many(client, conn, parked_n)
            run.note("waits", parked=parked_n, park_seconds=round(time.monotonic() - began, 1))
            for _ in range(cfg.reps):
                rep = await sample(client, cfg.latency_n, ADDRESS)
                full["dispatch"].append(percentile(rep["dispatch"], 50))
                full["send"].append(percentile(rep["send"], 50))
        finally:
            await conn.close()
            await client.close()
            cluster.close()
    run.figure("waits.base_dispatch_p50", f"Plain send -> handler start p50 (n={n})", "ms", base_dispatch)
    run.figure("waits.held_p50", f"Signal -> wait returns, hold window p50 (n={n})", "ms",
               [percentile(r, 50) for r in held], baseline="waits.base_dispatch_p50", target="<=10")
    run.figure("waits.held_p99", f"Signal -> wait returns, hold window p99 (n={n})", "ms",
               [percentile(r, 99) for r in held], baseline="waits.base_dispatch_p50")
    run.figure("waits.parked_p50", f"Signal -> wait returns, parked, 50 steps replayed p50 (n={n})", "ms",
               [percentile(r, 50) for r in parked], baseline="waits.base_dispatch_p50", target="<=30")
    run.figure("waits.parked_p99", f"Signal -> wait returns, parked, 50 steps replayed p99 (n={n})", "ms",
               [percentile(r, 99) for r in parked], baseline="waits.base_dispatch_p50")
    run.figure("waits.timer_late_p50", "Parked 1 s timer fired after its due time p50 (50 at once)", "ms",
               [percentile(r, 50) for r in late], target="<=1000")
    run.figure("waits.timer_late_p99", "Parked 1 s timer fired after its due time p99 (50 at once)", "ms",
               [percentile(r, 99) for r in late], target="<=1000")
    run.figure("waits.empty_dispatch_p50", "Send -> handler start p50, no parked intents", "ms", empty["dispatch"])
    run.figure("waits.parked_dispatch_p50", f"Send -> handler start p50, {parked_n} parked intents", "ms",
               full["dispatch"], baseline="waits.empty_dispatch_p50", target="<=1.2x")
    run.figure("waits.empty_send_p50", "SendIntent p50, no parked intents", "ms", empty["send"])
    run.figure("waits.parked_send_p50", f"SendIntent p50, {parked_n} parked intents", "ms", full["send"],
               baseline="waits.empty_send_p50", target="<=1.2x")
