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
intents, ``sql/intents.sql``), one array per column of the kind, read by name
from each write's typed parameter object (``Params``), so a batch costs
one round trip, one plan and one event notification per kind instead of one
of each per write. A statement can change a row only once, so a group holds
at most one write per intent; a later write of an intent already in the
group waits for a following group of the same transaction, and the writes
of one intent are applied in the order they arrived, as if run one by one.
A batch that needs a single statement runs without BEGIN/COMMIT: the
statement commits on its own. A write that matched nothing is explained
(``WriteKind.explain``) right after its group, before the next one, so the
caller learns why from the state its write saw, as if it had run alone.

Writes are validated before they get here, so a statement fails only for
what no check could see. When PostgreSQL refuses a batch (a constraint, a
deadlock), nothing of it committed: it is applied again in one transaction
with each statement under a savepoint, and a refused statement is split in
halves under savepoints of their own until the refused writes stand alone.
They get their error; all the others still commit together, once.

When the answer is lost instead (the connection dropped, or the answer could
not be read), the batch may have committed: a one-statement batch commits
with its statement, a transaction may have got as far as its COMMIT. It is
never retried write by write as if nothing had happened. It is applied
again, as a whole and once, and every kind's statement is such that applying
a committed write again changes nothing and is answered from what the
database holds: fenced writes are guarded by their lease and state, so the
repeat matches no row and ``write_diagnoses`` recognises it (the step
recorded, the ack, completion, failure or release of that attempt); a new
intent's insert does nothing when its id is already there, and the caller
reads the row back by id. Checkpoints and progress reports write the same
values again. An emit applied again is a repeat by its seq (the intent's
stream_emit_key): nothing is appended twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Protocol, TypeAlias

import asyncpg

from . import errors
from .db import Database, Row, convert_error

log = logging.getLogger("intentd.batcher")


@dataclass(frozen=True, eq=False)
class WriteKind:
    """A kind of write whose statement applies a group of them at once: it
    takes one array per column and returns a row, carrying the write's
    1-based position in the arrays as ``ord``, for each write that applied."""

    name: str
    query: str
    # Groups of a transaction run in rounds, kinds by rank within a round:
    # ranked in lifecycle order (ack before step before complete), the
    # writes of one intent usually all fit in the first round.
    rank: int
    # The attributes of a write (dotted paths) that are the statement's
    # arrays, in order.
    columns: tuple[str, ...]
    # A set-based query (same conventions) reading why writes matched
    # nothing, from the attributes ``explain_columns``.
    explain: str | None = None
    explain_columns: tuple[str, ...] = ()
    # Attributes whose values are sequences of equal length per write (the
    # chunks of an emit): after the regular arrays the statement gets one
    # array per flat column, every write's values concatenated, then an
    # ``int[]`` naming each element's write by its ord (1-based).
    flat: tuple[str, ...] = ()
    getters: tuple[Callable[[Any], Any], ...] = field(init=False)
    explain_getters: tuple[Callable[[Any], Any], ...] = field(init=False)
    flat_getters: tuple[Callable[[Any], Any], ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "getters", tuple(map(attrgetter, self.columns)))
        object.__setattr__(self, "explain_getters", tuple(map(attrgetter, self.explain_columns)))
        object.__setattr__(self, "flat_getters", tuple(map(attrgetter, self.flat)))


class Params(Protocol):
    """A write's typed parameter object: its kind, the intent it writes
    (which orders the writes of one intent) and an attribute per column."""

    @property
    def kind(self) -> WriteKind: ...

    @property
    def key(self) -> str: ...


# What a write got: its row, or None and what explains that (None when the
# explanation found nothing either, or the write brought no explain arguments).
Outcome: TypeAlias = tuple[Row | None, Row | None]


def _flat_arrays(getters: Sequence[Callable[[Any], Any]], writes: Sequence[Params]) -> list[list[Any]]:
    """The flat columns' arrays, then the owners array (each element's write ord)."""
    if not getters:
        return []
    arrays: list[list[Any]] = [[] for _ in getters]
    owners: list[int] = []
    for ord_, write in enumerate(writes, start=1):
        values = [getter(write) for getter in getters]
        if len({len(v) for v in values}) != 1:
            raise ValueError(f"the flat columns of a {write.kind.name} write differ in length")
        for array, value in zip(arrays, values, strict=True):
            array.extend(value)
        owners.extend([ord_] * len(values[0]))
    return [*arrays, owners]


async def _set_based(
    conn: asyncpg.Connection, query: str, getters: Sequence[Callable[[Any], Any]], writes: Sequence[Params],
    flat_getters: Sequence[Callable[[Any], Any]] = (),
) -> list[Row | None]:
    if not writes:
        return []  # no arrays to send, and nothing to do
    arrays = [list(map(getter, writes)) for getter in getters]
    arrays.extend(_flat_arrays(flat_getters, writes))
    results: list[Row | None] = [None] * len(writes)
    for row in await conn.fetch(query, *arrays):
        results[row["ord"] - 1] = row
    return results


async def apply_group(conn: asyncpg.Connection, kind: WriteKind, writes: Sequence[Params]) -> list[Outcome]:
    """Runs a group of writes of one kind (at most one per intent) as one
    statement, then explains the writes that matched nothing."""
    rows = await _set_based(conn, kind.query, kind.getters, writes, kind.flat_getters)
    whys: list[Row | None] = [None] * len(writes)
    if kind.explain is not None:
        missed = [i for i, row in enumerate(rows) if row is None]
        if missed:
            found = await _set_based(conn, kind.explain, kind.explain_getters, [writes[i] for i in missed])
            for i, why in zip(missed, found, strict=True):
                whys[i] = why
    return list(zip(rows, whys, strict=True))


