"""``IntentdEnvironment``: a control plane and real sidecar processes for a
user's own agent tests.

The control plane runs in this process, on its own event loop in a thread, so
one environment serves async and sync tests and any number of event loops (a
session-scoped fixture). Its database is, in this order: a fresh database made
on ``database_url``, or on ``INTENTD_TEST_DATABASE_URL``, and dropped at the
end; else an embedded PostgreSQL in a temporary folder, deleted at the end.
Each agent gets one real sidecar process supervising it
(``python -m intentd.commands sidecar --exec "python -m intentd.testing.runner
module:attribute"``); it restarts the agent when it dies, as in production.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shlex
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

if importlib.util.find_spec("asyncpg") is None:  # the plain install is the SDK only
    raise ImportError("intentd.testing starts a control plane: pip install 'intentd[testing]'")

from intentd.client import AsyncIntentClient, Intent, IntentError, IntentState, Step, WaitTimeout
from intentd.server.settings import ServerSettings

from .control_plane import ControlPlaneThread
from .processes import ChildProcess
from .report import DIR_ENV, RUN_LABEL, StepRun, read_steps, write_kill_plan
from .runner import load_agent

DATABASE_ENV = "INTENTD_TEST_DATABASE_URL"
# Quick to notice and redeliver, so a test spends its time in the agent.
_FAST = {
    "listen": "127.0.0.1:0",
    "auth": "off",
    "pool_min_size": 1,
    "pool_max_size": 4,
    "ping_interval_ms": 200,
    "heartbeat_timeout_ms": 2000,
    "ack_timeout_ms": 2000,
    "sweep_interval_s": 0.2,
    "dispatch_catchup_s": 0.5,
    "shutdown_grace_s": 1.0,
    "log_level": "WARNING",
}


@dataclass(frozen=True)
class Run:
    """One intent run to its end: what the control plane recorded and what
    the agent really executed."""

    intent_id: str
    state: IntentState
    # Deliveries the intent took (1 when nothing failed or died).
    attempts: int
    result: Any
    error: IntentError | None
    # The final intent, as the client reads it.
    intent: Intent
    # The recorded steps, by index, as ListIntentSteps returns them.
    steps: list[Step]
    # Every call of a step function, in order, over all attempts.
    executions: list[StepRun]

    @classmethod
    def of(cls, intent: Intent, steps: list[Step], executions: list[StepRun]) -> Run:
        return cls(intent.id, intent.state, intent.attempt, intent.result, intent.error, intent, steps, executions)

    @property
    def recorded_steps(self) -> list[str]:
        """The names of the recorded steps, in order."""
        return [step.name for step in self.steps]

    def steps_run(self, name: str | None = None, attempt: int | None = None) -> int:
        """How many times step functions ran: of the step ``name`` (every step
        when None), in ``attempt`` (every attempt when None)."""
        return sum(1 for e in self.executions
                   if (name is None or e.name == name) and (attempt is None or e.attempt == attempt))


class _Sidecar(ChildProcess):
    """A real sidecar process supervising the runner of one agent."""

    def __init__(self, spec: str, folder: Path, server: str, number: int) -> None:
        super().__init__(folder / f"sidecar-{number}.log")
        agent = load_agent(spec)
        self.address = agent.name
        runner = shlex.join([sys.executable, "-m", "intentd.testing.runner", spec])
        command = [sys.executable, "-m", "intentd.commands", "sidecar", "--server", server,
                   "--address", self.address, "--capacity", str(agent.capacity), "--drain-grace", "1",
                   "--listen", f"unix://{folder}/sidecar-{number}.sock", "--exec", runner]
        self.launch(command, _child_environment(folder))


def _child_environment(folder: Path) -> dict[str, str]:
    """Added to the test process's environment: its own import path (not the
    interpreter's) so the runner imports the user's modules as the test does."""
    interpreter = (sys.prefix, sys.base_prefix, sys.exec_prefix)
    own = [p for p in (os.getcwd(), *sys.path) if p and not p.startswith(interpreter) and Path(p).is_dir()]
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {DIR_ENV: str(folder), "PYTHONPATH": os.pathsep.join(dict.fromkeys(own + inherited))}


class IntentdEnvironment:
    """A control plane and a sidecar per agent, for testing agents with real
    processes. Start it with ``async with IntentdEnvironment.start() as env``
    (or ``with``), then ``await env.run(...)``."""

    def __init__(self, folder: Path, data_dir: Path, plane: ControlPlaneThread) -> None:
        self.folder = folder
        self._data_dir = data_dir
        self._plane = plane
        self._sidecars: dict[str, _Sidecar] = {}
        self._lock = threading.Lock()

    @classmethod
    def start(
        cls,
        *,
        database_url: str | None = None,
        server_options: Mapping[str, Any] | None = None,
        startup_timeout: float = 120.0,
    ) -> _Starting:
        """A context manager (``async with`` or ``with``) giving a running
        environment and stopping everything at its end. ``database_url`` names
        a PostgreSQL server on which a fresh database is made and dropped
        (default: ``INTENTD_TEST_DATABASE_URL``, else an embedded PostgreSQL);
        ``server_options`` overrides fields of ``ServerSettings``."""
        return _Starting(cls, database_url or os.environ.get(DATABASE_ENV) or None,
                         dict(server_options or {}), startup_timeout)

    @classmethod
    def _open(cls, admin_url: str | None, options: dict[str, Any], startup_timeout: float) -> Self:
        folder = Path(tempfile.mkdtemp(prefix="intentd-testing-"))
        # Its own temporary folder: as root the embedded PostgreSQL owns it, and
        # its parent (the temporary folder) is world-traversable already.
        data_dir = Path(tempfile.mkdtemp(prefix="intentd-testing-pg-"))
        env = cls(folder, data_dir, ControlPlaneThread(
            replace(ServerSettings(data_dir=data_dir), **{**_FAST, **options}), admin_url))
        try:
            env._plane.start(startup_timeout)
        except BaseException:
            env.close()
            raise
        return env

    @property
    def address(self) -> str:
        """The control plane's HOST:PORT, for your own clients."""
        return self._plane.address

    def client(self) -> AsyncIntentClient:
        """An asyncio client of the control plane, for the running event loop."""
        return AsyncIntentClient(self.address)

    def sidecar(self, agent: str) -> str:
        """Starts (once) the sidecar supervising ``agent`` (``module:attribute``)
        and returns the agent's address."""
        with self._lock:
            if agent not in self._sidecars:
                self._sidecars[agent] = _Sidecar(agent, self.folder, self.address, len(self._sidecars))
            return self._sidecars[agent].address

    def logs(self) -> str:
        """The sidecars' output (their agents' too), for a failing test's report."""
        return "\n".join(f"--- {spec}\n{sidecar.log()}" for spec, sidecar in self._sidecars.items())

    async def run(
        self,
        agent: str,
        intent_type: str,
        payload: Any = None,
        *,
        kill_at_step: int | None = None,
        timeout: float = 60.0,
        **intent: Any,
    ) -> Run:
        """Sends one intent to ``agent`` (``module:attribute`` of an
        ``intentd.agent.Agent``) and waits until it is terminal.

        ``kill_at_step=k`` SIGKILLs the agent process on the intent's first
        attempt right after step k's function returned, before its result is
        recorded; the sidecar restarts the agent and attempt 2 replays steps
        1..k-1 and runs step k again. Other keywords (``max_attempts``,
        ``deadline``, ``labels``, ...) go to ``send_intent``.
        """
        if kill_at_step is not None and (not isinstance(kill_at_step, int) or kill_at_step < 1):
            raise ValueError(f"kill_at_step must be a step number from 1, got {kill_at_step!r}")
        address = self.sidecar(agent)
        run = uuid.uuid4().hex
        if kill_at_step is not None:
            write_kill_plan(self.folder, run, kill_at_step)
        labels = {**intent.pop("labels", {}), RUN_LABEL: run}
        async with self.client() as client:
            intent_id = await client.send_intent(intent_type=intent_type, to_agent=address, payload=payload,
                                                 labels=labels, **intent)
            try:
                final = await client.wait_for(intent_id, timeout=timeout)
            except WaitTimeout:
                raise TimeoutError(f"intent {intent_id} was not terminal after {timeout}s:\n{self.logs()}") from None
            steps = await client.steps(intent_id)
        return Run.of(final, steps, read_steps(self.folder, intent_id))

    def close(self) -> None:
        for sidecar in self._sidecars.values():
            sidecar.stop(grace=10)
        self._plane.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
        shutil.rmtree(self._data_dir, ignore_errors=True)


class _Starting:
    def __init__(self, kind: type[IntentdEnvironment], admin_url: str | None, options: dict[str, Any],
                 startup_timeout: float) -> None:
        self._args = (admin_url, options, startup_timeout)
        self._kind = kind
        self._env: IntentdEnvironment | None = None

    def __enter__(self) -> IntentdEnvironment:
        self._env = self._kind._open(*self._args)
        return self._env

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._env is not None:
            self._env.close()

    async def __aenter__(self) -> IntentdEnvironment:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.__exit__, kind, exc, tb)
