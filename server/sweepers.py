"""Sweepers: idempotent, safe to run in every replica at once (rows another
replica is sweeping are skipped with SKIP LOCKED, not waited for)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

from intentd.core.background import BackgroundService
from intentd.core.observability import metrics

from .children import ChildStore
from .chunks import ChunkStore
from .db import Database
from .hub import NotificationHub
from .leases import LeaseStore
from .queries import Q
from .store import IntentStore
from .waits import WaitStore

log = logging.getLogger("intentd.sweeper")

# How soon the child sweeper tries again the notices of parents it found locked.
SKIPPED_RETRY_S = 0.005


class DeadlineSweeper(BackgroundService):
    """Moves live intents past their deadline to TIMED_OUT."""

    name = "deadline-sweeper"

    def __init__(self, store: IntentStore, interval: float, batch: int = 500) -> None:
        super().__init__(interval)
        self.store = store
        self.batch = batch
        self.timed_out = 0

    async def run_once(self, now: datetime | None = None) -> bool:
        rows = await self.store.expire_deadlines(now, self.batch)
        metrics.sweeper_succeeded(self.name)
        self.timed_out += len(rows)
        for row in rows:
            metrics.observe_end_to_end("TIMED_OUT", float(row["age_s"]))
        if rows:
            log.info("timed out %d intents", len(rows))
        return len(rows) == self.batch


class LeaseSweeper(BackgroundService):
    """Returns intents whose lease lapsed to PENDING (or FAILED when their
    attempts are spent)."""

    name = "lease-sweeper"

    def __init__(self, leases: LeaseStore, interval: float, hold_after_outage: float, batch: int = 500) -> None:
        super().__init__(interval)
        self.leases = leases
        self.batch = batch
        self.hold_after_outage = hold_after_outage
        self.expired = 0
        # Set while this replica recovers from losing PostgreSQL: since when
        # it can reach it again (None: not yet).
        self._recovering: bool = False
        self._back_since: float | None = None

    async def run_once(self, now: datetime | None = None) -> bool:
        try:
            if self._recovering and now is None:
                await self.leases.ping()
                if self._back_since is None:
                    self._back_since = time.monotonic()
                if time.monotonic() - self._back_since < self.hold_after_outage:
                    # The streams it serves could not renew their leases while
                    # PostgreSQL was away: give them a heartbeat timeout to do so.
                    metrics.sweeper_succeeded(self.name)
                    return False
                self._recovering = False
            rows = await self.leases.expire(now, self.batch)
        except Exception:
            self._recovering = True
            self._back_since = None
            raise
        metrics.sweeper_succeeded(self.name)
        self.expired += len(rows)
        for row in rows:
            if row["state"] == "PENDING":
                metrics.record_redelivery(metrics.LEASE_EXPIRED)
            else:
                metrics.ATTEMPTS_EXHAUSTED.inc()
                metrics.observe_end_to_end("FAILED", float(row["age_s"]))
            log.info("lease of %s attempt %d expired -> %s", row["id"], row["attempt"], row["state"])
        return len(rows) == self.batch


class IntentCounter(BackgroundService):
    """Counts live intents by state and type for the intentd_intents gauge,
    so scrapes never touch the database."""

    name = "intent-counter"

    def __init__(self, db: Database, interval: float = 5.0) -> None:
        super().__init__(interval)
        self.db = db

    async def run_once(self) -> None:
        async with self.db.connection() as conn:
            rows = await conn.fetch(Q.intent_counts)
        metrics.INTENTS.update([(r["state"], r["intent_type"], r["count"]) for r in rows])
        metrics.sweeper_succeeded(self.name)


class RetentionSweeper(BackgroundService):
    """Deletes terminal intents (with their events and steps) once they are
    older than the retention period, so the tables do not grow without bound."""

    name = "retention-sweeper"

    def __init__(self, store: IntentStore, retention_s: float, interval: float = 60.0, batch: int = 1000) -> None:
        super().__init__(interval)
        self.store = store
        self.retention_s = retention_s
        self.batch = batch
        self.deleted = 0

    async def run_once(self, now: datetime | None = None) -> bool:
        deleted = await self.store.delete_finished(self.retention_s, now, self.batch)
        metrics.sweeper_succeeded(self.name)
        self.deleted += deleted
        if deleted:
            log.info("retention: deleted %d finished intents", deleted)
        return deleted == self.batch


class WaitSweeper(BackgroundService):
    """Fires the due waits of parked intents (a sleep ended, a wait timed
    out: the intent is PENDING again) and reminds open human tasks past
    their reminder. Its first round runs at start, so a timer that came due
    while no replica ran fires at once."""

    name = "wait-sweeper"

    def __init__(self, waits: WaitStore, interval: float, batch: int = 500) -> None:
        super().__init__(interval)
        self.waits = waits
        self.batch = batch
        self.fired = 0
        self.reminded = 0

    async def run_once(self, now: datetime | None = None) -> bool:
        fired = await self.waits.fire_due(now, self.batch)
        reminded = await self.waits.remind_due(now, self.batch)
        metrics.sweeper_succeeded(self.name)
        self.fired += len(fired)
        self.reminded += len(reminded)
        if fired:
            log.info("fired %d durable timers", len(fired))
        return len(fired) == self.batch or len(reminded) == self.batch


class ChildSweeper(BackgroundService):
    """Applies child notices (server/children.py): CHILD_FINISHED events,
    AGENT waits their children satisfied (the parent woken once), the
    cascade of a parent's end to its live children. Woken by the database's
    notification of a new notice, in every replica (rows another replica
    holds are skipped); its interval is only the fallback."""

    name = "child-sweeper"

    def __init__(self, children: ChildStore, hub: NotificationHub, interval: float, batch: int = 500) -> None:
        super().__init__(interval)
        self.children = children
        self.batch = batch
        self.woken = 0
        self.canceled = 0
        self._unsubscribe = hub.on_children(self.wake)

    async def run_once(self, now: datetime | None = None) -> bool:
        done = await self.children.sweep(self.batch, now)
        metrics.sweeper_succeeded(self.name)
        self.woken += done.woken
        self.canceled += done.canceled
        if done.canceled:
            log.info("canceled %d children of ended parents", done.canceled)
        if done.skipped and not done.more:
            # Their parents were locked for a moment (a write of theirs): soon
            # again, not at the fallback interval, since a parent may be waiting.
            await asyncio.sleep(SKIPPED_RETRY_S)
            return True
        return done.more

    async def on_stop(self) -> None:
        self._unsubscribe()


class StreamPruner(BackgroundService):
    """Deletes the entries of streams their intent type keeps only a while
    after the intent's end (stream_keep_ms); the heads stay, marked pruned.
    Streams without a keep time leave with their intent (retention)."""

    name = "stream-pruner"

    def __init__(self, chunks: ChunkStore, interval: float, batch: int = 500) -> None:
        super().__init__(interval)
        self.chunks = chunks
        self.batch = batch
        self.pruned = 0

    async def run_once(self, now: datetime | None = None) -> bool:
        pruned = await self.chunks.prune(now, self.batch)
        metrics.sweeper_succeeded(self.name)
        self.pruned += pruned
        if pruned:
            log.info("pruned the entries of %d streams", pruned)
        return pruned == self.batch
