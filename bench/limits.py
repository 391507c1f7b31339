"""Scenario 1, physical limits: what PostgreSQL and grpc.aio alone do on this
machine, the baselines every other figure is divided by.

- asyncpg: single-row INSERT then UPDATE of that row, each its own commit
  (the least a durable queue does per job), 1 connection and 8 concurrent;
- grpc.aio over loopback to a separate process (bench/echo.py): messages/s
  read from one server-streaming call, unary calls/s with 64 in flight, and
  the round trip of one unary call at a time.
"""

from __future__ import annotations

import asyncio
import sys
import time

import asyncpg
import grpc

from bench.harness import CommitMeter, Proc, free_port, fresh_database, median, percentile
from bench.suite import Run
from intentd.generated.v1 import agent_service_pb2 as pb

TABLE = "CREATE TABLE bench_rows (id bigserial PRIMARY KEY, v integer NOT NULL, updated timestamptz)"
INSERT = "INSERT INTO bench_rows (v) VALUES ($1) RETURNING id"
UPDATE = "UPDATE bench_rows SET v = v + 1, updated = now() WHERE id = $1"


async def commit_loop(pool: asyncpg.Pool, workers: int, seconds: float) -> tuple[float, list[float]]:
    """Commits/s over ``seconds`` with ``workers`` concurrent connections, and
    each commit's latency in ms."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(seed: int) -> int:
        commits = 0
        async with pool.acquire() as conn:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                row_id = await conn.fetchval(INSERT, seed)
                t1 = time.perf_counter()
                await conn.execute(UPDATE, row_id)
                t2 = time.perf_counter()
                latencies.extend(((t1 - t0) * 1000, (t2 - t1) * 1000))
                commits += 2
        return commits

    began = time.perf_counter()
    counts = await asyncio.gather(*(worker(i) for i in range(workers)))
    return sum(counts) / (time.perf_counter() - began), latencies


async def postgres_limits(run: Run) -> None:
    cfg = run.config
    one: list[float] = []
    eight: list[float] = []
    p50: list[float] = []
    p99: list[float] = []
    async with fresh_database("limits") as url:
        conn = await asyncpg.connect(url)
        await conn.execute(TABLE)
        await conn.close()
        # Backends publish their counters when they exit: the meter reads
        # after the pool is closed, so the count is exact without a long pause.
        meter = CommitMeter(url)
        await meter.mark(settle=0.5)
        pool = await asyncpg.create_pool(url, min_size=8, max_size=8)
        try:
            await commit_loop(pool, 8, 0.3)  # warm-up: prepared statements, caches
            for _ in range(cfg.reps):
                rate, lat = await commit_loop(pool, 1, cfg.limit_seconds)
                one.append(rate)
                p50.append(percentile(lat, 50))
                p99.append(percentile(lat, 99))
                rate, _ = await commit_loop(pool, 8, cfg.limit_seconds)
                eight.append(rate)
            rows = await pool.fetchval("SELECT count(*) FROM bench_rows")
            meter.own += 1
        finally:
            await pool.close()
        commits = await meter.mark(settle=0.5)
    run.figure("limits.pg1", "PG commits/s, 1 connection (INSERT+UPDATE)", "commits/s", one,
               baseline="limits.pg1")
    run.figure("limits.pg8", "PG commits/s, pool of 8 concurrent", "commits/s", eight, baseline="limits.pg1")
    run.figure("limits.pg1_p50", "PG commit latency p50, 1 connection", "ms", p50, baseline="limits.pg1_p50")
    run.figure("limits.pg1_p99", "PG commit latency p99, 1 connection", "ms", p99, baseline="limits.pg1_p50")
    run.figure("limits.pg_commits_per_row", "PG commits per row (INSERT+UPDATE lifecycle)", "commits",
               [commits / max(rows, 1)], baseline="limits.pg_commits_per_row",
               note="xact_commit delta / rows, the same meter as the intentd figures")


async def grpc_limits(run: Run) -> None:
    cfg = run.config
    port = free_port()
    echo = Proc("echo", [sys.executable, "-m", "bench.echo", str(port)]).start()
    try:
        await echo.wait_log("echo serving", timeout=30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary("/bench.Echo/Unary", request_serializer=pb.Ping.SerializeToString,
                                        response_deserializer=pb.Pong.FromString)
            stream = channel.unary_stream("/bench.Echo/Stream", request_serializer=pb.Ping.SerializeToString,
                                          response_deserializer=pb.Ping.FromString)
            await unary(pb.Ping(nonce=1), timeout=10)
            stream_rates, unary_rates, rtt = [], [], []
            for _ in range(cfg.reps):
                stream_rates.append(await _stream_rate(stream, cfg.limit_seconds))
                unary_rates.append(await _unary_rate(unary, 64, cfg.limit_seconds))
                rtt.append(median(await _unary_rtts(unary, min(cfg.limit_seconds, 1.0))))
    finally:
        echo.kill_group()
    run.figure("limits.grpc_stream", "gRPC msgs/s, one server stream", "msgs/s", stream_rates,
               baseline="limits.grpc_stream")
    run.figure("limits.grpc_unary64", "gRPC unary calls/s, 64 in flight", "calls/s", unary_rates,
               baseline="limits.grpc_stream")
    run.figure("limits.grpc_rtt", "gRPC unary round trip p50, 1 in flight", "ms", rtt,
               baseline="limits.pg1_p50")


async def _stream_rate(stream: grpc.aio.UnaryStreamMultiCallable, seconds: float) -> float:
    call = stream(pb.Ping(nonce=7))
    count = 0
    began = time.perf_counter()
    stop = began + seconds
    async for _ in call:
        count += 1
        if count % 256 == 0 and time.perf_counter() >= stop:
            break
    elapsed = time.perf_counter() - began
    call.cancel()
    return count / elapsed


async def _unary_rate(unary: grpc.aio.UnaryUnaryMultiCallable, in_flight: int, seconds: float) -> float:
    stop = time.perf_counter() + seconds
    request = pb.Ping(nonce=3)

    async def worker() -> int:
        calls = 0
        while time.perf_counter() < stop:
            await unary(request, timeout=10)
            calls += 1
        return calls

    began = time.perf_counter()
    counts = await asyncio.gather(*(worker() for _ in range(in_flight)))
    return sum(counts) / (time.perf_counter() - began)


async def _unary_rtts(unary: grpc.aio.UnaryUnaryMultiCallable, seconds: float) -> list[float]:
    out: list[float] = []
    stop = time.perf_counter() + seconds
    request = pb.Ping(nonce=5)
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        await unary(request, timeout=10)
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def run(run: Run) -> None:
    await postgres_limits(run)
    await grpc_limits(run)
