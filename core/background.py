"""The one start/stop base for background services (sweepers, dispatchers,
heartbeaters) in every intentd process.

- ``run_once()`` does one round of work; tests call it directly.
- ``start()`` runs it every ``interval`` seconds (or at once after ``wake()``).
- ``stop()`` is idempotent, waits for the current round up to a deadline,
  then cancels it, and runs ``on_stop()`` shielded from cancellation so final
  writes (releasing leases, say) are not cut in half.
- A round that raises is logged with its traceback, counted and kept in
  ``last_error``; the loop backs off and goes on. Nothing is swallowed
  silently: ``health()`` reports the failure streak.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any


class BackgroundService:
    name = "service"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.rounds = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.last_error: BaseException | None = None
        self._log = logging.getLogger(f"intentd.{self.name}")
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    async def run_once(self) -> Any:
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Final work at stop; runs shielded from cancellation."""

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.name} already started")
        self._task = asyncio.create_task(self._loop(), name=self.name)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        self._wake.set()

    def health(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "rounds": self.rounds,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "last_error": repr(self.last_error) if self.last_error else None,
        }

    async def _loop(self) -> None:
        while not self._stopping:
            delay = self.interval
            try:
                again = await self.run_once()
                self.rounds += 1
                self.consecutive_failures = 0
                if again is True:
                    # A full batch: there is probably more; go again at once.
                    delay = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                self.consecutive_failures += 1
                self.last_error = exc
                self._log.exception("%s round failed (%d in a row)", self.name, self.consecutive_failures)
                delay = min(30.0, self.interval * 2 ** min(self.consecutive_failures, 6))
                delay *= 0.5 + random.random() / 2
            if self._stopping:
                break
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()

    async def stop(self, deadline: float = 5.0) -> None:
        if self._stopping:
            if self._task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.shield(self._task)
            return
        self._stopping = True
        self._wake.set()
        task = self._task
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=deadline)
            if not done:
                self._log.warning("%s did not stop within %.1fs; cancelling", self.name, deadline)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            elif not task.cancelled() and task.exception() is not None:
                self._log.error("%s loop died", self.name, exc_info=task.exception())
        await asyncio.shield(self.on_stop())
