"""Scenario 6, scale (lighter): does a big intents table slow the hot path?

On the standard cluster (4 sidecars x 50): idle-system latencies (as in
scenario 4) on the empty database, then ``scale_terminal`` (1,000,000)
COMPLETED rows and ``scale_pending`` (50,000) PENDING rows for 100 addresses
nobody serves are bulk-inserted into ``intents`` with generate_series
(directly, no events or steps), the table is VACUUM ANALYZEd (as autovacuum
would), and the same latencies are measured again: loaded / empty.

With ``--full``: ``scale_streams`` (500) raw ``AgentService.Connect`` streams
from this process (Register with capacity 0, then a Ping a second) -> the
server's RSS growth per stream, and its CPU with them all idle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from bench.harness import cpu_seconds, fresh_database, rss_kib, start_cluster
from bench.latency import percentiles, sample
from bench.suite import Run
from intentd.generated.v1 import agent_service_pb2 as pb
from intentd.generated.v1 import agent_service_pb2_grpc as pb_grpc
from intentd.testing.bulk import bulk_load

ADDRESS = "agent://bench/scale/noop"


async def _measure(client_address: str, run: Run) -> dict[str, list[float]]:
    from intentd.client import AsyncIntentClient

    client = AsyncIntentClient(client_address)
    try:
        await sample(client, 10, ADDRESS)  # warm-up
        return percentiles([await sample(client, run.config.scale_latency_n, ADDRESS)
                            for _ in range(run.config.reps)])
    finally:
        await client.close()


async def run(run: Run) -> None:
    cfg = run.config
    async with fresh_database("scale") as url:
        cluster = await start_cluster(url, ADDRESS, cfg.e2e_sidecars, cfg.e2e_capacity)
        try:
            empty = await _measure(cluster.server.address, run)
            load_s = await bulk_load(url, cfg.scale_terminal, cfg.scale_pending)
            await asyncio.sleep(2.0)
            loaded = await _measure(cluster.server.address, run)
            rows = f"{cfg.scale_terminal:,} done + {cfg.scale_pending:,} pending rows"
            for key, what in (("dispatch", "send -> handler start"), ("send", "SendIntent RPC")):
                for q in ("p50", "p99"):
                    run.figure(f"scale.empty.{key}_{q}", f"Empty table: {what} {q}", "ms", empty[f"{key}_{q}"],
                               baseline=f"scale.empty.{key}_{q}")
                    run.figure(f"scale.loaded.{key}_{q}", f"{rows}: {what} {q}", "ms", loaded[f"{key}_{q}"],
                               baseline=f"scale.empty.{key}_{q}")
            if cfg.full:
                await streams(run, cluster.server.address, cluster.server.pid)
        finally:
            cluster.close()
    run.note("scale", bulk_load_seconds=round(load_s, 1), terminal_rows=cfg.scale_terminal,
             pending_rows=cfg.scale_pending)


async def _connect(stub: pb_grpc.AgentServiceStub, index: int, registered: asyncio.Event,
                   count: list[int], n: int) -> None:
    async def requests() -> AsyncIterator[pb.ConnectRequest]:
        yield pb.ConnectRequest(register=pb.Register(
            sidecar_id=f"bench-stream-{index}", addresses=[f"agent://bench/streams/s{index}"], capacity=0))
        nonce = 0
        while True:
            await asyncio.sleep(1.0)
            nonce += 1
            yield pb.ConnectRequest(ping=pb.Ping(nonce=nonce))

    call = stub.Connect(requests())
    try:
        async for message in call:
            kind = message.WhichOneof("msg")
            if kind == "registered":
                count[0] += 1
                if count[0] == n:
                    registered.set()
    except (asyncio.CancelledError, grpc.aio.AioRpcError):
        pass
    finally:
        call.cancel()


async def streams(run: Run, address: str, server_pid: int) -> None:
    """``scale_streams`` idle sidecar streams -> server RSS per stream and CPU."""
    n = run.config.scale_streams
    await asyncio.sleep(2.0)
    rss_before = rss_kib(server_pid)
    cpu0, t0 = cpu_seconds(server_pid), time.monotonic()
    await asyncio.sleep(5.0)
    idle_cpu = (cpu_seconds(server_pid) - cpu0) / (time.monotonic() - t0)
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(1, n // 50))]
    registered = asyncio.Event()
    count = [0]
    tasks = [asyncio.create_task(_connect(pb_grpc.AgentServiceStub(channels[i % len(channels)]), i, registered,
                                          count, n)) for i in range(n)]
    try:
        await asyncio.wait_for(registered.wait(), 120)
        await asyncio.sleep(5.0)
        cpu0, t0 = cpu_seconds(server_pid), time.monotonic()
        await asyncio.sleep(5.0)
        busy_cpu = (cpu_seconds(server_pid) - cpu0) / (time.monotonic() - t0)
        rss_after = rss_kib(server_pid)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
    run.figure("scale.rss_base", "Server RSS before the streams", "KiB", [rss_before], baseline="scale.rss_base")
    run.figure("scale.rss_per_stream", f"Server RSS per idle sidecar stream ({n} streams)", "KiB",
               [(rss_after - rss_before) / n], baseline="scale.rss_base",
               note="ratio: one stream's share of the server's RSS before the streams")
    run.figure("scale.cpu_idle", "Server CPU, no extra streams", "% of a core", [100 * idle_cpu],
               baseline="scale.cpu_idle")
    run.figure("scale.cpu_streams", f"Server CPU with {n} idle streams pinging 1/s", "% of a core",
               [100 * busy_cpu], baseline="scale.cpu_idle")
