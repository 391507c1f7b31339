"""Least privilege in PostgreSQL: the control plane runs as a role granted
only DML (`intentd migrate --grant-to ROLE`), migrations run as the owner;
a server whose role may not migrate never tries, and says what to do when
the schema is behind; the helper reads by id are tenant-scoped."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from intentd.client import IntentClient, IntentState
from intentd.server.migrate import READ_ONLY_TABLES, app_tables
from tests.stack import TYPE, begins, create_ledger, ledger
from tests.support import ROOT, ServerProcess, run_sync, wait_until

INTENTD = [sys.executable, "-m", "intentd.commands"]


def _as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def _sql(url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url)
        try:
            return [dict(r) for r in await conn.fetch(query, *args)]
        finally:
            await conn.close()

    return list(run_sync(go()))


def _intentd(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INTENTD, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


class AppDatabase:
    """A fresh database migrated by its owner, and an application role (unique
    to this test, dropped after) granted by `intentd migrate --grant-to`."""

    def __init__(self, owner_url: str, role: str) -> None:
        self.owner_url = owner_url
        self.role = role
        self.app_url = _as_user(owner_url, role)


@pytest.fixture
def app_db(databases: Any, admin_url: str) -> Iterator[AppDatabase]:
    role = f"intentd_app_{uuid.uuid4().hex[:10]}"
    owner_url = databases.create(migrated=False)
    # LOGIN only: no CREATEDB, no CREATEROLE, not a superuser.
    _sql(admin_url, f'CREATE ROLE "{role}" LOGIN')
    try:
        yield AppDatabase(owner_url, role)
    finally:
        _sql(admin_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        _sql(owner_url, f'DROP OWNED BY "{role}"')
        _sql(admin_url, f'DROP ROLE "{role}"')


def _migrate_and_grant(db: AppDatabase) -> None:
    done = _intentd("migrate", "--grant-to", db.role, INTENTD_DATABASE_URL="",
                    INTENTD_MIGRATION_DATABASE_URL=db.owner_url)
    assert done.returncode == 0, done.stderr
    assert f"granted role {db.role!r}" in done.stdout, done.stdout


def test_app_role_runs_a_full_cycle_and_cannot_change_the_schema(app_db: AppDatabase, cluster: Any,
                                                                  tmp_path: Path) -> None:
    _migrate_and_grant(app_db)
    # The ledger agent's side effects go to a table of the owner's, not the app role's.
    cluster.db = create_ledger(app_db.owner_url)

    # Keys are made through the app role too: the operator CLI needs no DDL either.
    keys = {}
    for name in ("client", "agent"):
        made = _intentd("keys", "create", name, "--tenant", "default", "--role", name,
                        *(["--address", cluster.address] if name == "agent" else []),
                        INTENTD_DATABASE_URL=app_db.app_url)
        assert made.returncode == 0, made.stderr
        keys[name] = made.stdout.strip().splitlines()[-1]

    server = cluster.server(INTENTD_DATABASE_URL=app_db.app_url, INTENTD_AUTH="on")
    cluster.sidecar(server.address, INTENTD_API_KEY=keys["agent"])
    with IntentClient(server.address, metadata=[("authorization", f"Bearer {keys['client']}")]) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=cluster.address, payload={"steps": 4})
        final = client.wait_for(intent_id, timeout=60)
        assert final.state == IntentState.COMPLETED, cluster.logs()
        events = [str(e.type) for e in client.watch(intent_id)]
    assert final.steps_completed == 4
    assert [e for e in events if "STEP" in e] == ["STEP_COMPLETED"] * 4, events
    assert "DELIVERED" in events and "ACKNOWLEDGED" in events, events
    assert set(begins(ledger(cluster.db, intent_id)).values()) == {1}
    # Its sessions really were the app role's.
    who = _sql(app_db.owner_url, "SELECT DISTINCT usename FROM pg_stat_activity WHERE application_name LIKE 'intentd:%'"
               " AND datname = current_database()")
    assert {r["usename"] for r in who} == {app_db.role}, who
    server.terminate()

    # Exactly DML on intentd's tables (SELECT only on the read-only ones), nothing more.
    grants = _sql(app_db.owner_url, "SELECT table_name, privilege_type FROM information_schema.role_table_grants"
                  " WHERE grantee = $1", app_db.role)
    held: dict[str, set[str]] = {}
    for row in grants:
        held.setdefault(row["table_name"], set()).add(row["privilege_type"])
    want = {t: ({"SELECT"} if t in READ_ONLY_TABLES else {"SELECT", "INSERT", "UPDATE", "DELETE"})
            for t in app_tables()}
    assert held == want
    sequences = _sql(app_db.owner_url, "SELECT c.relname, has_sequence_privilege($1, c.oid, 'USAGE') AS usage,"
                     " has_sequence_privilege($1, c.oid, 'UPDATE') AS update FROM pg_class c WHERE c.relkind = 'S'",
                     app_db.role)
    # intentd's sequences are usable (nextval), not settable; the test's own ledger is not the app's.
    assert {s["relname"]: (s["usage"], s["update"]) for s in sequences} == {
        "audit_log_id_seq": (True, False), "intent_signals_seq_seq": (True, False),
        "child_notices_seq_seq": (True, False),
        "test_ledger_id_seq": (False, False)}

    # And no DDL of any kind.
    for statement in ("CREATE TABLE intentd_evil (x int)", "ALTER TABLE intents ADD COLUMN evil int",
                      "DROP TABLE intent_steps", "TRUNCATE intent_events", "CREATE INDEX evil ON intents (sender)",
                      "ALTER TABLE intents DISABLE TRIGGER intents_transition",
                      "INSERT INTO intent_transitions VALUES ('COMPLETED', 'PENDING')",
                      "DELETE FROM intentd_schema_migrations", "CREATE SCHEMA evil"):
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            _sql(app_db.app_url, statement)


def test_server_without_ddl_rights_never_migrates_and_says_what_to_do(app_db: AppDatabase, tmp_path: Path) -> None:
    # The schema is not there yet and the role may not create it: the server
    # must not try (no permission error from a CREATE), but name the fix.
    server = ServerProcess(app_db.app_url, tmp_path / "server.log", INTENTD_AUTH="off")
    done = subprocess.run([*INTENTD, "server"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **server.env})
    assert done.returncode != 0
    text = done.stderr + done.stdout
    assert "schema is at version 0" in text and "run `intentd migrate`" in text, text
    assert "permission denied" not in text, text
    assert "Traceback" not in text, text  # one clear line, not a stack
    tables = _sql(app_db.owner_url, "SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public'")
    assert tables[0]["n"] == 0

    # INTENTD_MIGRATE=false as the owner: no DDL either, and the same clear refusal.
    done = subprocess.run([*INTENTD, "server"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **server.env, "INTENTD_DATABASE_URL": app_db.owner_url,
                               "INTENTD_MIGRATE": "false"})
    assert done.returncode != 0
    assert "INTENTD_MIGRATE=false" in done.stderr + done.stdout
    assert _sql(app_db.owner_url, "SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public'")[0]["n"] == 0

    # Migrated but not granted: it names the missing GRANT.
    assert _intentd("migrate", INTENTD_DATABASE_URL=app_db.owner_url).returncode == 0
    done = subprocess.run([*INTENTD, "server"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **server.env})
    assert done.returncode != 0
    assert f"run `intentd migrate --grant-to {app_db.role}`" in done.stderr + done.stdout, done.stderr

    # Granted: it starts, and (auto) runs no DDL on a current schema.
    _migrate_and_grant(app_db)
    started = ServerProcess(app_db.app_url, tmp_path / "ok.log", INTENTD_AUTH="off").start()
    try:
        wait_until(started.alive, 5)
    finally:
        started.kill()


def test_every_table_a_migration_makes_is_granted(databases: Any) -> None:
    # app_tables() is read from the migrations; a table it missed would be
    # one the server cannot use as its app role.
    url = databases.create()
    rows = _sql(url, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    assert {r["tablename"] for r in rows} == set(app_tables())


async def test_list_events_is_tenant_scoped(database_url: str) -> None:
    # The second wall: even a caller that skipped its own tenant check (a bug
    # in one RPC) reads no other tenant's events through list_events.
    from intentd.server.db import Database
    from intentd.server.store import IntentStore, NewIntent

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO tenants (name) VALUES ('lp-acme'), ('lp-globex') ON CONFLICT DO NOTHING")
    finally:
        await conn.close()
    db = Database(database_url, min_size=1, max_size=2)
    await db.open(run_migrations=False)
    try:
        store = IntentStore(db)
        (sent,) = await store.send("lp-acme", [NewIntent(intent_type="t.scoped.v1", to_agent="agent://lp-acme/x",
                                                         payload="{}", sender="s")])
        intent_id = sent.row["id"]
        assert [e["type"] for e in await store.events("lp-acme", intent_id, 0)] == ["CREATED"]
        assert await store.events("lp-globex", intent_id, 0) == []
    finally:
        await db.close()


def test_a_schema_one_migration_behind_stops_a_dml_only_server(app_db: AppDatabase, tmp_path: Path) -> None:
    # The upgrade case: the new replica starts before `intentd migrate` ran.
    from intentd.server.migrate import available_migrations
    from intentd.server.queries import Q

    async def all_but_last() -> None:
        conn = await asyncpg.connect(app_db.owner_url)
        try:
            await conn.execute(Q.create_migrations_table)
            for migration in available_migrations()[:-1]:
                await conn.execute(migration.sql)
                await conn.execute(Q.record_migration, migration.version, migration.name)
            await conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public"
                               f' TO "{app_db.role}"')
        finally:
            await conn.close()

    run_sync(all_but_last())
    behind = len(available_migrations()) - 1
    server = ServerProcess(app_db.app_url, tmp_path / "server.log", INTENTD_AUTH="off")
    done = subprocess.run([*INTENTD, "server"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **server.env})
    assert done.returncode == 2, done.stderr
    assert f"schema is at version {behind}, this intentd needs {behind + 1}" in done.stderr, done.stderr
    assert "it has no DDL rights" in done.stderr and "Traceback" not in done.stderr, done.stderr
    # It did not try: the schema is where it was.
    assert _sql(app_db.owner_url, "SELECT max(version) AS v FROM intentd_schema_migrations")[0]["v"] == behind
