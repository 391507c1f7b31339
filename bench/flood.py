"""What a flood of well-formed writes from one tenant costs another.

``python -m bench.flood [--reps 3] [--intents 200] [--steps 10] [--seconds 3]``

Tenant A runs the standard step workload (2 sidecars x 50 supervising the
no-op agent; ``intents`` x ``steps`` recorded steps at once): its recorded
steps/s over the window from the first to the last step record. Tenant B
floods from one raw Connect stream of capacity 0: progress writes for leases
it does not hold, as fast as the server reads them, each answered (it reads
its answers, so it is never ended for not reading). Everything on loopback,
with API keys on, on a fresh database.

For each server setting of the write rates (off, the defaults, and a tighter
tenant budget, which like every setting applies to both tenants), on one
server: A alone and A under the flood, alternating, ``reps`` times; reported
are the medians and the cost (1 - flooded / alone), each against its same-run
baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from dataclasses import dataclass

import asyncpg
import grpc

from bench.harness import Proc, Server, Sidecar, fresh_database, kill_all, median
from intentd.client import AsyncIntentClient, IntentState
from intentd.generated.v1 import agent_service_pb2 as apb
from intentd.generated.v1 import agent_service_pb2_grpc as apb_grpc
from intentd.generated.v1 import delivery_pb2
from intentd.server.auth import KeyStore
from intentd.server.db import Database

TYPE = "bench.steps.v1"
WINDOW = ("SELECT count(*) AS n, extract(epoch FROM max(record_time) - min(record_time))::float8 AS seconds"
          " FROM intent_steps WHERE intent_id = ANY($1::text[])")
SETTINGS = {
    "off": {"INTENTD_STREAM_WRITES_PER_SECOND": "0", "INTENTD_TENANT_WRITES_PER_SECOND": "0"},
    "defaults": {},
    "tenant 100/s": {"INTENTD_TENANT_WRITES_PER_SECOND": "100"},
}


@dataclass
class Tenants:
    a_client: str
    a_agent: str
    b_agent: str


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


async def make_keys(url: str) -> Tenants:
    db = Database(url, min_size=1, max_size=1)
    await db.open(run_migrations=False)
    try:
        store = KeyStore(db)
        _, a_client = await store.create("flooda", "client", ["client"])
        _, a_agent = await store.create("flooda", "agent", ["agent"], ["agent://flooda/**"])
        _, b_agent = await store.create("floodb", "agent", ["agent"], ["agent://floodb/**"])
        return Tenants(a_client, a_agent, b_agent)
    finally:
        await db.close()


async def workload(client: AsyncIntentClient, conn: asyncpg.Connection, intents: int, steps: int) -> float:
    ids = await client.send_intents([{"intent_type": TYPE, "to_agent": "agent://flooda/steps/noop",
                                      "payload": {"steps": steps}} for _ in range(intents)])
    finals = await asyncio.gather(*(client.wait_for(i, timeout=300) for i in ids))
    bad = [f for f in finals if f.state is not IntentState.COMPLETED]
    if bad:
        raise RuntimeError(f"{len(bad)} intents of tenant A did not complete: {bad[0].error}")
    row = await conn.fetchrow(WINDOW, ids)
    return float(row["n"]) / float(row["seconds"])


async def flood(address: str, key: str, stop: asyncio.Event) -> int:
    """Writes until ``stop``; returns how many were answered."""
    answered = 0
    lease = delivery_pb2.Lease(intent_id="01m8dsnxs4vrf409wync0kdayv", attempt=1, token=str(uuid.uuid4()))
    write = delivery_pb2.IntentWrite(lease=lease, progress=delivery_pb2.ProgressWrite(message="flood"))
    batch = apb.ConnectRequest(batch=apb.ConnectRequestBatch(messages=[
        apb.ConnectRequest(write=apb.WriteRequest(request_id=n, write=write)) for n in range(64)]))

    async def requests():  # type: ignore[no-untyped-def]
        yield apb.ConnectRequest(register=apb.Register(sidecar_id="flood", addresses=["agent://floodb/x/y"],
                                                       capacity=0, accepts_batches=True))
        while not stop.is_set():
            yield batch
            yield apb.ConnectRequest(ping=apb.Ping(nonce=1))

    async with grpc.aio.insecure_channel(address) as channel:
        call = apb_grpc.AgentServiceStub(channel).Connect(requests(), metadata=bearer(key))
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for reply in call:
                messages = reply.batch.messages if reply.WhichOneof("msg") == "batch" else [reply]
                answered += sum(m.WhichOneof("msg") == "write_result" for m in messages)
                if stop.is_set():
                    break
        call.cancel()
    return answered


async def one_setting(name: str, env: dict[str, str], args: argparse.Namespace) -> dict[str, object]:
    async with fresh_database("flood") as url:
        server = Server(url, INTENTD_AUTH="on", **env).start()
        procs: list[Proc] = [server]
        try:
            await server.ready()
            keys = await make_keys(url)
            sidecars = [Sidecar(server.address, "agent://flooda/steps/noop", 50,
                                env={"INTENTD_API_KEY": keys.a_agent}).start() for _ in range(2)]
            procs += sidecars
            await asyncio.gather(*(s.ready() for s in sidecars))
            client = AsyncIntentClient(server.address, metadata=bearer(keys.a_client))
            conn = await asyncpg.connect(url)
            alone: list[float] = []
            flooded: list[float] = []
            flood_rates: list[float] = []
            try:
                await workload(client, conn, 20, 3)  # warm-up
                for _ in range(args.reps):
                    alone.append(await workload(client, conn, args.intents, args.steps))
                    # A process of its own, so it does not slow the measuring client.
                    flooder = Proc("flood", [sys.executable, "-m", "bench.flood", "--flood", server.address,
                                             keys.b_agent]).start()
                    procs.append(flooder)
                    await flooder.wait_log("flooding", timeout=30)
                    await asyncio.sleep(1.0)  # the flood at full rate first
                    flooded.append(await workload(client, conn, args.intents, args.steps))
                    flooder.stop(grace=10)
                    rate = [line for line in flooder.log().splitlines() if line.startswith("answered")]
                    flood_rates.append(float(rate[-1].split()[1]) if rate else float("nan"))
            finally:
                await conn.close()
                await client.close()
        finally:
            for proc in reversed(procs):
                proc.kill_group()
    cost = 1 - median(flooded) / median(alone)
    return {"setting": name, "alone_steps_per_s": round(median(alone)), "flooded_steps_per_s": round(median(flooded)),
            "cost": round(cost, 3), "flood_writes_per_s": round(median(flood_rates)),
            "alone": [round(v) for v in alone], "flooded": [round(v) for v in flooded]}


async def flood_process(address: str, key: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("flooding", flush=True)
    began = time.monotonic()
    answered = await flood(address, key, stop)
    print(f"answered {answered / (time.monotonic() - began):.0f} writes/s", flush=True)


async def main(args: argparse.Namespace) -> None:
    results = []
    for name, env in SETTINGS.items():
        result = await one_setting(name, env, args)
        results.append(result)
        print(f"{name:>14}: tenant A {result['alone_steps_per_s']} steps/s alone, {result['flooded_steps_per_s']} "
              f"under tenant B's flood of {result['flood_writes_per_s']} writes/s: cost {result['cost']:.0%}",
              flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--intents", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--flood", nargs=2, metavar=("SERVER", "KEY"), help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.flood:
        asyncio.run(flood_process(*parsed.flood))
        sys.exit(0)
    try:
        asyncio.run(main(parsed))
    finally:
        kill_all()
