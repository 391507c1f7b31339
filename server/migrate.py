"""Versioned schema migrations, applied in order under an advisory lock so
that several replicas starting at once apply each migration exactly once."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import asyncpg

from .queries import Q

log = logging.getLogger("intentd.migrate")

# Any fixed 64-bit number; it names the lock all intentd processes agree on.
MIGRATION_LOCK_KEY = 0x696E74656E7464  # "intentd"
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_CREATE_TABLE_RE = re.compile(r"^\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?([a-z_][a-z0-9_]*)",
                              re.IGNORECASE | re.MULTILINE)
_DROP_TABLE_RE = re.compile(r"^\s*DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?([a-z_][a-z0-9_]*)",
                            re.IGNORECASE | re.MULTILINE)
MIGRATIONS_TABLE = "intentd_schema_migrations"
# Tables the control plane reads but never changes: the state machine is
# the schema's, and only migrations record migrations.
READ_ONLY_TABLES = frozenset({"intent_transitions", MIGRATIONS_TABLE})
DML = ("SELECT", "INSERT", "UPDATE", "DELETE")


class SchemaError(RuntimeError):
    """The database's schema cannot serve this version of intentd (behind,
    and this role may not migrate it; or the role lacks privileges)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("intentd.server").joinpath("migrations").iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Applies pending migrations; returns the versions applied (empty when
    the schema was already current)."""
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute(Q.migration_lock, MIGRATION_LOCK_KEY)
        await conn.execute(Q.create_migrations_table)
        done = {r["version"] for r in await conn.fetch(Q.applied_migrations)}
        for migration in available_migrations():
            if migration.version in done:
                continue
            log.info("applying migration %04d_%s", migration.version, migration.name)
            await conn.execute(migration.sql)
            await conn.execute(Q.record_migration, migration.version, migration.name)
            applied_now.append(migration.version)
    return applied_now


async def current_version(conn: asyncpg.Connection) -> int:
    if not await conn.fetchval(Q.migrations_table_exists):
        return 0
    return int(await conn.fetchval(Q.schema_version))


def latest_version() -> int:
    return available_migrations()[-1].version


@cache
def app_tables() -> tuple[str, ...]:
    """Every table intentd's migrations leave in place, read from the
    migrations themselves, so a new migration's table is granted without a
    second list to keep in step."""
    tables: dict[str, None] = {MIGRATIONS_TABLE: None}
    for migration in available_migrations():
        for name in _CREATE_TABLE_RE.findall(migration.sql):
            tables[name.lower()] = None
        for name in _DROP_TABLE_RE.findall(migration.sql):
            tables.pop(name.lower(), None)
    return tuple(tables)


def required_privileges() -> list[tuple[str, str]]:
    """(table, privilege) pairs the control plane needs: DML on its data,
    SELECT on the read-only tables."""
    return [(t, p) for t in app_tables() for p in (("SELECT",) if t in READ_ONLY_TABLES else DML)]


async def ensure_schema(conn: asyncpg.Connection, mode: str, migration_conn: asyncpg.Connection | None = None) -> None:
    """Brings the schema to this version's, or fails saying what to do.

    ``mode`` is INTENTD_MIGRATE: "true" migrates (through ``migration_conn``
    when given, the INTENTD_MIGRATION_DATABASE_URL session); "false" never
    runs DDL and only checks the version; "auto" migrates only when the
    schema is behind and the migrating session may do so (a role without
    DDL rights never tries). Then, whatever the mode, the serving session
    must hold every privilege the control plane uses, so a missing GRANT
    fails at start, not at the first write that needs it."""
    migrator = migration_conn or conn
    try:
        current, latest = await current_version(conn), latest_version()
    except asyncpg.exceptions.InsufficientPrivilegeError:
        who = await conn.fetchval(Q.current_user)
        raise SchemaError(f"role {who!r} may not read {MIGRATIONS_TABLE}: run `intentd migrate --grant-to {who}`"
                          ) from None
    if mode == "true" or (mode == "auto" and current < latest and await migrator.fetchval(Q.can_migrate)):
        applied = await migrate(migrator)
        if applied:
            log.info("schema migrated to version %d", applied[-1])
        current = await current_version(conn)
    if current < latest:
        who = await conn.fetchval(Q.current_user)
        raise SchemaError(
            f"the database schema is at version {current}, this intentd needs {latest}; role {who!r} does not "
            "migrate it (" + ("INTENTD_MIGRATE=false" if mode == "false" else "it has no DDL rights")
            + "): run `intentd migrate` with a role that owns the schema (INTENTD_MIGRATION_DATABASE_URL) first")
    if current > latest:
        log.warning("the database schema is at version %d, newer than this intentd's %d (a rolling upgrade?)",
                    current, latest)
    pairs = required_privileges()
    missing = await conn.fetch(Q.missing_table_privileges, [t for t, _ in pairs], [p for _, p in pairs])
    if missing:
        who = await conn.fetchval(Q.current_user)
        shown = ", ".join(f"{r['privilege']} on {r['name']}" for r in missing[:8])
        raise SchemaError(f"role {who!r} lacks {shown}" + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
                          + f": run `intentd migrate --grant-to {who}`")


async def grant_app_role(conn: asyncpg.Connection, role: str) -> list[str]:
    """Gives ``role`` exactly what the control plane needs and nothing more:
    USAGE on the schema, DML on intentd's tables (SELECT only on the
    read-only ones), USAGE on their sequences. Whatever else it held on
    those tables is revoked first, so the result is exact and re-running it
    (after every upgrade: a new migration's table) is safe. Returns the
    statements run."""
    quoted = await conn.fetchval(Q.quote_ident, role)
    schema = await conn.fetchval(Q.quote_ident, await conn.fetchval(Q.current_schema))
    tables = app_tables()
    statements = [f"GRANT USAGE ON SCHEMA {schema} TO {quoted}"]
    for table in tables:
        name = await conn.fetchval(Q.quote_ident, table)
        privileges = "SELECT" if table in READ_ONLY_TABLES else ", ".join(DML)
        statements += [f"REVOKE ALL ON TABLE {name} FROM {quoted}", f"GRANT {privileges} ON TABLE {name} TO {quoted}"]
    for sequence in [r[0] for r in await conn.fetch(Q.owned_sequences, list(tables))]:
        statements += [f"REVOKE ALL ON SEQUENCE {sequence} FROM {quoted}",
                       f"GRANT USAGE ON SEQUENCE {sequence} TO {quoted}"]
    async with conn.transaction():
        for statement in statements:
            await conn.execute(statement)
    return statements
