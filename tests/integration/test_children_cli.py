"""`intentd get --tree` and `intentd list --parent` against a real server on
real PostgreSQL: a family of intents written straight to the table (as the
control plane's start_children write leaves them: parent_id, parent_idx,
parent_ord, child_count), read back through GetIntent and
ListIntents(parent_id) by the CLI in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import asyncpg

from intentd.server.ids import new_id
from tests.support import ROOT

INTENTD = [sys.executable, "-m", "intentd.commands"]
TYPE = "intent.tree.work.v1"

async def _insert(pg: asyncpg.Connection, to_agent: str, *, parent: str | None = None, idx: int | None = None,
                  ord_: int | None = None, children: int = 0, detached: bool = False) -> str:
    intent_id = new_id()
    await pg.execute(
        "INSERT INTO intents (id, tenant, intent_type, to_agent, sender, payload, max_attempts,"
        " heartbeat_timeout_ms, available_at, create_time, update_time, parent_id, parent_idx, parent_ord,"
        " child_count, detached)"
        " VALUES ($1, 'default', $2, $3, 'test', '{}', 3, 10000, now(), now(), now(), $4, $5, $6, $7, $8)",
        intent_id, TYPE, to_agent, parent, idx, ord_, children, detached)
    return intent_id


def _cli(*args: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INTENTD, *args, "--target", target], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


async def test_tree_and_list_parent_from_a_real_server(pg: asyncpg.Connection, server) -> None:
    org = f"tree{new_id()[-6:]}"
    root = await _insert(pg, f"agent://{org}/prod/orchestrator", children=3)
    # Inserted out of start order: the listing orders by (parent_idx, parent_ord), not by time.
    reviewer = await _insert(pg, f"agent://{org}/prod/reviewer", parent=root, idx=3, ord_=0, detached=True)
    coder = await _insert(pg, f"agent://{org}/prod/coder", parent=root, idx=1, ord_=1, children=2)
    research = await _insert(pg, f"agent://{org}/prod/research", parent=root, idx=1, ord_=0)
    tools = [await _insert(pg, f"agent://{org}/prod/tool", parent=coder, idx=2, ord_=n) for n in range(2)]

    shown = _cli("get", root, "--tree", target=server.address)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    # Each line's first word after the tree's drawing is the intent's id.
    assert [line.lstrip("├└│─ ").split()[0] for line in lines] == [root, research, coder, *tools, reviewer]
    assert lines[0].startswith(f"{root}  {TYPE}  agent://{org}/prod/orchestrator  PENDING  attempt 0/3")
    assert lines[-1].startswith("└── ") and lines[-1].endswith("step 3  detached")

    cut = _cli("get", root, "--tree", "--max", "2", target=server.address)
    assert cut.stdout.splitlines()[-1] == "└── ... 2 more"

    as_json = json.loads(_cli("get", root, "--tree", "--json", target=server.address).stdout)
    assert [c["id"] for c in as_json["children"]] == [research, coder, reviewer]
    assert [c["id"] for c in as_json["children"][1]["children"]] == tools

    listed = _cli("list", "--parent", root, target=server.address)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == [research, coder, reviewer]
