"""Versioned schema migrations, applied in order under an advisory lock so
that several replicas starting at once apply each migration exactly once."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from intentd.server.queries import Q

log = logging.getLogger("intentd.migrate")

# Any fixed 64-bit number; it names the lock all intentd processes agree on.
MIGRATION_LOCK_KEY = 0x696E74656E7464  # "intentd"
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


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
