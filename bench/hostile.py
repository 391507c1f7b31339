"""``python -m bench.hostile [--reps N] [--intents N] [--steps N]``: what a
flood of poison writes costs another tenant (issue 11, finding 4).

One server on loopback and a fresh database. The victim: two sidecars
(capacity 50) supervising the no-op bench agent; each round sends
``intents`` intents of ``steps`` no-op steps at once and measures its
recorded steps/s (first to last step record, ``intent_steps.record_time``)
and the p50 of its step latency (the agent times each ``ctx.step``: agent ->
sidecar -> server -> PostgreSQL commit -> back). The attacker: a capacity-0
sidecar stream on another address that holds no intent and sends fenced
writes as fast as the server answers them (up to 256 in flight), each with
a NUL in a progress message, a step name, a failure message or a lease
intent id. Every repetition measures the victim without the flood, then
with it, in the same run; the medians of both are printed.

Bounded: a round waits at most 120 s, and the whole run is a few rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc

from bench.harness import fresh_database, kill_all, median, percentile, start_cluster
from intentd.client import AsyncIntentClient, IntentState
from intentd.generated.v1 import agent_service_pb2 as apb
from intentd.generated.v1 import agent_service_pb2_grpc as apb_grpc
from intentd.generated.v1 import delivery_pb2

VICTIM = "agent://victim/prod/steps"
ATTACKER = "agent://attacker/prod/nothing"
TYPE = "bench.steps.v1"
IN_FLIGHT = 256
ROUND_TIMEOUT_S = 120.0
WINDOW = ("SELECT count(*) AS n, extract(epoch FROM max(record_time) - min(record_time))::float8 AS seconds"
          " FROM intent_steps WHERE intent_id = ANY($1::text[])")


def _poison(n: int) -> delivery_pb2.IntentWrite:
    """A fenced write for no lease this stream holds, with a NUL somewhere."""
    fake_id = "01" + uuid.uuid4().hex[:24]
    lease = delivery_pb2.Lease(intent_id=fake_id, attempt=1, token=str(uuid.uuid4()))
    kind = n % 4
    if kind == 0:
        return delivery_pb2.IntentWrite(lease=lease, progress=delivery_pb2.ProgressWrite(message="p\x00", fraction=0.5))
    if kind == 1:
        return delivery_pb2.IntentWrite(lease=lease, step=delivery_pb2.StepWrite(index=1, name="s\x00", result=b"1"))
    if kind == 2:
        return delivery_pb2.IntentWrite(lease=lease, fail=delivery_pb2.FailWrite(code="E", message="f\x00",
                                                                                retryable=True))
    bad = delivery_pb2.Lease(intent_id=fake_id[:-1] + "\x00", attempt=1, token=lease.token)
    return delivery_pb2.IntentWrite(lease=bad, step=delivery_pb2.StepWrite(index=1, name="s", result=b"1"))


class Flood:
    """The capacity-0 attacker stream; counts the writes answered."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.answered = 0
        self._outbox: asyncio.Queue[apb.ConnectRequest | None] = asyncio.Queue()
        self._slots = asyncio.Semaphore(IN_FLIGHT)
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: grpc.aio.Channel | None = None

    async def _requests(self) -> AsyncIterator[apb.ConnectRequest]:
        yield apb.ConnectRequest(register=apb.Register(sidecar_id=f"hostile-{uuid.uuid4().hex[:6]}",
                                                       addresses=[ATTACKER], capacity=0))
        while (item := await self._outbox.get()) is not None:
            yield item

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.server)
        call = apb_grpc.AgentServiceStub(self._channel).Connect(self._requests())
        self._tasks = [asyncio.create_task(self._read(call)), asyncio.create_task(self._send())]

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        async for reply in call:
            kind = reply.WhichOneof("msg")
            messages = list(reply.batch.messages) if kind == "batch" else [reply]
            for msg in messages:
                if msg.WhichOneof("msg") == "ping":
                    await self._outbox.put(apb.ConnectRequest(pong=apb.Pong(nonce=msg.ping.nonce)))
                elif msg.WhichOneof("msg") == "write_result":
                    self.answered += 1
                    self._slots.release()

    async def _send(self) -> None:
        for n in itertools.count(1):
            await self._slots.acquire()
            await self._outbox.put(apb.ConnectRequest(write=apb.WriteRequest(request_id=n, write=_poison(n))))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError, Exception):
                await task
        await self._outbox.put(None)
        if self._channel is not None:
            await self._channel.close()


async def victim_round(client: AsyncIntentClient, conn: asyncpg.Connection, intents: int,
                       steps: int) -> tuple[float, float]:
    """The victim's recorded steps/s and p50 step latency (ms) for one round."""
    ids = await client.send_intents([{"intent_type": TYPE, "to_agent": VICTIM,
                                      "payload": {"steps": steps, "timings": True}} for _ in range(intents)])
    finals = await asyncio.wait_for(asyncio.gather(*(client.wait_for(i, timeout=ROUND_TIMEOUT_S) for i in ids)),
                                    ROUND_TIMEOUT_S + 10)
    bad = [f for f in finals if f.state is not IntentState.COMPLETED]
    if bad:
        raise RuntimeError(f"{len(bad)} victim intents did not complete: {bad[0].error}")
    row = await conn.fetchrow(WINDOW, ids)
    timings = [ms for f in finals for ms in f.result["ms"]]
    return float(row["n"]) / float(row["seconds"]), percentile(timings, 50)


async def main(reps: int, intents: int, steps: int) -> None:
    async with fresh_database("hostile") as url:
        cluster = await start_cluster(url, VICTIM, 2, 50)
        client = AsyncIntentClient(cluster.server.address)
        conn = await asyncpg.connect(url)
        quiet: list[tuple[float, float]] = []
        flooded: list[tuple[float, float]] = []
        poison_rates: list[float] = []
        try:
            await victim_round(client, conn, 20, 5)  # warm-up
            for rep in range(1, reps + 1):
                quiet.append(await victim_round(client, conn, intents, steps))
                flood = Flood(cluster.server.address)
                await flood.start()
                try:
                    await asyncio.sleep(1.0)  # the flood at full rate before the victim starts
                    began, answered = time.monotonic(), flood.answered
                    flooded.append(await victim_round(client, conn, intents, steps))
                    poison_rates.append((flood.answered - answered) / (time.monotonic() - began))
                finally:
                    await flood.stop()
                print(f"rep {rep}: no flood {quiet[-1][0]:,.0f} steps/s p50 {quiet[-1][1]:.1f} ms; "
                      f"flood {flooded[-1][0]:,.0f} steps/s p50 {flooded[-1][1]:.1f} ms "
                      f"({poison_rates[-1]:,.0f} poison writes/s answered)", flush=True)
        finally:
            await conn.close()
            await client.close()
            cluster.close()
    print(f"\nvictim, {intents} intents x {steps} steps, median of {reps}:")
    print(f"  no flood (baseline, same run): {median([q[0] for q in quiet]):,.0f} steps/s, "
          f"p50 step {median([q[1] for q in quiet]):.1f} ms")
    print(f"  poison flood:                  {median([f[0] for f in flooded]):,.0f} steps/s, "
          f"p50 step {median([f[1] for f in flooded]):.1f} ms "
          f"({median(poison_rates):,.0f} poison writes/s answered)")


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--intents", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    try:
        asyncio.run(main(args.reps, args.intents, args.steps))
    finally:
        kill_all()


if __name__ == "__main__":
    run()
