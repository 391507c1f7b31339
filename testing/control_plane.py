"""The control plane on an event loop of its own, in a thread: one instance
serves async tests on any event loop and sync tests alike. The harness's
environment runs on it, and so does our own suite (tests/support.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any, Self

from intentd.server.app import ControlPlane
from intentd.server.settings import ServerSettings

from .database import execute, with_database


class ControlPlaneThread:
    """``ControlPlaneThread(settings).start()``; with ``admin_url`` it runs on a
    fresh database made there, dropped when it stops."""

    def __init__(self, settings: ServerSettings, admin_url: str | None = None) -> None:
        settings.validate()
        # With ``admin_url``, its database_url is the fresh database's once started.
        self.settings = settings
        self._admin_url = admin_url
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._plane: ControlPlane | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True,
                                        name="intentd-control-plane")

    def start(self, timeout: float = 60.0) -> Self:
        """Returns once it serves; raises what kept it from starting."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the control plane did not start within {timeout}s")
        if self._error is not None:
            raise self._error
        return self

    @property
    def plane(self) -> ControlPlane:
        """The running control plane, for tests that look inside."""
        if self._plane is None:
            raise RuntimeError("the control plane is not started")
        return self._plane

    @property
    def address(self) -> str:
        """HOST:PORT it listens on."""
        return self.plane.address

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Runs ``coro`` on the control plane's event loop and returns its result."""
        if self._loop is None:
            raise RuntimeError("the control plane is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        """Stops the control plane (and drops its fresh database); a no-op once stopped."""
        if not self._thread.is_alive():
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop ended meanwhile
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        name = f"intentd_testing_{uuid.uuid4().hex[:12]}"
        try:
            if self._admin_url is not None:
                await execute(self._admin_url, f'CREATE DATABASE "{name}"')
                self.settings = replace(self.settings, database_url=with_database(self._admin_url, name))
            plane = ControlPlane(self.settings)
            await plane.start()
        except BaseException as exc:  # handed to start()
            self._error = exc
            self._ready.set()
            return
        self._plane = plane
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await plane.stop(grace=1.0)
            if self._admin_url is not None:
                await execute(self._admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
