"""Scenario 9, child intents (docs/children.md).

(a) Fan-out/fan-in: a parent starts 1,000 no-op children in one
    ``start_many`` and gathers them; against 1,000 independent intents of the
    same work (two ``SendIntents`` of 500, their ends watched by listing the
    live ones). Time from the send to the last completion, and PostgreSQL
    commits per child (aim: within 1.5x of the independent intents, both);
    the bench's own reads are not counted.
(b) A call to a child that completes at once: ``ctx.call`` as the parent's
    handler sees it, p50/p99, against send -> handler start of a plain intent
    measured in the same run (aim: p50 <= 2x).
"""

from __future__ import annotations

import asyncio
import time

from bench.harness import CommitMeter, fresh_database, percentile, start_cluster
from bench.latency import sample
from bench.suite import Run
from intentd.client import AsyncIntentClient, IntentState

ADDRESS = "agent://bench/children/noop"
LEAF = "bench.family.leaf.v1"
FANOUT = "bench.family.fanout.v1"
CALL = "bench.family.call.v1"


async def fan_out(client: AsyncIntentClient, children: int) -> float:
    """Seconds from sending a parent of ``children`` children to its end."""
    began = time.monotonic()
    parent = await client.send_intent(intent_type=FANOUT, to_agent=ADDRESS, payload={"children": children})
    final = await client.wait_for(parent, timeout=300)
    if final.state is not IntentState.COMPLETED or final.result != {"n": children}:
        raise RuntimeError(f"fan-out parent ended {final.state.value}: {final.error} {final.result}")
    if final.attempt - final.parked_attempts != 1 or final.parked_attempts > 1:
        raise RuntimeError(f"the fan-out parent took {final.attempt} deliveries ({final.parked_attempts} parked)")
    return time.monotonic() - began


async def independent(client: AsyncIntentClient, count: int, meter: CommitMeter) -> float:
    """Seconds from sending ``count`` leaf intents to the last one's end.
    Their ends are watched by listing the live ones (not by reading each:
    every read is a transaction, and the fan-out's parent is waited for with
    one call); the listings are the bench's own commits, not counted."""
    began = time.monotonic()
    for start in range(0, count, 500):
        await client.send_intents([{"intent_type": LEAF, "to_agent": ADDRESS, "payload": {"n": n}}
                                   for n in range(start, min(count, start + 500))])
    live = [IntentState.PENDING, IntentState.DELIVERED, IntentState.IN_PROGRESS]
    while (await client.list(states=live, intent_type=LEAF, page_size=1)).intents:
        meter.own += 1
        await asyncio.sleep(0.02)
    took = time.monotonic() - began
    ended_badly = await client.list(states=[IntentState.FAILED, IntentState.CANCELED, IntentState.TIMED_OUT],
                                    intent_type=LEAF, page_size=1)
    meter.own += 2
    if ended_badly.intents:
        raise RuntimeError(f"a leaf intent ended {ended_badly.intents[0].state.value}")
    return took


async def call_latency(client: AsyncIntentClient, n: int) -> list[float]:
    out = []
    for _ in range(n):
        parent = await client.send_intent(intent_type=CALL, to_agent=ADDRESS, payload={})
        final = await client.wait_for(parent, timeout=60)
        if final.state is not IntentState.COMPLETED:
            raise RuntimeError(f"call parent ended {final.state.value}: {final.error}")
        if final.attempt != 1:
            raise RuntimeError(f"the call's parent was redelivered ({final.attempt}) within the hold window")
        out.append(float(final.result["ms"]))
    return out


async def run(run: Run) -> None:
    cfg = run.config
    children = 200 if cfg.quick else 1000
    n = 20 if cfg.quick else 50
    family_s, alone_s, family_commits, alone_commits = [], [], [], []
    calls, base = [], []
    async with fresh_database("children") as url:
        cluster = await start_cluster(url, ADDRESS, cfg.e2e_sidecars, cfg.e2e_capacity)
        client = AsyncIntentClient(cluster.server.address)
        try:
            await fan_out(client, 20)  # warm-up
            meter = CommitMeter(url)
            await independent(client, 20, meter)
            await call_latency(client, 5)
            await sample(client, 10, ADDRESS)
            await meter.mark()
            for _ in range(cfg.reps):
                alone_s.append(await independent(client, children, meter))
                alone_commits.append(await meter.mark() / children)
                family_s.append(await fan_out(client, children))
                family_commits.append(await meter.mark() / children)
            for _ in range(cfg.reps):
                rep = await sample(client, n, ADDRESS)
                base.append(percentile(rep["dispatch"], 50))
                calls.append(await call_latency(client, n))
        finally:
            await client.close()
            cluster.close()
    run.figure("children.independent_s", f"{children} independent no-op intents, send -> all done", "s", alone_s)
    run.figure("children.fanout_s", f"Fan-out/fan-in of {children} no-op children, send -> parent done", "s",
               family_s, baseline="children.independent_s", target="<=1.5x")
    run.figure("children.independent_commits", "PostgreSQL commits per independent intent", "commits",
               alone_commits)
    run.figure("children.fanout_commits", "PostgreSQL commits per child of a fan-out", "commits", family_commits,
               baseline="children.independent_commits", target="<=1.5x")
    run.figure("children.base_dispatch_p50", f"Plain send -> handler start p50 (n={n})", "ms", base)
    run.figure("children.call_p50", f"ctx.call of a child that completes at once, parent side p50 (n={n})", "ms",
               [percentile(r, 50) for r in calls], baseline="children.base_dispatch_p50", target="<=2x")
    run.figure("children.call_p99", f"ctx.call of a child that completes at once, parent side p99 (n={n})", "ms",
               [percentile(r, 99) for r in calls], baseline="children.base_dispatch_p50")
