"""The chaos soak's agent, run by each sidecar (``--exec "python -m intentd.commands.chaos.agent"``).

Every step appends a row to the side-effect ledger ``chaos_ledger`` in its own
transaction *before* doing its work (sleeping ``step_ms``), so the checker can
count what really ran, under which lease, and when. Each handler start is
recorded in ``chaos_attempts``. Both inserts are retried until the database
answers, so a PostgreSQL outage delays a step instead of failing it.

Environment: ``CHAOS_ADDRESS`` (agent address), ``CHAOS_DB_URL`` (ledger
database), ``CHAOS_CAPACITY``, ``CHAOS_PID_FILE`` (written at start so the
harness can find and kill this process).

Payload: ``{"steps": M, "step_ms": T, "fail_at": F or null, "wait_at": W or
null}``; with ``fail_at`` the step F raises ``NonRetryableError(FAIL_CODE)``
after its side effect; with ``wait_at`` the handler waits for the signal
``go`` before step W, records every return of that wait in ``chaos_waits``
and returns the signal's value in its result. A "family" parent's payload
adds ``"children": K, "child_at": C``: before step C the handler starts K
children (``ctx.start_many``: the same intent type at its own address, 2
steps each, its own ``max_attempts``), gathers them, records every return
of that gather in ``chaos_children`` and returns their results in its
result (``"children"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import random
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from intentd.agent import Agent, ChildCall, Context, NonRetryableError

from .model import (
    FAIL_CODE,
    INSERT_ATTEMPT,
    INSERT_CHILDREN,
    INSERT_LEDGER,
    INSERT_WAIT,
    INTENT_TYPE,
    SIGNAL_NAME,
    child_payload,
    step_name,
    step_value,
)

log = logging.getLogger("intentd.commands.chaos.agent")

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent (the sidecar) dies, so an agent is
    never left behind by a harness that was itself killed."""
    parent = os.getppid()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


class Ledger:
    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def _get_pool(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4, command_timeout=10,
                                                       timeout=5)
            return self._pool

    async def execute(self, query: str, *args: Any) -> None:
        """Runs ``query`` until it commits; outages are waited out."""
        delay = 0.05
        while True:
            try:
                pool = await self._get_pool()
                await pool.execute(query, *args)
                return
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("ledger write failed (%s: %s); retrying in %.2fs", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2) * random.uniform(0.8, 1.0)


def build_agent(address: str, ledger: Ledger, capacity: int) -> Agent:
    agent = Agent(address, capacity=capacity)
    pid = os.getpid()

    async def work(ctx: Context, index: int, step_ms: int, fail_at: int | None) -> dict[str, int]:
        began = time.time()
        await ledger.execute(INSERT_LEDGER, uuid.uuid4(), ctx.intent_id, index, ctx.attempt,
                             uuid.UUID(ctx.lease.token), pid, began)
        await asyncio.sleep(step_ms / 1000)
        if fail_at == index:
            raise NonRetryableError(FAIL_CODE, f"step {index} rejects this payload")
        return {"i": index, "v": step_value(ctx.intent_id, index)}

    @agent.handler(INTENT_TYPE)
    async def run(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
        await ledger.execute(INSERT_ATTEMPT, uuid.uuid4(), ctx.intent_id, ctx.attempt,
                             uuid.UUID(ctx.lease.token), pid)
        steps = int(payload["steps"])
        step_ms = int(payload.get("step_ms", 100))
        fail_at = payload.get("fail_at")
        wait_at = payload.get("wait_at")
        child_at = payload.get("child_at")
        total = 0
        result: dict[str, Any] = {}
        for index in range(1, steps + 1):
            if index == wait_at:
                signal = await ctx.wait_for_signal(SIGNAL_NAME)
                await ledger.execute(INSERT_WAIT, uuid.uuid4(), ctx.intent_id, ctx.attempt,
                                     uuid.UUID(ctx.lease.token), json.dumps(signal))
                result["signal"] = signal
            if index == child_at:
                calls = [ChildCall(ctx.to_agent, INTENT_TYPE, child_payload(step_ms), max_attempts=ctx.max_attempts,
                                   labels={"chaos_kind": "child"}) for _ in range(int(payload["children"]))]
                handles = await ctx.start_many(calls)
                results = await ctx.gather(*handles)
                await ledger.execute(INSERT_CHILDREN, uuid.uuid4(), ctx.intent_id, ctx.attempt,
                                     uuid.UUID(ctx.lease.token), json.dumps([h.id for h in handles]),
                                     json.dumps(results))
                result["children"] = results
            value = await ctx.step(step_name(index), work, ctx, index, step_ms, fail_at)
            total += int(value["v"])
        return {"steps": steps, "sum": total, **result}

    return agent


def main() -> int:
    die_with_parent()
    logging.basicConfig(level=os.environ.get("CHAOS_AGENT_LOG_LEVEL", "INFO"),
                        format="%(asctime)s agent[%(process)d] %(levelname)s %(name)s: %(message)s")
    address = os.environ["CHAOS_ADDRESS"]
    ledger = Ledger(os.environ["CHAOS_DB_URL"])
    capacity = int(os.environ.get("CHAOS_CAPACITY", "4"))
    pid_file = os.environ.get("CHAOS_PID_FILE")
    if pid_file:
        tmp = Path(f"{pid_file}.tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(pid_file)
    build_agent(address, ledger, capacity).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
