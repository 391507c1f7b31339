"""LangGraph: N runs (threads) of a graph of 10 no-op nodes at once, with
AsyncPostgresSaver on a pool of 8 and durability="sync" (each step's
checkpoint is written before the next step runs, as intentd records steps)."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, TypedDict

from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from bench.peers._cli import main

NODES = 10


class State(TypedDict):
    count: int


def _node(state: State) -> dict[str, int]:
    return {"count": state["count"] + 1}


async def measure(url: str, n: int, reps: int) -> dict[str, Any]:
    builder = StateGraph(State)
    names = [f"n{i}" for i in range(NODES)]
    for name in names:
        builder.add_node(name, _node)
    builder.add_edge(START, names[0])
    for a, b in itertools.pairwise(names):
        builder.add_edge(a, b)
    builder.add_edge(names[-1], END)
    async with AsyncConnectionPool(url, min_size=8, max_size=8, open=False,
                                   kwargs={"autocommit": True, "prepare_threshold": 0,
                                           "row_factory": dict_row}) as pool:
        saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
        await saver.setup()
        graph = builder.compile(checkpointer=saver)
        seconds = []
        for rep in range(reps):
            began = time.perf_counter()
            results = await asyncio.gather(*(
                graph.ainvoke({"count": 0}, {"configurable": {"thread_id": f"r{rep}t{i}"}}, durability="sync")
                for i in range(n)))
            seconds.append(time.perf_counter() - began)
            if any(r["count"] != NODES for r in results):
                raise RuntimeError("LangGraph runs did not pass every node")
    return {"runs": n, "steps": n * NODES, "seconds": seconds,
            "settings": f"{n} threads x {NODES} nodes at once; AsyncPostgresSaver, pool 8, durability=sync"}


if __name__ == "__main__":
    main(measure)
