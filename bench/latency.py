"""Scenario 4, latency on an idle system: sequential one-step intents on the
standard cluster (4 sidecars x 50), one at a time.

- send -> handler start: the agent returns ``time.time()`` taken as its
  handler starts; the bench takes ``time.time()`` just before SendIntent
  (same machine, same clock);
- SendIntent alone: the RPC's duration (the intent is committed);
- send -> wait_for returning: the client sees the intent COMPLETED.
"""

from __future__ import annotations

import time

from bench.harness import fresh_database, percentile, start_cluster
from bench.suite import Run
from intentd.client import AsyncIntentClient, IntentState

ADDRESS = "agent://bench/latency/noop"
TYPE = "bench.latency.v1"


async def sample(client: AsyncIntentClient, n: int, address: str = ADDRESS) -> dict[str, list[float]]:
    """``n`` sequential intents: milliseconds of dispatch, send and round trip."""
    out: dict[str, list[float]] = {"dispatch": [], "send": [], "wait": []}
    for _ in range(n):
        t0 = time.time()
        intent_id = await client.send_intent(intent_type=TYPE, to_agent=address, payload={})
        t1 = time.time()
        final = await client.wait_for(intent_id, timeout=60)
        t2 = time.time()
        if final.state is not IntentState.COMPLETED:
            raise RuntimeError(f"latency intent ended {final.state.value}: {final.error}")
        out["dispatch"].append((final.result["start"] - t0) * 1000)
        out["send"].append((t1 - t0) * 1000)
        out["wait"].append((t2 - t0) * 1000)
    return out


def percentiles(samples: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per rep: p50 and p99 of each measure."""
    out: dict[str, list[float]] = {}
    for rep in samples:
        for name, values in rep.items():
            out.setdefault(f"{name}_p50", []).append(percentile(values, 50))
            out.setdefault(f"{name}_p99", []).append(percentile(values, 99))
    return out


async def run(run: Run) -> None:
    cfg = run.config
    reps = []
    async with fresh_database("latency") as url:
        cluster = await start_cluster(url, ADDRESS, cfg.e2e_sidecars, cfg.e2e_capacity)
        client = AsyncIntentClient(cluster.server.address)
        try:
            await sample(client, 20)  # warm-up
            for _ in range(cfg.reps):
                reps.append(await sample(client, cfg.latency_n))
        finally:
            await client.close()
            cluster.close()
    p = percentiles(reps)
    n = cfg.latency_n
    run.figure("latency.dispatch_p50", f"Idle: send -> handler start p50 (n={n})", "ms", p["dispatch_p50"],
               baseline="limits.pg1_p50", target="<=5")
    run.figure("latency.dispatch_p99", f"Idle: send -> handler start p99 (n={n})", "ms", p["dispatch_p99"],
               baseline="limits.pg1_p99", target="<=25")
    run.figure("latency.send_p50", "Idle: SendIntent RPC p50", "ms", p["send_p50"], baseline="limits.grpc_rtt")
    run.figure("latency.send_p99", "Idle: SendIntent RPC p99", "ms", p["send_p99"], baseline="limits.grpc_rtt")
    run.figure("latency.wait_p50", "Idle: send -> wait_for returns p50", "ms", p["wait_p50"],
               baseline="limits.pg1_p50")
    run.figure("latency.wait_p99", "Idle: send -> wait_for returns p99", "ms", p["wait_p99"],
               baseline="limits.pg1_p99")
