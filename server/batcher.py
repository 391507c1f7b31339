"""Group commit for the writes of attempts (acks, steps, checkpoints,
completions...) and for single sends of new intents.

Writes that arrive while a transaction is being committed wait and go
together into the next one, so under load many streams' writes share one
commit (one WAL flush) instead of paying one each; an idle system commits
each write at once. Every caller gets its answer only after the transaction
holding its write has committed: nothing is acknowledged early.

Inside a transaction the writes are set-based: the writes of one kind (all
the acks, all the steps...) go to PostgreSQL as one statement over arrays
(``WriteKind``; the statements are in ``sql/leases.sql`` and, for new
intents, ``sql/intents.sql``), so a batch costs
one round trip, one plan and one event notification per kind instead of one
of each per write. A statement can change a row only once, so a group holds
at most one write per intent; a later write of an intent already in the
group waits for a following group of the same transaction, and the writes
of one intent are applied in the order they arrived, as if run one by one.
A batch that needs a single statement runs without BEGIN/COMMIT: the
statement commits on its own. A write that matched nothing is explained
(``WriteKind.explain``) right after its group, before the next one, so the
caller learns why from the state its write saw, as if it had run alone.

If one write in a batch raises (a constraint, a deadlock), the batch is
rolled back and each of its writes is retried in a transaction of its own,
so one bad write never fails the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import asyncpg

from intentd.server.db import Database, Row, convert_error

log = logging.getLogger("intentd.batcher")


@dataclass(frozen=True, eq=False)
class WriteKind:
    """A kind of write whose statement applies a group of them at once: it
    takes one array per argument and returns a row, carrying the write's
    1-based position in the arrays as ``ord``, for each write that applied."""

    name: str
    query: str
    # Groups of a transaction run in rounds, kinds by rank within a round:
    # ranked in lifecycle order (ack before step before complete), the
    # writes of one intent usually all fit in the first round.
    rank: int
    # A set-based query (same conventions) reading why writes matched
    # nothing; each write brings its own arguments for it.
    explain: str | None = None


# What a write got: its row, or None and what explains that (None when the
# explanation found nothing either, or the write brought no explain arguments).
Outcome: TypeAlias = tuple[Row | None, Row | None]


async def _set_based(conn: asyncpg.Connection, query: str, args: Sequence[Sequence[Any]]) -> list[Row | None]:
    if not args:
        return []  # no arrays to send (zip of nothing), and nothing to do
    columns = [list(column) for column in zip(*args, strict=True)]
    results: list[Row | None] = [None] * len(args)
    for row in await conn.fetch(query, *columns):
        results[row["ord"] - 1] = row
    return results


async def apply_group(
    conn: asyncpg.Connection, kind: WriteKind, args: Sequence[Sequence[Any]],
    explain_args: Sequence[Sequence[Any] | None] | None = None,
) -> list[Outcome]:
    """Runs a group of writes of one kind (at most one per intent) as one
    statement, then explains the writes that matched nothing."""
    rows = await _set_based(conn, kind.query, args)
    whys: list[Row | None] = [None] * len(args)
    if kind.explain is not None and explain_args is not None:
        missed = [i for i, row in enumerate(rows) if row is None and explain_args[i] is not None]
        if missed:
            found = await _set_based(conn, kind.explain, [explain_args[i] or () for i in missed])
            for i, why in zip(missed, found, strict=True):
                whys[i] = why
    return list(zip(rows, whys, strict=True))


@dataclass(eq=False)
class _Write:
    kind: WriteKind
    key: str  # the intent written; orders the writes of one intent
    args: Sequence[Any]
    explain_args: Sequence[Any] | None = None
    done: asyncio.Future[Outcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    result: Outcome = (None, None)


def plan(batch: Sequence[_Write]) -> list[list[_Write]]:
    """The statements of a batch, in order: each a list of writes of one kind
    and at most one write per intent."""
    steps: list[list[_Write]] = []
    queues: dict[str, deque[_Write]] = {}
    for write in batch:
        queues.setdefault(write.key, deque()).append(write)
    kinds = sorted({w.kind for w in batch}, key=lambda k: k.rank)
    while queues:
        for kind in kinds:
            group = [q[0] for q in queues.values() if q[0].kind is kind]
            if not group:
                continue
            steps.append(group)
            for write in group:
                queue = queues[write.key]
                queue.popleft()
                if not queue:
                    del queues[write.key]
    return steps


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
        self.statements = 0

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

    async def write(
        self, kind: WriteKind, intent_id: str, args: Sequence[Any], explain_args: Sequence[Any] | None = None
    ) -> Outcome:
        """Applies one write of ``kind`` to an intent in the next group
        commit; returns its row, or None and why."""
        if self._closed or not self._tasks:
            async with self.db.connection() as conn:
                (outcome,) = await apply_group(conn, kind, [args], [explain_args])
                return outcome
        write = _Write(kind, intent_id, args, explain_args)
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
        steps = plan(batch)
        try:
            if len(steps) == 1:
                async with self.db.connection() as conn:
                    await self._apply(conn, steps[0])
            else:
                async with self.db.transaction() as conn:
                    for step in steps:
                        await self._apply(conn, step)
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
        self.statements += len(steps)
        for write in batch:
            if not write.done.done():
                write.done.set_result(write.result)

    @staticmethod
    async def _apply(conn: asyncpg.Connection, step: list[_Write]) -> None:
        outcomes = await apply_group(conn, step[0].kind, [w.args for w in step], [w.explain_args for w in step])
        for write, outcome in zip(step, outcomes, strict=True):
            write.result = outcome
