"""The database layer: the asyncpg pool, and the one place where asyncpg
errors become control-plane errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, TypeAlias

import asyncpg

from . import errors
from .migrate import ensure_schema

log = logging.getLogger("intentd.db")

# asyncpg ships no type information; a record reads like a mapping.
Row: TypeAlias = Mapping[str, Any]

# Errors that mean "the database is not reachable right now": the call is
# safe to retry and the client is told UNAVAILABLE.
_UNAVAILABLE = (
    OSError,
    ConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    # asyncpg issue #1069: a pooled connection used after PostgreSQL's FATAL for
    # a terminated backend arrived but before the close was processed.
    asyncpg.exceptions.InternalClientError,
    # A standby not yet promoted (a session that reached it during a
    # failover): the writable node is coming; retry.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)


def convert_error(exc: BaseException) -> errors.ServerError | None:
    """Maps an asyncpg (or socket) error to a ServerError; None if it is a bug.

    What PostgreSQL says (its message, DETAIL with other rows' keys, the
    names of constraints) is logged here and never sent to a client: the
    statement may have been shared with other tenants' writes."""
    if isinstance(exc, errors.ServerError):
        return exc
    if isinstance(exc, _UNAVAILABLE) or isinstance(exc, TimeoutError):
        return errors.Unavailable(f"database unavailable: {type(exc).__name__}")
    if isinstance(exc, asyncpg.exceptions.SerializationError | asyncpg.exceptions.DeadlockDetectedError):
        return errors.Unavailable("transaction conflict; retry")
    mapped: errors.ServerError | None = None
    if isinstance(exc, asyncpg.exceptions.CheckViolationError):
        # The transition trigger or a row invariant refused the change.
        mapped = errors.FailedPrecondition("the change breaks an invariant of the intent; it was not made")
    elif isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        mapped = errors.AlreadyExists("the record already exists")
    elif isinstance(exc, asyncpg.exceptions.DataError | asyncpg.exceptions.InvalidTextRepresentationError):
        mapped = errors.InvalidArgument("a value is out of range or cannot be stored")
    elif isinstance(exc, asyncpg.exceptions.ProgramLimitExceededError):
        mapped = errors.ResourceExhausted("a value is too large to store")
    if mapped is not None:
        log.warning("database refused a statement: %s: %s", type(exc).__name__, exc)
    return mapped


@contextlib.contextmanager
def converted() -> Iterator[None]:
    """Re-raises asyncpg errors as ServerErrors (bugs pass through as they are)."""
    try:
        yield
    except errors.ServerError:
        raise
    except Exception as exc:
        mapped = convert_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


async def _no_reset(conn: asyncpg.Connection) -> None:
    return None


async def _init_connection(conn: asyncpg.Connection) -> None:
    # JSON travels as text end to end: the server never decodes payloads or
    # results, it hands PostgreSQL's normalised text back to clients.
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=str, decoder=str, schema="pg_catalog", format="text")


class Database:
    """An asyncpg pool with the intentd connection set-up."""

    def __init__(
        self, url: str, *, min_size: int = 2, max_size: int = 10, application_name: str = "intentd",
        acquire_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.application_name = application_name
        self.acquire_timeout = acquire_timeout
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("Database.open() was not called")
        return self._pool

    async def open(self, *, run_migrations: bool = True, migrate_mode: str = "auto",
                   migration_url: str | None = None) -> None:
        """``run_migrations=False`` skips the schema step; otherwise see
        ``ensure_schema`` (``migrate_mode`` is INTENTD_MIGRATE)."""
        with converted():
            if run_migrations:
                conn = await asyncpg.connect(self.url)
                migration_conn = None
                try:
                    if migration_url is not None and migrate_mode != "false":
                        migration_conn = await asyncpg.connect(migration_url)
                    await ensure_schema(conn, migrate_mode, migration_conn)
                finally:
                    await conn.close()
                    if migration_conn is not None:
                        await migration_conn.close()
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self._min_size,
                max_size=self._max_size,
                init=_init_connection,
                # Names this replica's sessions in pg_stat_activity (and lets an
                # operator, or the chaos harness, drop exactly them).
                server_settings={"application_name": self.application_name},
                # asyncpg resets every connection on release (a round trip and a
                # transaction each time). intentd leaves no session state behind:
                # no LISTEN on pooled connections, transaction-scoped locks only.
                reset=_no_reset,
                # Statements are prepared once per connection and reused.
                max_inactive_connection_lifetime=300,
                command_timeout=30,
            )

    async def close(self, timeout: float = 10.0) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout)
            except TimeoutError:
                log.warning("pool did not close within %.1fs; terminating connections", timeout)
                pool.terminate()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        with converted():
            # A bounded wait: with PostgreSQL down or every connection busy,
            # callers get UNAVAILABLE instead of hanging.
            async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        with converted():
            async with self.pool.acquire(timeout=self.acquire_timeout) as conn, conn.transaction():
                yield conn
