"""A test agent running concurrent steps, leaving every side effect in the
PostgreSQL ledger (its own transaction), so tests count what really ran.

``payload["n"]`` steps ``s1``..``sN`` are called at once (positions 1..N,
by call order): ``asyncio.gather`` of ``ctx.step`` calls in the async
handler, one ``ctx.parallel`` in the sync one. Each step function writes
ledger ``begin`` at its position and returns ``"v<position>"``.

On attempt 1 only the positions in ``payload["fast"]`` return; the others
block, and once every fast step is *recorded* (the async handler awaits
their ``ctx.step``, which returns after the commit; the sync one's blocked
steps listen for the control plane's event notifications and read
intent_steps) and every slow one has begun, the agent writes ledger
``killing`` and SIGKILLs itself: between the commits of concurrent steps,
the fast ones committed, the slow ones not. Later attempts run everything.
The result is the list of values in position order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any

import asyncpg

from intentd.agent import Agent, Context, SyncContext

ADDRESS = os.environ["TEST_AGENT_ADDRESS"]
LEDGER_URL = os.environ["TEST_LEDGER_URL"]

agent = Agent(ADDRESS, capacity=int(os.environ.get("TEST_AGENT_CAPACITY", "4")))
_pool: asyncpg.Pool | None = None


async def ledger(intent_id: str, position: int, attempt: int, phase: str) -> None:
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(LEDGER_URL, min_size=1, max_size=4)
    await _pool.execute(
        "INSERT INTO test_ledger (intent_id, step, attempt, phase, pid) VALUES ($1, $2, $3, $4, $5)",
        intent_id, position, attempt, phase, os.getpid(),
    )


def kill(intent_id: str, attempt: int) -> None:
    asyncio.run(_direct(intent_id, 0, attempt, "killing"))
    os.kill(os.getpid(), signal.SIGKILL)


async def _direct(intent_id: str, position: int, attempt: int, phase: str) -> None:
    """A ledger row from a thread of its own (its own connection)."""
    conn = await asyncpg.connect(LEDGER_URL)
    try:
        await conn.execute(
            "INSERT INTO test_ledger (intent_id, step, attempt, phase, pid) VALUES ($1, $2, $3, $4, $5)",
            intent_id, position, attempt, phase, os.getpid())
    finally:
        await conn.close()


@agent.handler(os.environ.get("TEST_AGENT_TYPE", "test.parallel.run.v1"))
async def run(ctx: Context, payload: dict[str, Any]) -> list[str]:
    n = int(payload["n"])
    first = ctx.attempt == 1
    fast = set(payload.get("fast", range(1, n + 1))) if first else set(range(1, n + 1))
    begun = {p: asyncio.Event() for p in range(1, n + 1)}
    never = asyncio.Event()

    async def work(position: int) -> str:
        await ledger(ctx.intent_id, position, ctx.attempt, "begin")
        begun[position].set()
        if position not in fast:
            await never.wait()  # until the kill
        return f"v{position}"

    steps = [asyncio.ensure_future(ctx.step(f"s{p}", work, p)) for p in range(1, n + 1)]
    if first and len(fast) < n:
        # Recorded: ctx.step returns only after the commit.
        await asyncio.gather(*(steps[p - 1] for p in fast))
        await asyncio.gather(*(begun[p].wait() for p in range(1, n + 1) if p not in fast))
        await ledger(ctx.intent_id, 0, ctx.attempt, "killing")
        os.kill(os.getpid(), signal.SIGKILL)
    return list(await asyncio.gather(*steps))


async def _recorded(intent_id: str, positions: list[int]) -> None:
    """Returns once every one of ``positions`` is recorded for the intent:
    checked at each event notification of the control plane (every
    recorded step commits one)."""
    conn = await asyncpg.connect(LEDGER_URL)
    try:
        changed = asyncio.Event()
        await conn.add_listener("intentd_events", lambda *_: changed.set())
        while True:
            count = await conn.fetchval(
                "SELECT count(*) FROM intent_steps WHERE intent_id = $1 AND idx = ANY($2::int[])",
                intent_id, positions)
            if count == len(positions):
                return
            await changed.wait()
            changed.clear()
    finally:
        await conn.close()


@agent.handler(os.environ.get("TEST_AGENT_SYNC_TYPE", "test.parallel.sync.v1"))
def run_sync(ctx: SyncContext, payload: dict[str, Any]) -> list[Any]:
    n = int(payload["n"])
    first = ctx.attempt == 1
    fast = sorted(set(payload.get("fast", range(1, n + 1))) if first else range(1, n + 1))
    slow = [p for p in range(1, n + 1) if p not in fast]
    begun = threading.Barrier(len(slow)) if slow else None
    intent_id, attempt = ctx.intent_id, ctx.attempt

    def work(position: int) -> str:
        asyncio.run(_direct(intent_id, position, attempt, "begin"))
        if position in slow:
            assert begun is not None
            # The last of the slow ones to begin waits for the fast ones' records, then kills.
            if begun.wait() == 0:
                asyncio.run(_recorded(intent_id, fast))
                kill(intent_id, attempt)
            threading.Event().wait()
        return f"v{position}"

    return ctx.parallel(*((f"s{p}", work, p) for p in range(1, n + 1)))


if __name__ == "__main__":
    agent.run()
