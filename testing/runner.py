"""``python -m intentd.testing.runner module:attribute``: runs a user's ``Agent``
under the sidecar, each handler wrapped so that the environment learns which
steps really ran and can kill the agent at a chosen step.

A step counts as run when its function is called (a replayed step's function
is not). With a kill plan of step k for a run, the agent SIGKILLs itself on the
run's first attempt right after step k's function returned and before its
result is recorded: steps 1..k-1 are recorded, step k is lost and runs again
on attempt 2, as when an agent dies at the worst moment. ``ctx.step``,
``ctx.step_fn`` and ``ctx.step_scope`` are tracked, in async and sync handlers.

Durable waits (``ctx.wait_for_signal``, ``sleep``, ``sleep_until``,
``ask_human``) are the SDK's own: they take a position, so the numbering
counts them (a kill plan's step k is the k-th position, waits included), but
they are not steps that run and are not reported. They need the real
control plane the environment starts: a test satisfies them by signalling the
intent or deciding its task through the client, as production would (there
is no in-process stand-in for them).

The runner builds a new ``Agent`` with the user's address and capacity and the
wrapped handlers; other constructor options keep their defaults.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import signal
import sys
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from intentd.agent import Agent, WaitTimedOut

from .report import DIR_ENV, RUN_LABEL, StepRun, read_kill_plan, record_step

Handler = Callable[..., Any]


def load_agent(spec: str) -> Agent:
    """The ``Agent`` named ``module:attribute`` (the module is imported, so it
    must start the agent only under ``if __name__ == "__main__":``)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"agent {spec!r}: expected module:attribute, e.g. myapp.agents:agent")
    agent = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(agent, Agent):
        raise TypeError(f"agent {spec!r} is a {type(agent).__name__}, not an intentd.agent.Agent")
    return agent


def is_async(fn: Handler) -> bool:
    # As the agent SDK decides between Context and SyncContext.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class Tracker:
    """One attempt of one intent: numbers its steps as the SDK does (a step
    that raised does not use up its number), records each step function
    called, and kills the process at the planned step."""

    def __init__(self, ctx: Any, folder: Path) -> None:
        self.folder = folder
        self.intent_id: str = ctx.intent_id
        self.attempt: int = ctx.attempt
        self.kill_at = read_kill_plan(folder, ctx.labels.get(RUN_LABEL)) if ctx.attempt == 1 else None
        self.done = 0

    def started(self, name: str) -> int:
        index = self.done + 1
        record_step(self.folder, StepRun(self.intent_id, name, index, self.attempt, os.getpid()))
        return index

    def returned(self, index: int) -> None:
        if index == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def tracked(self, name: str, fn: Handler) -> Handler:
        """``fn`` wrapped, keeping whether it is a coroutine function (the SDK
        runs those on the loop and the others in a thread)."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                index = self.started(name)
                value = await fn(*args, **kwargs)
                self.returned(index)
                return value

            return run_async

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            index = self.started(name)
            value = fn(*args, **kwargs)
            if inspect.isawaitable(value):
                return self._after(value, index)
            self.returned(index)
            return value

        return run

    async def _after(self, awaitable: Awaitable[Any], index: int) -> Any:
        value = await awaitable
        self.returned(index)
        return value


class TrackedScope:
    """A step scope whose body counts as the step's function."""

    def __init__(self, scope: Any, tracker: Tracker, name: str) -> None:
        self._scope = scope
        self._tracker = tracker
        self._name = name

    def _entered(self, scope: Any) -> Any:
        if not scope.replayed:
            self._tracker.started(self._name)
        return scope

    def _exiting(self, failed: bool) -> None:
        if not failed and not self._scope.replayed:
            self._tracker.returned(self._scope.index)

    def _exited(self, failed: bool) -> None:
        if not failed:
            self._tracker.done += 1

    async def __aenter__(self) -> Any:
        return self._entered(await self._scope.__aenter__())

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: types.TracebackType | None) -> None:
        self._exiting(kind is not None)
        await self._scope.__aexit__(kind, exc, tb)
        self._exited(kind is not None)

    def __enter__(self) -> Any:
        return self._entered(self._scope.__enter__())

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        self._exiting(kind is not None)
        self._scope.__exit__(kind, exc, tb)
        self._exited(kind is not None)


class TrackedContext:
    """The handler's context with its steps tracked; everything else is the
    SDK's own context (attributes are read through)."""

    def __init__(self, ctx: Any, tracker: Tracker) -> None:
        self._ctx = ctx
        self._tracker = tracker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def step_scope(self, name: str) -> TrackedScope:
        return TrackedScope(self._ctx.step_scope(name), self._tracker, name)

    def step_fn(self, name: str | None = None) -> Callable[[Handler], Handler]:
        def decorate(fn: Handler) -> Handler:
            step_name = name or str(getattr(fn, "__name__", ""))

            @functools.wraps(fn)
            def run(*args: Any, **kwargs: Any) -> Any:
                return self.step(step_name, fn, *args, **kwargs)

            return run

        return decorate

    def step(self, name: str, fn: Handler, /, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


# The context's waits: each uses up its position when it returns or times out.
WAITS = ("wait_for_signal", "sleep", "sleep_until", "ask_human")


class AsyncTrackedContext(TrackedContext):
    # Plain methods returning coroutines, as the SDK's: the position is taken
    # when the handler calls them, so concurrent steps number as without the runner.
    def step(self, name: str, fn: Handler, /, *args: Any, **kwargs: Any) -> Any:
        return self._counted(self._ctx.step(name, self._tracker.tracked(name, fn), *args, **kwargs))

    async def _counted(self, call: Awaitable[Any]) -> Any:
        value = await call
        self._tracker.done += 1
        return value

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._ctx, name)
        if name not in WAITS:
            return attribute

        def wait(*args: Any, **kwargs: Any) -> Any:
            return self._waited(attribute(*args, **kwargs))

        return wait

    async def _waited(self, call: Awaitable[Any]) -> Any:
        try:
            value = await call
        except WaitTimedOut:
            self._tracker.done += 1
            raise
        self._tracker.done += 1
        return value


class SyncTrackedContext(TrackedContext):
    def step(self, name: str, fn: Handler, /, *args: Any, **kwargs: Any) -> Any:
        value = self._ctx.step(name, self._tracker.tracked(name, fn), *args, **kwargs)
        self._tracker.done += 1
        return value

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._ctx, name)
        if name not in WAITS:
            return attribute

        def wait(*args: Any, **kwargs: Any) -> Any:
            try:
                value = attribute(*args, **kwargs)
            except WaitTimedOut:
                self._tracker.done += 1
                raise
            self._tracker.done += 1
            return value

        return wait


def track(handler: Handler, folder: Path) -> Handler:
    if is_async(handler):

        async def tracked_async(ctx: Any, payload: Any) -> Any:
            return await handler(AsyncTrackedContext(ctx, Tracker(ctx, folder)), payload)

        return tracked_async

    def tracked(ctx: Any, payload: Any) -> Any:
        return handler(SyncTrackedContext(ctx, Tracker(ctx, folder)), payload)

    return tracked


def tracked_agent(agent: Agent, folder: Path) -> Agent:
    runner = Agent(agent.name, capacity=agent.capacity)
    for intent_type, handler in agent.handlers.items():
        runner.add_handler(intent_type, track(handler, folder))
    return runner


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m intentd.testing.runner module:attribute", file=sys.stderr)
        return 2
    tracked_agent(load_agent(args[0]), Path(os.environ[DIR_ENV])).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
