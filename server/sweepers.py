"""Sweepers: idempotent, safe to run in every replica at once (rows another
replica is sweeping are skipped with SKIP LOCKED, not waited for)."""

from __future__ import annotations

import logging
from datetime import datetime

from intentd.server.leases import LeaseStore
from intentd.server.store import IntentStore
from intentd.service import BackgroundService

log = logging.getLogger("intentd.sweeper")


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
        self.timed_out += len(rows)
        if rows:
            log.info("timed out %d intents", len(rows))
        return len(rows) == self.batch


class LeaseSweeper(BackgroundService):
    """Returns intents whose lease lapsed to PENDING (or FAILED when their
    attempts are spent)."""

    name = "lease-sweeper"

    def __init__(self, leases: LeaseStore, interval: float, batch: int = 500) -> None:
        super().__init__(interval)
        self.leases = leases
        self.batch = batch
        self.expired = 0

    async def run_once(self, now: datetime | None = None) -> bool:
        rows = await self.leases.expire(now, self.batch)
        self.expired += len(rows)
        for row in rows:
            log.info("lease of %s attempt %d expired -> %s", row["id"], row["attempt"], row["state"])
        return len(rows) == self.batch
