"""What row-level security would cost intentd's hot statements.

Two databases with intentd's schema, the same seed data (two tenants), the
same non-superuser role granted by ``grant_app_role`` (superusers bypass
RLS). In one, RLS is enabled and forced with a tenant policy read from a
session GUC (``intentd.tenant``): intents, intent_types by their tenant
column, intent_events and intent_steps through their intent. (intent_events and intent_steps get a tenant
column for it, see POLICIES.) The control plane's own statements (server/sql) run against both, alternating rounds,
and the median time per statement is printed with the ratio.

    python scripts/rls_cost.py postgresql://postgres@127.0.0.1:5432/postgres [--rounds 5 --n 400]

Loopback only, bounded (rounds x n statements per case); both databases and
the role are dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from intentd.server.migrate import grant_app_role, migrate
from intentd.server.queries import Q

TENANTS = ("rls-a", "rls-b")
INTENTS_PER_TENANT = 2000
BATCH = 16
CHUNK = 10

# intent_events and intent_steps get a tenant column of their own, filled
# from the GUC by default (so no statement changes): a policy through the
# parent intent (EXISTS (SELECT 1 FROM intents ...)) refuses insert_intents,
# whose CTE inserts an intent and its CREATED event in one statement (the
# event's WITH CHECK does not see the new intent).
POLICIES = """
ALTER TABLE intent_events ADD COLUMN tenant text;
UPDATE intent_events e SET tenant = i.tenant FROM intents i WHERE i.id = e.intent_id;
ALTER TABLE intent_events ALTER COLUMN tenant SET DEFAULT current_setting('intentd.tenant'),
                          ALTER COLUMN tenant SET NOT NULL;
ALTER TABLE intent_steps ADD COLUMN tenant text;
ALTER TABLE intent_steps ALTER COLUMN tenant SET DEFAULT current_setting('intentd.tenant'),
                         ALTER COLUMN tenant SET NOT NULL;
""" + "".join(
    f"""ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
ALTER TABLE {table} FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON {table} USING (tenant = current_setting('intentd.tenant'));
"""
    for table in ("intents", "intent_types", "intent_events", "intent_steps")
) + """ANALYZE;
"""

SEED = """
INSERT INTO tenants (name) VALUES ('rls-a'), ('rls-b');
INSERT INTO intents (id, tenant, intent_type, to_agent, sender, payload, max_attempts, heartbeat_timeout_ms,
                     state, attempt, lease_token, lease_session, lease_expires_at, available_at,
                     create_time, update_time, last_seq)
SELECT t || '-' || lpad(g::text, 6, '0'), t, 'rls.bench.v1', 'agent://' || t || '/w', 's', '{}', 3, 10000,
       'IN_PROGRESS', 1, gen_random_uuid(), 'session-' || t, now() + interval '1 day', now(), now(), now(), 1
