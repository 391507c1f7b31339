"""Group commit for the writes of attempts (acks, steps, checkpoints,
completions...).

Writes that arrive while a transaction is being committed wait and go
together into the next one, so under load many streams' writes share one
commit (one WAL flush) instead of paying one each; an idle system commits
each write at once. Every caller gets its answer only after the transaction
holding its write has committed: nothing is acknowledged early.

If one write in a batch raises (a constraint, a deadlock), the batch is
rolled back and each of its writes is retried in a transaction of its own,
so one bad write never fails the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from intentd.server.db import Database, convert_error

log = logging.getLogger("intentd.batcher")


@dataclass
class _Write:
    query: str
    args: Sequence[Any]
    done: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class WriteBatcher:
    def __init__(self, db: Database, *, max_batch: int = 256, workers: int = 4) -> None:
        self.db = db
        self.max_batch = max_batch
        self._queue: list[_Write] = []
        self._wake = asyncio.Event()
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.batches = 0
        self.writes = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"write-batcher-{i}") for i in range(self._workers)]

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        for write in self._queue:
            if not write.done.done():
                write.done.set_exception(convert_error(ConnectionError("server shutting down")) or RuntimeError())
        self._queue.clear()

    async def fetchrow(self, query: str, *args: Any) -> Any:
        """Runs one statement in the next group commit; returns its first row."""
        if self._closed or not self._tasks:
            async with self.db.connection() as conn:
                return await conn.fetchrow(query, *args)
        write = _Write(query, args)
        self._queue.append(write)
        self._wake.set()
        return await write.done

    async def _work(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
            if self._queue:
                self._wake.set()
            await self._commit(batch)

    async def _commit(self, batch: list[_Write]) -> None:
        results: list[Any] = []
        try:
            async with self.db.transaction() as conn:
                for write in batch:
                    results.append(await conn.fetchrow(write.query, *write.args))
        except asyncio.CancelledError:
            for write in batch:
                if not write.done.done():
                    write.done.cancel()
            raise
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0].done.done():
                    batch[0].done.set_exception(exc)
                return
            log.info("a batch of %d writes failed (%s); retrying them one by one", len(batch), type(exc).__name__)
            for write in batch:
                await self._commit([write])
            return
        self.batches += 1
        self.writes += len(batch)
        for write, result in zip(batch, results, strict=True):
            if not write.done.done():
                write.done.set_result(result)