@dataclass(eq=False)
class _Write:
    params: Params
    done: asyncio.Future[Outcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    result: Outcome = (None, None)
    error: BaseException | None = None  # what PostgreSQL refused this write with, in isolation

    @property
    def kind(self) -> WriteKind:
        return self.params.kind

    @property
    def key(self) -> str:
        return self.params.key


def _cause(exc: BaseException) -> BaseException:
    """The database's own error behind one the db layer converted."""
    if isinstance(exc, errors.ServerError) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def refused(exc: BaseException) -> bool:
    """True when PostgreSQL answered the statement with an error: then nothing
    of the transaction committed. Anything else (a lost connection, an
    answer that could not be read; connection and operator-intervention
    classes 08 and 57 end the session) leaves the outcome in doubt."""
    cause = _cause(exc)
    return isinstance(cause, asyncpg.PostgresError) and str(cause.sqlstate)[:2] not in ("08", "57")


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
        self.isolated = 0  # batches PostgreSQL refused, applied again under savepoints
        self.redone = 0  # batches whose commit was in doubt, applied again
        # Tests only: awaited right after a batch's statements ran (a
        # one-statement batch has committed by then), before the callers get
        # their answers; a fault raised here is an answer lost after the commit.
        self.after_statements: Callable[[asyncpg.Connection, list[_Write]], Awaitable[None]] | None = None

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

    async def write(self, params: Params) -> Outcome:
        """Applies one write in the next group commit; returns its row, or
        None and why."""
        if self._closed or not self._tasks:
            async with self.db.connection() as conn:
                (outcome,) = await apply_group(conn, params.kind, [params])
                return outcome
        write = _Write(params)
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

    async def _commit(self, batch: list[_Write], *, in_doubt_retry: bool = True) -> None:
        steps = plan(batch)
        try:
            if len(steps) == 1:
                async with self.db.connection() as conn:
                    await self._apply(conn, steps[0])
                    await self._after(conn, batch)
            else:
                async with self.db.transaction() as conn:
                    for step in steps:
                        await self._apply(conn, step)
                    await self._after(conn, batch)
        except asyncio.CancelledError:
            self._cancel(batch)
            raise
        except Exception as exc:
            if refused(exc) and len(batch) > 1:
                log.info("a batch of %d writes was refused (%s); isolating the refused ones",
                         len(batch), type(_cause(exc)).__name__)
                await self._isolate(batch)
            elif not refused(exc) and in_doubt_retry:
                log.warning("the commit of a batch of %d writes is in doubt (%s); applying it again",
                            len(batch), type(_cause(exc)).__name__)
                self.redone += 1
                await self._commit(batch, in_doubt_retry=False)
            else:
                self._fail(batch, exc)
            return
        self._answer(batch, len(steps))

    async def _isolate(self, batch: list[_Write]) -> None:
        """Applies a refused batch again in one transaction, each statement
        under a savepoint: the writes PostgreSQL refuses get their error, the
        others commit together."""
        self.isolated += 1
        for write in batch:
            write.error = None
        steps = plan(batch)
        try:
            async with self.db.transaction() as conn:
                for step in steps:
                    await self._apply_isolated(conn, step)
                await self._after(conn, batch)
        except asyncio.CancelledError:
            self._cancel(batch)
            raise
        except Exception as exc:
            if refused(exc):
                self._fail(batch, exc)
                return
            # The COMMIT was in doubt: the writes it held are applied again.
            self._fail([w for w in batch if w.error is not None], None)
            rest = [w for w in batch if w.error is None]
            if rest:
                self.redone += 1
                await self._commit(rest, in_doubt_retry=False)
            return
        self._fail([w for w in batch if w.error is not None], None)
        self._answer([w for w in batch if w.error is None], len(steps))

    async def _apply_isolated(self, conn: asyncpg.Connection, step: list[_Write]) -> None:
        try:
            async with conn.transaction():  # a savepoint
                await self._apply(conn, step)
        except Exception as exc:
            if not refused(exc):
                raise
            if len(step) == 1:
                step[0].error = exc
                return
            # Halves, so k refused writes among n cost about k log n statements.
            half = len(step) // 2
            await self._apply_isolated(conn, step[:half])
            await self._apply_isolated(conn, step[half:])

    async def _after(self, conn: asyncpg.Connection, batch: list[_Write]) -> None:
        if self.after_statements is not None:
            await self.after_statements(conn, batch)

    def _answer(self, batch: list[_Write], statements: int) -> None:
        self.batches += 1
        self.writes += len(batch)
        self.statements += statements
        for write in batch:
            if not write.done.done():
                write.done.set_result(write.result)

    @staticmethod
    def _fail(batch: list[_Write], exc: BaseException | None) -> None:
        """Each write gets its own error if it has one, else ``exc``."""
        for write in batch:
            error = write.error or exc
            if error is not None and not write.done.done():
                write.done.set_exception(convert_error(error) or error)

    @staticmethod
    def _cancel(batch: list[_Write]) -> None:
        for write in batch:
            if not write.done.done():
                write.done.cancel()

    @staticmethod
    async def _apply(conn: asyncpg.Connection, step: list[_Write]) -> None:
        outcomes = await apply_group(conn, step[0].kind, [w.params for w in step])
        for write, outcome in zip(step, outcomes, strict=True):
            write.result = outcome