FROM unnest(ARRAY['rls-a', 'rls-b']) t, generate_series(1, $1) g;
INSERT INTO intent_events (intent_id, seq, type, time, state, attempt)
SELECT id, 1, 'CREATED', now(), 'PENDING', 0 FROM intents;
ANALYZE;
"""


def _db_url(url: str, name: str, user: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc if user is None else f"{user}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(path=f"/{name}", netloc=netloc))


async def _codecs(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=str, decoder=str, schema="pg_catalog", format="text")


class Case:
    def __init__(self, conn: asyncpg.Connection, rls: bool, per_tx_guc: bool) -> None:
        self.conn = conn
        self.rls = rls
        self.per_tx_guc = per_tx_guc
        self.ids: list[str] = []
        self.tokens: dict[str, str] = {}
        self.steps: dict[str, int] = {}

    async def load(self) -> None:
        rows = await self.conn.fetch("SELECT id, lease_token::text AS t FROM intents WHERE tenant = 'rls-a'"
                                     " ORDER BY id") if not self.rls else await self.conn.fetch(
            "SELECT id, lease_token::text AS t FROM intents ORDER BY id")
        self.ids = [r["id"] for r in rows]
        self.tokens = {r["id"]: r["t"] for r in rows}
        self.steps = dict.fromkeys(self.ids, 0)

    async def run(self, fn: Callable[[asyncpg.Connection, int], Awaitable[Any]], i: int) -> None:
        if self.per_tx_guc:
            # A pool shared by tenants: each transaction names its tenant first.
            async with self.conn.transaction():
                await self.conn.execute("SELECT set_config('intentd.tenant', $1, true)", TENANTS[0])
                await fn(self.conn, i)
        else:
            await fn(self.conn, i)


def statements(case: Case) -> dict[str, Callable[[asyncpg.Connection, int], Awaitable[Any]]]:
    async def get_intent(conn: asyncpg.Connection, i: int) -> None:
        assert await conn.fetchrow(Q.get_intent, case.ids[i % len(case.ids)], TENANTS[0]) is not None

    async def list_events(conn: asyncpg.Connection, i: int) -> None:
        assert await conn.fetch(Q.list_events, case.ids[i % len(case.ids)], TENANTS[0], 0, 500)

    async def record_steps(conn: asyncpg.Connection, i: int) -> None:
        ids = [case.ids[(i * BATCH + k) % len(case.ids)] for k in range(BATCH)]
        idx = []
        for intent_id in ids:
            case.steps[intent_id] += 1
            idx.append(case.steps[intent_id])
        rows = await conn.fetch(Q.record_steps, ids, [case.tokens[x] for x in ids], [1] * BATCH, idx,
                                [f"s{n}" for n in idx], ['{"v": 1}'] * BATCH, [None] * BATCH, [None] * BATCH)
        assert len(rows) == BATCH, len(rows)

    async def insert_intents(conn: asyncpg.Connection, i: int) -> None:
        n = BATCH
        ids = [f"new-{uuid.uuid4().hex[:20]}" for _ in range(n)]
        rows = await conn.fetch(Q.insert_intents, ids, [TENANTS[0]] * n, ["rls.bench.v1"] * n,
                                ["agent://rls-a/w"] * n, ["s"] * n, ["{}"] * n, [None] * n, ["{}"] * n,
                                [None] * n, [None] * n, [10000] * n, [None] * n)
        assert len(rows) == n

    return {"get_intent": get_intent, "list_events": list_events,
            f"record_steps (batch {BATCH})": record_steps, f"insert_intents (batch {BATCH})": insert_intents}


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("admin_url")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=400, help="statements per case per round")
    args = p.parse_args()
    tag = uuid.uuid4().hex[:8]
    role = f"intentd_rls_{tag}"
    variants = {"plain": (False, False), "plain, set_config per tx": (False, True),
                "rls, GUC per session": (True, False), "rls, set_config per tx": (True, True)}
    # One database per variant: each records its own steps on its own rows.
    names = {label: f"intentd_rls_{n}_{tag}" for n, label in enumerate(variants)}
    admin = await asyncpg.connect(args.admin_url)
    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    conns: dict[str, asyncpg.Connection] = {}
    try:
        for kind, name in names.items():
            await admin.execute(f'CREATE DATABASE "{name}"')
            owner = await asyncpg.connect(_db_url(args.admin_url, name))
            try:
                await migrate(owner)
                await owner.execute(SEED.replace("$1", str(INTENTS_PER_TENANT)))
                await grant_app_role(owner, role)
                if variants[kind][0]:
                    await owner.execute(POLICIES)
            finally:
                await owner.close()
        results: dict[str, dict[str, list[float]]] = {}
        cases: dict[str, Case] = {}
        for label, (rls, per_tx) in variants.items():
            conn = await asyncpg.connect(_db_url(args.admin_url, names[label], role),
                                         server_settings={"intentd.tenant": TENANTS[0]})
            await _codecs(conn)
            conns[label] = conn
            cases[label] = Case(conn, rls, per_tx)
            await cases[label].load()
            if rls:
                assert len(cases[label].ids) == INTENTS_PER_TENANT, "the policy let the other tenant through"
        # Paired and interleaved: each chunk of CHUNK statements runs on every
        # variant in turn, so the load of a shared machine falls on all alike;
        # the figure is the median over chunks of the time per statement.
        bound = {label: statements(case) for label, case in cases.items()}
        counters = dict.fromkeys(cases, 0)
        for name in bound["plain"]:
            for label, case in cases.items():
                for i in range(20):  # warm the prepared statement
                    await case.run(bound[label][name], 100_000 + i)
            for _ in range(args.rounds * args.n // CHUNK):
                for label, case in cases.items():
                    began = time.perf_counter()
                    for _ in range(CHUNK):
                        counters[label] += 1
                        await case.run(bound[label][name], counters[label])
                    per = (time.perf_counter() - began) / CHUNK * 1e6
                    results.setdefault(name, {}).setdefault(label, []).append(per)
        out: dict[str, dict[str, float]] = {}
        print(f"{'statement':<28} " + " ".join(f"{v:>26}" for v in variants) + "   (ratios: to plain)")
        for name, by in results.items():
            med = {label: statistics.median(v) for label, v in by.items()}
            out[name] = med
            cells = []
            for label in variants:
                base = med["plain"]
                cells.append(f"{med[label]:>9.0f} us ({med[label] / base:4.2f}x)")
            print(f"{name:<28} " + " ".join(f"{c:>26}" for c in cells))
        print(json.dumps(out))
    finally:
        for conn in conns.values():
            await conn.close()
        for name in names.values():
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
