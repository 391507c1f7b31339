"""Scenario 11, streams: one agent emitting 20-byte text chunks as fast as
``ctx.emit`` takes them, one reader (``AsyncIntentClient.stream``) taking
them live, against the same chunks sent the way intentd had before streams
(``ctx.progress``, one awaited write and one event each, read with
``watch``), in the same run.

- throughput: chunks per second from the handler's first emit to the
  reader's last chunk (the reader is subscribed before the intent starts);
- latency on an idle system: chunks ``gap_ms`` apart, each carrying the
  ``time.time()`` of its emit; the reader's clock when it yields the chunk
  minus that (same machine, same clock), p50 and p99;
- PostgreSQL commits per 1,000 chunks (pg_stat_database, settled);
- CPU per chunk: CPU seconds of the server, sidecar, agent, PostgreSQL
  backends and the bench process (the reader) over the chunks.

Medians of ``reps`` runs. The server runs with the per-intent chunks per
second raised (``INTENTD_STREAM_MAX_CHUNKS_PER_S``): at its default, 50,000,
the limit and not the machinery would be measured.
"""

from __future__ import annotations

import time

from bench.harness import CommitMeter, CpuMeter, fresh_database, percentile, start_cluster
from bench.suite import Run
from intentd.client import AsyncIntentClient, IntentState

ADDRESS = "agent://bench/streams/noop"
SIZE = 20


async def _finish(client: AsyncIntentClient, intent_id: str) -> None:
    final = await client.wait_for(intent_id, timeout=300)
    if final.state is not IntentState.COMPLETED:
        raise RuntimeError(f"stream intent ended {final.state.value}: {final.error}")


async def stream_rate(client: AsyncIntentClient, count: int) -> float:
    """Chunks per second through a stream, first chunk to last."""
    intent_id = await client.send_intent(intent_type="bench.stream.emit.v1", to_agent=ADDRESS,
                                         payload={"count": count, "size": SIZE})
    first = last = 0.0
    received = 0
    async for _entry in client.stream(intent_id):
        last = time.perf_counter()
        if received == 0:
            first = last
        received += 1
    await _finish(client, intent_id)
    if received != count:
        raise RuntimeError(f"the reader got {received} of {count} chunks")
    return (count - 1) / (last - first)


async def progress_rate(client: AsyncIntentClient, count: int) -> float:
    """The same chunks as progress events, read with watch."""
    intent_id = await client.send_intent(intent_type="bench.stream.progress.v1", to_agent=ADDRESS,
                                         payload={"count": count, "size": SIZE})
    first = last = 0.0
    received = 0
    async for event in client.watch(intent_id):
        if event.type != "PROGRESS":
            continue
        last = time.perf_counter()
        if received == 0:
            first = last
        received += 1
    await _finish(client, intent_id)
    if received != count:
        raise RuntimeError(f"watch got {received} of {count} progress events")
    return (count - 1) / (last - first)


async def latencies(client: AsyncIntentClient, count: int, progress: bool) -> list[float]:
    intent_id = await client.send_intent(intent_type="bench.stream.ping.v1", to_agent=ADDRESS,
                                         payload={"count": count, "gap_ms": 20, "progress": progress})
    out: list[float] = []
    if progress:
        async for event in client.watch(intent_id):
            if event.type == "PROGRESS":
                out.append((time.time() - float(event.message)) * 1000)
    else:
        async for entry in client.stream(intent_id):
            out.append((time.time() - float(entry.data)) * 1000)
    await _finish(client, intent_id)
    return out


async def run(run: Run) -> None:
    cfg = run.config
    count = 20_000 if cfg.quick else 100_000
    baseline_count = 2_000 if cfg.quick else 5_000
    pings = 100 if cfg.quick else 250
    rates: list[float] = []
    baseline_rates: list[float] = []
    p50: list[float] = []
    p99: list[float] = []
    base_p50: list[float] = []
    base_p99: list[float] = []
    commits: list[float] = []
    base_commits: list[float] = []
    cpu_us: list[float] = []
    base_cpu_us: list[float] = []
    async with fresh_database("streams") as url:
        cluster = await start_cluster(url, ADDRESS, 1, 4, server_env={"INTENTD_STREAM_MAX_CHUNKS_PER_S": "10000000"})
        client = AsyncIntentClient(cluster.server.address)
        meter = CommitMeter(url)
        cpu = CpuMeter(url, cluster.server.pid, [s.pid for s in cluster.sidecars])
        try:
            await stream_rate(client, 1000)  # warm-up
            await progress_rate(client, 200)
            for _ in range(cfg.reps):
                await meter.mark(settle=0)
                await cpu.start()
                rates.append(await stream_rate(client, count))
                spent = await cpu.stop()
                cpu_us.append(_cpu_total(spent) / count * 1e6)
                commits.append(await meter.mark() / count * 1000)
                await cpu.start()
                baseline_rates.append(await progress_rate(client, baseline_count))
                spent = await cpu.stop()
                base_cpu_us.append(_cpu_total(spent) / baseline_count * 1e6)
                base_commits.append(await meter.mark() / baseline_count * 1000)
                lat = await latencies(client, pings, False)
                base = await latencies(client, pings, True)
                p50.append(percentile(lat, 50))
                p99.append(percentile(lat, 99))
                base_p50.append(percentile(base, 50))
                base_p99.append(percentile(base, 99))
        finally:
            await client.close()
            cluster.close()
    run.note("streams", chunk_bytes=SIZE, chunks_per_rep=count, baseline_chunks_per_rep=baseline_count,
             pings_per_rep=pings)
    run.figure("streams.progress_per_s", f"{SIZE}-byte chunks as progress events, read by watch", "chunks/s",
               baseline_rates)
    run.figure("streams.chunks_per_s", f"{SIZE}-byte chunks through a stream, one agent to one reader", "chunks/s",
               rates, baseline="streams.progress_per_s", target=">=20000")
    run.figure("streams.progress_p50_ms", "progress event to watch, p50 (idle)", "ms", base_p50)
    run.figure("streams.latency_p50_ms", "emit to reader, p50 (idle)", "ms", p50,
               baseline="streams.progress_p50_ms", target="<=5")
    run.figure("streams.progress_p99_ms", "progress event to watch, p99 (idle)", "ms", base_p99)
    run.figure("streams.latency_p99_ms", "emit to reader, p99 (idle)", "ms", p99, baseline="streams.progress_p99_ms")
    run.figure("streams.progress_commits_per_1000", "PostgreSQL commits per 1,000 progress events", "commits",
               base_commits)
    run.figure("streams.commits_per_1000", "PostgreSQL commits per 1,000 chunks", "commits", commits,
               baseline="streams.progress_commits_per_1000")
    run.figure("streams.progress_cpu_us", "CPU per progress event (all processes)", "us", base_cpu_us)
    run.figure("streams.cpu_us", "CPU per chunk (all processes)", "us", cpu_us, baseline="streams.progress_cpu_us")


def _cpu_total(spent: dict[str, float]) -> float:
    return sum(spent[k] for k in ("server", "sidecars", "agents", "postgres", "bench client"))
