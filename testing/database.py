"""The PostgreSQL plumbing shared by the harness, our own tests, the bench
and the chaos soak: the URL of another database on the same server, and one
short-lived connection (CREATE / DROP DATABASE, a read on the admin database)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg


def with_database(url: str, name: str) -> str:
    """``url`` (a PostgreSQL URL) naming the database ``name`` instead."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def connection(url: str, timeout: float = 10.0) -> AsyncIterator[asyncpg.Connection]:
    """One connection to ``url``, closed at the end of the block."""
    conn = await asyncpg.connect(url, timeout=timeout)
    try:
        yield conn
    finally:
        await conn.close()


async def execute(url: str, statement: str) -> None:
    """One statement on a connection of its own (CREATE / DROP DATABASE)."""
    async with connection(url) as conn:
        await conn.execute(statement)
