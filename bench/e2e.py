"""Scenario 2, end-to-end throughput: one-step no-op intents sent to a real
server and completed by real sidecars and agents.

One server process (``python -m intentd.commands server``, default settings) on a fresh
database, 4 sidecars x capacity 50, each supervising ``bench/agents/noop.py``.
Two send modes: ``SendIntents`` in batches of 500 (sequential calls), and one
``SendIntent`` per call with 64 in flight (``AsyncIntentClient``). A pass
runs from the first send to the last ``finish_time`` (the database clock, the
same machine); completion is polled once every 250 ms with one count query.

A warm-up pass per mode (not reported) also sizes the passes: N intents
(default 20,000) but no more than about ``e2e_pass_s`` seconds of work at the
rate of the pass before, so the suite stays bounded on slow or busy machines
(``--n`` forces N).

Stages: per mode, the p50/p90 gap between consecutive events of an intent
(CREATED -> DELIVERED -> ACKNOWLEDGED -> STEP_COMPLETED -> COMPLETED, and
RELEASED when a delivery was not acknowledged in time), in the JSON notes.

Commits per intent: ``pg_stat_database.xact_commit`` of the database over all
passes of a mode, minus the bench's own polling queries, divided by the
intents; counters are read after they settled (harness.STATS_SETTLE_S). It
includes everything the cluster committed meanwhile (pings renewing leases,
sweepers, dispatch queries).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from bench import profile, statements
from bench.harness import CommitMeter, CpuMeter, fresh_database, start_cluster
from bench.suite import Run
from intentd.client import AsyncIntentClient

ADDRESS = "agent://bench/e2e/noop"
TYPE = "bench.noop.v1"
POLL_S = 0.25
# No completion for this long (more than the 10 s heartbeat timeout plus a
# sweep, after which a lost delivery is redelivered) ends the pass as stalled.
STALL_S = 20.0
COUNT = ("SELECT count(*) FILTER (WHERE state = 'COMPLETED') AS done,"
         " count(*) FILTER (WHERE state IN ('FAILED', 'CANCELED', 'TIMED_OUT')) AS bad FROM intents")
UNFINISHED = "SELECT id FROM intents WHERE state NOT IN ('COMPLETED', 'FAILED', 'CANCELED', 'TIMED_OUT')"
# Where an intent's time goes: the gap between each event and the next.
STAGES = """
SELECT a.type || ' -> ' || b.type AS stage, count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY b.time - a.time) AS p50,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY b.time - a.time) AS p90
FROM intent_events a JOIN intent_events b ON b.intent_id = a.intent_id AND b.seq = a.seq + 1
GROUP BY 1 ORDER BY 2 DESC, 1
"""


@dataclass
class Pass:
    n: int
    seconds: float
    send_seconds: float
    polls: int
    cpu: dict[str, float]
    stalled: int = 0  # intents that never completed (canceled by the bench to go on)
    failed: int = 0  # intents that ended FAILED / CANCELED / TIMED_OUT on their own
    diagnosis: str = ""

    @property
    def ok(self) -> bool:
        return not self.stalled and not self.failed

    @property
    def rate(self) -> float:
        return self.n / self.seconds


def spec() -> dict[str, Any]:
    return {"intent_type": TYPE, "to_agent": ADDRESS, "payload": {}}


async def send_batches(client: AsyncIntentClient, n: int, batch: int) -> None:
    for start in range(0, n, batch):
        await client.send_intents([spec() for _ in range(min(batch, n - start))])


async def send_singles(client: AsyncIntentClient, n: int, in_flight: int) -> None:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await client.send_intent(spec())

    await asyncio.gather(*(worker() for _ in range(in_flight)))


async def one_pass(client: AsyncIntentClient, conn: asyncpg.Connection, mode: str, n: int, run: Run,
                   cpu: CpuMeter | None = None) -> Pass:
    cfg = run.config
    start = await conn.fetchrow(COUNT)
    before, bad_before = start["done"], start["bad"]
    polls = 1
    stalled = failed = 0
    diagnosis = ""
    if cpu is not None:
        await cpu.start()
    began = time.time()
    if mode == "batch":
        await send_batches(client, n, cfg.e2e_batch)
    else:
        await send_singles(client, n, cfg.e2e_in_flight)
    sent = time.time()
    progress, progress_at = -1, time.monotonic()
    while True:
        row = await conn.fetchrow(COUNT)
        polls += 1
        failed = row["bad"] - bad_before
        if row["done"] - before + failed >= n:
            break
        if row["done"] + failed != progress:
            progress, progress_at = row["done"] + failed, time.monotonic()
        elif time.monotonic() - progress_at > STALL_S:
            # A product fault, reported as such: cancel what is stuck and go on.
            diagnosis = await _stuck(conn)
            stuck = [r["id"] for r in await conn.fetch(UNFINISHED)]
            polls += 3
            stalled = len(stuck)
            await asyncio.gather(*(client.cancel(i, reason="bench: stalled") for i in stuck))
            print(f"e2e: {stalled} of {n} intents stalled for {STALL_S:.0f}s; canceled them. {diagnosis}", flush=True)
            break
        await asyncio.sleep(POLL_S)
    if failed:
        diagnosis = diagnosis or await _stuck(conn, "state IN ('FAILED', 'TIMED_OUT')")
        polls += 2
    last = await conn.fetchval("SELECT extract(epoch FROM max(finish_time))::float8 FROM intents"
                               " WHERE state = 'COMPLETED'")
    polls += 1
    usage = await cpu.stop() if cpu is not None else {}
    return Pass(n, float(last) - began, sent - began, polls, usage, stalled, failed, diagnosis)


async def _stuck(conn: asyncpg.Connection,
                 where: str = "state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS', 'WAITING')") -> str:
    """What the unfinished (or failed) intents look like, for the report."""
    rows = await conn.fetch("SELECT id, state::text, attempt, error_code, lease_session, update_time FROM intents"
                            f" WHERE {where} ORDER BY id LIMIT 5")
    events = await conn.fetch("SELECT seq, type, state::text, attempt, time, message FROM intent_events"
                              " WHERE intent_id = $1 ORDER BY seq", rows[0]["id"]) if rows else []
    return f"{[dict(r) for r in rows]}; events of the first: {[dict(e) for e in events]}"


def pass_size(run: Run, warm_rate: float) -> int:
    cfg = run.config
    by_time = int(round(warm_rate * cfg.e2e_pass_s, -2))
    return max(min(cfg.e2e_n, by_time), min(cfg.e2e_n, 500))


async def run(run: Run) -> None:
    cfg = run.config
    settle = 1.0 if cfg.quick else None
    async with fresh_database("e2e") as url:
        cluster = await start_cluster(url, ADDRESS, cfg.e2e_sidecars, cfg.e2e_capacity)
        client = AsyncIntentClient(cluster.server.address)
        conn = await asyncpg.connect(url)
        try:
            sizes: dict[str, int] = {}
            for mode in ("batch", "single"):
                warm = await one_pass(client, conn, mode, 200 if cfg.quick else 500, run)
                sizes[mode] = pass_size(run, warm.rate)
            meter = CommitMeter(url)
            await meter.mark(*([settle] if settle else []))
            cpu = CpuMeter(url, cluster.server.pid, [s.pid for s in cluster.sidecars])
            for mode in ("batch", "single"):
                passes = []
                for _ in range(cfg.reps):
                    p = await one_pass(client, conn, mode, sizes[mode], run, cpu)
                    meter.own += p.polls
                    passes.append(p)
                    # The machine may be busier now than in the warm-up: keep passes bounded.
                    if p.ok:
                        sizes[mode] = pass_size(run, p.rate)
                commits = await meter.mark(*([settle] if settle else []))
                await _stages(run, conn, mode)
                meter.own += 2
                total = sum(p.n for p in passes)
                _report(run, mode, passes, commits / total)
            if cfg.profile:
                await _profile(run, client, conn, cluster, sizes["batch"])
        finally:
            await conn.close()
            await client.close()
            cluster.close()
    if cfg.profile:
        await _statement_mix(run, min(sizes["batch"], 2000))
    run.note("e2e", settings={"sidecars": cfg.e2e_sidecars, "capacity": cfg.e2e_capacity, "batch": cfg.e2e_batch,
                              "in_flight": cfg.e2e_in_flight, "n_requested": cfg.e2e_n,
                              "commit_counter_settle_s": settle or "11 (exact)"})


async def _stages(run: Run, conn: asyncpg.Connection, mode: str) -> None:
    """Event-to-event gaps of every intent so far (ms), then a clean slate."""
    rows = await conn.fetch(STAGES)
    await conn.execute("TRUNCATE intent_events")
    run.note("e2e", **{f"{mode}_stages_ms": {
        r["stage"]: {"n": r["n"], "p50": round(r["p50"].total_seconds() * 1000, 1),
                     "p90": round(r["p90"].total_seconds() * 1000, 1)} for r in rows}})


def _report(run: Run, mode: str, all_passes: list[Pass], commits_per_intent: float) -> None:
    passes = [p for p in all_passes if p.ok]
    faults = [p for p in all_passes if not p.ok]
    if faults:
        run.note("e2e", **{f"{mode}_faulty_passes": [
            {"n": p.n, "stalled": p.stalled, "failed": p.failed, "diagnosis": p.diagnosis[:2000]} for p in faults]})
    if not passes:
        passes = all_passes  # every pass had a fault: report them, flagged
        run.note("e2e", **{f"{mode}_rates_include_faulty_passes": True})
    in_flight = run.config.e2e_in_flight
    label = "batch send (SendIntents x500)" if mode == "batch" else f"one per RPC ({in_flight} in flight)"
    target = ">=2500" if mode == "batch" else ">=1500"
    ns = sorted({p.n for p in passes})
    n = f"{ns[0]:,}" if len(ns) == 1 else f"{ns[0]:,}-{ns[-1]:,}"
    run.figure(f"e2e.{mode}.rate", f"E2E intents/s, {label}, N={n}", "intents/s", [p.rate for p in passes],
               baseline="limits.pg8", target=target)
    run.figure(f"e2e.{mode}.commits", f"E2E PG commits per intent, {label}", "commits", [commits_per_intent],
               baseline="limits.pg_commits_per_row", target="<1.5",
               note="one aggregate over all passes of the mode")
    run.figure(f"e2e.{mode}.send", f"E2E send phase alone, {label}", "intents/s",
               [p.n / p.send_seconds for p in passes], baseline="limits.pg8",
               note="sending while the cluster already works on the first intents")
    cpu: dict[str, list[float]] = {}
    for p in passes:
        for k, v in p.cpu.items():
            cpu.setdefault(k, []).append(v)
    per_intent = {k: round(1000 * sum(v) / sum(p.n for p in passes), 3) for k, v in cpu.items()
                  if k not in ("wall", "machine")}
    wall = sum(cpu.get("wall", [0.0]))
    used = sum(sum(v) for k, v in cpu.items() if k not in ("wall", "machine") and "(kernel)" not in k)
    capacity = max((os.cpu_count() or 1) * wall, 1e-9)
    run.note("e2e", **{f"{mode}_n_per_pass": [p.n for p in passes], f"{mode}_cpu_ms_per_intent": per_intent,
                       f"{mode}_cpu_share_of_machine": round(used / capacity, 3),
                       f"{mode}_machine_busy_share": round(sum(cpu.get("machine", [0.0])) / capacity, 3)})


async def _profile(run: Run, client: AsyncIntentClient, conn: asyncpg.Connection, cluster: Any, n: int) -> None:
    """An extra batch pass (not reported) under py-spy: the server, and one
    sidecar with its agent."""
    profilers = [profile.Profiler("server", cluster.server.pid).start(),
                 profile.Profiler("sidecar-and-agent", cluster.sidecars[0].pid, subprocesses=True).start()]
    await asyncio.sleep(1.0)
    try:
        p = await one_pass(client, conn, "batch", n, run)
    finally:
        summaries = {prof.name: await prof.stop() for prof in profilers}
    run.note("e2e", profile={"pass_rate": round(p.rate, 1), "n": n, **summaries})
    for name, summary in summaries.items():
        print(f"-- py-spy {name} ({p.rate:.0f} intents/s pass)\n{profile.render(summary)}", flush=True)


async def _statement_mix(run: Run, n: int) -> None:
    """One batch pass on a fresh cluster with every statement logged by
    PostgreSQL: executions and commits per intent, by named query."""
    async with fresh_database("e2e_statements") as url:
        async with statements.logged(url) as capture:
            cluster = await start_cluster(url, ADDRESS, run.config.e2e_sidecars, run.config.e2e_capacity)
            client = AsyncIntentClient(cluster.server.address)
            conn = await asyncpg.connect(url)
            try:
                await one_pass(client, conn, "batch", 100, run)  # warm-up
                await asyncio.sleep(1.0)
                capture.restart()
                await one_pass(client, conn, "batch", n, run)
            finally:
                await conn.close()
                await client.close()
                cluster.close()
    mix = capture.mix.per(n)
    run.note("e2e", statement_mix={"n": n, **mix})
    print(f"-- statements per intent (batch pass of {n}; the bench's polling included)", flush=True)
    for name, value in mix["commits_per_intent"].items():
        print(f"   {value:7.3f} commits  {name}", flush=True)
    print(f"   {mix['total_commits_per_intent']:7.3f} commits in all", flush=True)
