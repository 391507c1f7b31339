"""Scenario 7, peers on the same machine and PostgreSQL, in the same run.

Each peer runs in its own process (``python -m bench.peers.<peer>_peer URL
N REPS``) on its own fresh database and times each of its REPS passes itself
(from the first enqueue / start to the last job done; imports and schema
set-up excluded). Commits per job: ``xact_commit`` of its database over the
whole process (schema set-up included) / (REPS x N); exact, since the
process's backends publish their counters when they exit.
Peers that are not installed are skipped; see docs/performance.md for the
``bench`` extra.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench.harness import CommitMeter, Proc, fresh_database
from bench.suite import Run


@dataclass(frozen=True)
class Peer:
    name: str
    package: str
    module: str
    unit: str  # what n counts: "jobs", "workflows", "runs"
    steps_per_unit: int


PEERS = [
    Peer("pgqueuer", "pgqueuer", "bench.peers.pgqueuer_peer", "jobs", 1),
    Peer("procrastinate", "procrastinate", "bench.peers.procrastinate_peer", "jobs", 1),
    Peer("DBOS", "dbos", "bench.peers.dbos_peer", "workflows", 10),
    Peer("LangGraph", "langgraph.checkpoint.postgres", "bench.peers.langgraph_peer", "runs", 10),
]


def installed(peer: Peer) -> bool:
    try:
        return importlib.util.find_spec(peer.package) is not None
    except ModuleNotFoundError:
        return False


async def run_peer(peer: Peer, n: int, reps: int, timeout: float = 300.0) -> dict[str, Any]:
    async with fresh_database(f"peer_{peer.name.lower()}") as url:
        meter = CommitMeter(url)
        await meter.mark(settle=0.2)
        proc = Proc(f"peer-{peer.name}", [sys.executable, "-m", peer.module, url, str(n), str(reps)]).start()
        try:
            deadline = time.monotonic() + timeout
            while proc.alive():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{peer.name} did not finish in {timeout}s")
                await asyncio.sleep(0.1)
        finally:
            proc.kill()
        lines = [line for line in proc.log().splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"{peer.name} failed:\n{proc.log()[-3000:]}")
        result: dict[str, Any] = json.loads(lines[-1][len("RESULT "):])
        result["commits"] = await meter.mark(settle=0.5)
    return result


def size(peer: Peer, run: Run) -> int:
    cfg = run.config
    if peer.name == "pgqueuer":
        return cfg.peer_jobs
    if peer.name == "procrastinate":
        return cfg.peer_jobs // 5
    return cfg.conc_intents


async def run(run: Run) -> None:
    skipped = []
    for peer in PEERS:
        if not installed(peer):
            skipped.append(peer.name)
            continue
        n = size(peer, run)
        reps = run.config.reps
        result = await run_peer(peer, n, reps)
        rate = [n / s for s in result["seconds"]]
        per_step = [result["commits"] / (reps * n * peer.steps_per_unit)]
        key = f"peers.{peer.name.lower()}"
        if peer.steps_per_unit == 1:
            run.figure(f"{key}.rate", f"{peer.name} jobs/s (N={n:,}) vs intentd batch", "jobs/s", rate,
                       baseline="e2e.batch.rate")
            run.figure(f"{key}.commits", f"{peer.name} PG commits per job vs intentd", "commits", per_step,
                       baseline="e2e.batch.commits")
        else:
            run.figure(f"{key}.steps", f"{peer.name} steps/s ({n} x 10 steps) vs intentd", "steps/s",
                       [x * peer.steps_per_unit for x in rate], baseline="steps.conc_rate")
            run.figure(f"{key}.rate", f"{peer.name} {peer.unit}/s of 10 steps vs intentd", f"{peer.unit}/s",
                       rate, baseline="steps.conc_intents_rate")
            run.figure(f"{key}.commits", f"{peer.name} PG commits per step", "commits", per_step,
                       baseline="limits.pg_commits_per_row", note="no intentd per-step commit figure")
        run.note("peers", **{peer.name: {"n": n, **result}})
    run.note("peers", skipped=skipped)
