"""Runs the agent command beside the sidecar and restarts it when it exits.

The agent finds the sidecar through ``INTENTD_SIDECAR_ADDRESS`` and inherits
the sidecar's environment except its credentials (``WITHHELD_FROM_AGENT``). A crash
needs no special handling here: the agent's Attach stream ends with it and
the sidecar releases its intents at once; this only brings the agent back,
backing off while it keeps crashing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping, Sequence

from intentd.core.backoff import Backoff
from intentd.core.observability import metrics

from .settings import WITHHELD_FROM_AGENT

log = logging.getLogger("intentd.sidecar.supervisor")

ADDRESS_ENV = "INTENTD_SIDECAR_ADDRESS"


class AgentSupervisor:
    def __init__(
        self,
        argv: Sequence[str],
        address: str,
        *,
        stop_grace_s: float = 10.0,
        min_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        reset_after_s: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not argv:
            raise ValueError("an agent command is required")
        self.argv = list(argv)
        inherited = os.environ if env is None else env
        self.env = {**{k: v for k, v in inherited.items() if k not in WITHHELD_FROM_AGENT}, ADDRESS_ENV: address}
        self.stop_grace_s = stop_grace_s
        self.backoff = Backoff(min_backoff_s, max_backoff_s)
        self.reset_after_s = reset_after_s
        self.restarts = 0
        self.starts = 0
        self.last_exit: int | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.started = asyncio.Event()

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def health(self) -> dict[str, object]:
        return {"pid": self.pid, "starts": self.starts, "restarts": self.restarts, "last_exit": self.last_exit}

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("supervisor already started")
        self._task = asyncio.create_task(self._run(), name="agent-supervisor")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        crashes = 0
        while not self._stopping.is_set():
            began = loop.time()
            await self._run_once()
            if self._stopping.is_set():
                return
            if loop.time() - began >= self.reset_after_s:
                crashes = 0
            # One process to bring back, no crowd to spread: no jitter.
            backoff = self.backoff.ceiling(crashes)
            log.warning("agent exited (%s); restarting in %.1fs", _describe_exit(self.last_exit), backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            if self._stopping.is_set():
                return
            crashes += 1
            self.restarts += 1
            metrics.SIDECAR_AGENT_RESTARTS.inc()

    async def _run_once(self) -> None:
        try:
            process = await asyncio.create_subprocess_exec(*self.argv, env=self.env)
        except OSError as exc:
            log.error("cannot start agent %r: %s", self.argv[0], exc)
            self.last_exit = None
            return
        self._process = process
        self.starts += 1
        self.started.set()
        log.info("agent started (pid %d): %s", process.pid, " ".join(self.argv))
        exited = asyncio.ensure_future(process.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # No time for a grace: never leave the agent running unsupervised.
            _signal(process, signal.SIGKILL)
            raise
        finally:
            stopping.cancel()
        if not exited.done():
            # The loop, not stop(), ends the agent: no start can race a stop.
            await self._terminate(process)
        self.last_exit = await exited

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        log.info("stopping agent (pid %d), SIGKILL in %.1fs", process.pid, self.stop_grace_s)
        _signal(process, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), self.stop_grace_s)
        except TimeoutError:
            log.warning("agent (pid %d) ignored SIGTERM for %.1fs; killing it", process.pid, self.stop_grace_s)
            _signal(process, signal.SIGKILL)
            await process.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace; returns once the agent is gone."""
        self._stopping.set()
        if self._task is not None:
            await self._task


def _signal(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not start"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
