"""A blocking face on asyncpg for the harness: one connection on a private
event loop, re-opened after PostgreSQL restarts or drops it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg

from intentd.testing.database import execute

T = TypeVar("T")
APPLICATION_NAME = "intentd-chaos-harness"
_RETRYABLE = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
              asyncpg.AdminShutdownError, TimeoutError, ConnectionError)


class SyncDb:
    def __init__(self, url: str) -> None:
        self.url = url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-db", daemon=True)
        self._thread.start()
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout + 5)

    async def _call(self, method: str, query: str, args: tuple[Any, ...], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        delay = 0.05
        async with self._lock:
            while True:
                try:
                    if self._conn is None or self._conn.is_closed():
                        self._conn = await asyncpg.connect(
                            self.url, timeout=min(5.0, max(0.5, deadline - time.monotonic())),
                            server_settings={"application_name": APPLICATION_NAME})
                    return await getattr(self._conn, method)(query, *args,
                                                             timeout=max(0.5, deadline - time.monotonic()))
                except _RETRYABLE:
                    if self._conn is not None:
                        self._conn.terminate()
                        self._conn = None
                    if time.monotonic() + delay >= deadline:
                        raise
                    await asyncio.sleep(delay)
                    delay = min(1.0, delay * 2)

    def fetch(self, query: str, *args: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
        rows = self._run(self._call("fetch", query, args, timeout), timeout)
        return [dict(r) for r in rows]

    def fetchval(self, query: str, *args: Any, timeout: float = 30.0) -> Any:
        return self._run(self._call("fetchval", query, args, timeout), timeout)

    def execute(self, query: str, *args: Any, timeout: float = 30.0) -> str:
        return str(self._run(self._call("execute", query, args, timeout), timeout))

    def close(self) -> None:
        async def shut() -> None:
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None

        try:
            self._run(shut(), 5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._loop.is_running():
                self._loop.close()


def admin_execute(url: str, statement: str) -> None:
    """One statement on a fresh connection (CREATE / DROP DATABASE)."""
    asyncio.run(execute(url, statement))
