"""A test agent for child intents: parents that start, call and race
children, and a worker the test can block or have killed by marker files.
Every step function call, every start and every wait that returns leaves a
row in the PostgreSQL ledger (its own transaction), so tests can assert that
no step ran twice, that every attempt got the same children back (no child
sent twice) and what each wait returned.

Intent types, ``<TEST_FAMILY_PREFIX>.<role>.v1`` (prefix default
``test.family``), all served by this one agent; children go to
``payload["to_agent"]`` (default: this intent's own address):

  orchestrate  {"children": N, "work": {...}, "detached": bool?}
               step "prepare"; start_many N workers (payload work + {"n": i});
               gather; step "summarize"; returns the workers' results.
  call         {"work": {...}}: step "prepare"; ctx.call a worker; step "summarize".
  tree         {"planners": P, "workers": W, "work": {...}}: start_many P
               planners (each starts W workers), gather them.
  plan         {"workers": W, "work": {...}}: start_many W workers, gather them
               (the middle level of a tree).
  race         {"children": [work, ...]}: start each worker (one start per
               child), ctx.first; returns {"winner": index, "value": ...}.
  work         the worker: one step "work" that logs "begin", then
                 "block_until": PATH   works until that file exists;
                 "kill_if": PATH       SIGKILLs this process while that file exists
                                       (delete it to let the retry pass);
                 "kill_once": DIR      SIGKILLs this process the first time this
                                       worker runs (marker DIR/<intent id>);
                 "hang": true          works until cancelled, then logs
                                       "stopped:<cancel reason>";
                 "fail": "retryable" | "nonretryable";
               returns {"value": payload value, "n": payload n, "attempt": attempt}.

Ledger rows (intent_id, step, attempt, phase), step naming the point of the
handler (1 prepare, 2 start, 3 gather / first / call, 4 summarize; the
worker's step is 1):
  "begin"              a step function ran (so begins() counts re-runs);
  "started:<ids>"      a start returned these child ids (JSON list), each attempt;
  "returned:<json>"    a gather / first / call returned this (or {"failed": ...}).
``payload["child_max_attempts"]`` sets the children's max_attempts.
Parents' ``payload["kill_after"]``: "prepare" | "started" | "gathered":
SIGKILL this process right after that point, on the attempts in
``payload["kill_attempts"]`` (default [1]), or, with ``payload["kill_marks"]``
(a DIR), the first time the intent gets there (marker DIR/<id>.<point>); "waiting" is for the test to kill
the sidecar while the parent is parked.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import asyncpg

from intentd.agent import Agent, ChildCall, ChildFailed, ChildHandle, Context, NonRetryableError

ADDRESS = os.environ["TEST_AGENT_ADDRESS"]
LEDGER_URL = os.environ["TEST_LEDGER_URL"]
PREFIX = os.environ.get("TEST_FAMILY_PREFIX", "test.family")

agent = Agent(ADDRESS, capacity=int(os.environ.get("TEST_AGENT_CAPACITY", "8")))
_pool: asyncpg.Pool | None = None


def intent_type(role: str) -> str:
    return f"{PREFIX}.{role}.v1"


_pool_lock = asyncio.Lock()


async def ledger(ctx: Context, step: int, phase: str) -> None:
    global _pool
    async with _pool_lock:  # one pool: many handlers run at once here
        if _pool is None:
            _pool = await asyncpg.create_pool(LEDGER_URL, min_size=1, max_size=4)
    await _pool.execute(
        "INSERT INTO test_ledger (intent_id, step, attempt, phase, pid) VALUES ($1, $2, $3, $4, $5)",
        ctx.intent_id, step, ctx.attempt, phase, os.getpid(),
    )


def kill_point(ctx: Context, payload: dict[str, Any], point: str) -> None:
    if payload.get("kill_after") != point:
        return
    if payload.get("kill_marks"):
        # Killed the first time this intent gets here, whichever attempt that is:
        # another intent's kill may end attempt 1 before it reaches the point.
        marker = Path(payload["kill_marks"]) / f"{ctx.intent_id}.{point}"
        if not marker.exists():
            marker.write_text(str(ctx.attempt))
            os.kill(os.getpid(), signal.SIGKILL)
    elif ctx.attempt in payload.get("kill_attempts", [1]):
        os.kill(os.getpid(), signal.SIGKILL)


# The ledger's step column: which point of the handler a row is about.
PREPARE, START, WAIT, SUMMARIZE = 1, 2, 3, 4
STEPS = {"prepare": PREPARE, "summarize": SUMMARIZE}


async def step(ctx: Context, name: str, value: Any = None) -> Any:
    """A logged step: its function leaves "begin" each time it runs."""

    async def run() -> Any:
        await ledger(ctx, STEPS[name], "begin")
        return value

    return await ctx.step(name, run)


async def started(ctx: Context, handles: list[ChildHandle]) -> None:
    await ledger(ctx, START, "started:" + json.dumps([h.id for h in handles]))


async def returned(ctx: Context, value: Any) -> None:
    await ledger(ctx, WAIT, "returned:" + json.dumps(value, sort_keys=True))


async def failed(ctx: Context, exc: ChildFailed) -> None:
    await returned(ctx, {"failed": exc.child_id, "state": exc.state, "code": exc.code})


def work_call(payload: dict[str, Any], ctx: Context, work: dict[str, Any], role: str = "work") -> ChildCall:
    return ChildCall(payload.get("to_agent") or ctx.to_agent, intent_type(role), work,
                     max_attempts=payload.get("child_max_attempts"), detached=bool(payload.get("detached", False)))


async def fan_out(ctx: Context, payload: dict[str, Any], calls: list[ChildCall]) -> list[Any]:
    """start_many, then gather: the shape of orchestrate, plan and tree."""
    handles = await ctx.start_many(calls)
    await started(ctx, handles)
    kill_point(ctx, payload, "started")
    try:
        values = await ctx.gather(*handles)
    except ChildFailed as exc:
        await failed(ctx, exc)
        raise
    await returned(ctx, values)
    kill_point(ctx, payload, "gathered")
    return values


@agent.handler(intent_type("orchestrate"))
async def orchestrate(ctx: Context, payload: dict[str, Any]) -> Any:
    await step(ctx, "prepare")
    kill_point(ctx, payload, "prepare")
    work = payload.get("work", {})
    values = await fan_out(ctx, payload, [work_call(payload, ctx, {**work, "n": n})
                                          for n in range(int(payload["children"]))])
    return await step(ctx, "summarize", values)


@agent.handler(intent_type("call"))
async def call(ctx: Context, payload: dict[str, Any]) -> Any:
    await step(ctx, "prepare")
    kill_point(ctx, payload, "prepare")
    try:
        value = await ctx.call(payload.get("to_agent") or ctx.to_agent, intent_type("work"),
                               payload.get("work", {}), max_attempts=payload.get("child_max_attempts"))
    except ChildFailed as exc:
        await failed(ctx, exc)
        raise
    await returned(ctx, value)
    kill_point(ctx, payload, "gathered")
    return await step(ctx, "summarize", value)


@agent.handler(intent_type("tree"))
async def tree(ctx: Context, payload: dict[str, Any]) -> Any:
    await step(ctx, "prepare")
    kill_point(ctx, payload, "prepare")
    # The planners' kill point is the tree's "planner_kill_after".
    plan = {"workers": payload["workers"], "work": payload.get("work", {}),
            "kill_after": payload.get("planner_kill_after"), "kill_attempts": payload.get("kill_attempts", [1]),
            "kill_marks": payload.get("kill_marks"),
            "child_max_attempts": payload.get("child_max_attempts")}
    values = await fan_out(ctx, payload, [work_call(payload, ctx, {**plan, "planner": p}, "plan")
                                          for p in range(int(payload["planners"]))])
    return await step(ctx, "summarize", values)


@agent.handler(intent_type("plan"))
async def plan(ctx: Context, payload: dict[str, Any]) -> Any:
    await step(ctx, "prepare")
    kill_point(ctx, payload, "prepare")
    work = payload.get("work", {})
    calls = [work_call(payload, ctx, {**work, "n": n, "planner": payload.get("planner")})
             for n in range(int(payload["workers"]))]
    values = await fan_out(ctx, payload, calls)
    return await step(ctx, "summarize", values)


@agent.handler(intent_type("race"))
async def race(ctx: Context, payload: dict[str, Any]) -> Any:
    handles = [await ctx.start(payload.get("to_agent") or ctx.to_agent, intent_type("work"), work)
               for work in payload["children"]]
    for handle in handles:
        await started(ctx, [handle])
    kill_point(ctx, payload, "started")
    try:
        winner, value = await ctx.first(*handles)
    except ChildFailed as exc:
        await failed(ctx, exc)
        raise
    result = {"winner": handles.index(winner), "value": value}
    await returned(ctx, result)
    kill_point(ctx, payload, "gathered")
    return result


@agent.handler(intent_type("work"))
async def work(ctx: Context, payload: dict[str, Any]) -> Any:
    async def run() -> Any:
        await ledger(ctx, PREPARE, "begin")
        if payload.get("kill_if") and Path(payload["kill_if"]).exists():  # noqa: ASYNC240 -- the test's signal
            os.kill(os.getpid(), signal.SIGKILL)
        if payload.get("kill_once"):
            marker = Path(payload["kill_once"]) / ctx.intent_id
            if not marker.exists():
                marker.write_text(str(ctx.attempt))
                os.kill(os.getpid(), signal.SIGKILL)
        if payload.get("block_until"):
            flag = Path(payload["block_until"])
            while not flag.exists():  # noqa: ASYNC110, ASYNC240 -- the test's signal is a file
                await asyncio.sleep(0.02)
        if payload.get("hang"):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await ledger(ctx, PREPARE, f"stopped:{ctx.cancel_reason}")
                raise
        if payload.get("fail") == "nonretryable":
            raise NonRetryableError("TOLD_TO_FAIL", f"worker {payload.get('n')} told to fail")
        if payload.get("fail") == "retryable":
            raise RuntimeError("told to fail, try again")
        return {"value": payload.get("value"), "n": payload.get("n"), "attempt": ctx.attempt}

    return await ctx.step("work", run)


if __name__ == "__main__":
    agent.run()
