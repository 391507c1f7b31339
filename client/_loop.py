"""One asyncio event loop on one private thread: how the blocking client runs
the asyncio client, so the client's logic exists once."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar, cast

from .errors import Cancelled

T = TypeVar("T")


async def _next(items: AsyncIterator[T]) -> T:
    return await anext(items)


class LoopThread:
    """Runs coroutines on its loop for callers on any other thread.

    The thread starts at the first call, so a client that is never used
    starts none; ``close`` stops it and waits for it.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                # Daemon, so a client its owner forgot to close cannot keep the
                # process alive; the finalizer still closes it at exit.
                thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs ``coro`` on the loop and blocks until it is done. The task runs
        in a copy of the caller's context (tracing's current span goes along).
        If the caller is interrupted (KeyboardInterrupt), the task is cancelled."""
        try:
            loop = self._started()
        except BaseException:
            coro.close()
            raise
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking intentd client cannot be called from its own event loop")
        # The answer comes through a SimpleQueue rather than a
        # concurrent.futures.Future: once, in the full suite, a Ctrl-C landing
        # inside the Future's Condition.wait left the caller blocked for good
        # re-taking the condition's lock in its `finally`. SimpleQueue.get is
        # one C call with no such step: an interrupt just leaves it.
        call = _Call(coro)
        try:
            # Inside the try: an interrupt may land while this very call wakes
            # the loop, after the task has started. The handle captures the
            # caller's context, and the task is made in it.
            loop.call_soon_threadsafe(call.start, loop)
            ok, value = call.answer.get()
        except BaseException:
            loop.call_soon_threadsafe(call.give_up)
            raise
        if ok:
            return cast(T, value)
        raise cast(BaseException, value)

    def iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        """``items`` as a blocking iterator; closing it (or leaving a ``for``
        loop early) closes ``items`` on the loop."""
        try:
            while True:
                try:
                    item = self.run(_next(items))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None and not self._closed:
                self.run(aclose())

    def close(self, last: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Runs ``last()`` on the loop (the client closing its channel), then
        cancels what is still running there and stops the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            # Only a finalizer run by the collector on this thread gets here;
            # it must not wait for itself.
            loop.call_soon(loop.stop)
            return
        try:
            asyncio.run_coroutine_threadsafe(_shut_down(last), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()


class _Call:
    """One coroutine run for a caller on another thread: started on the loop,
    answered through ``answer`` as (True, result) or (False, exception)."""

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        self._task: asyncio.Task[Any] | None = None
        self._given_up = False
        self.answer: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._given_up:
            self._coro.close()
            return
        self._task = loop.create_task(self._coro)
        self._task.add_done_callback(self._report)

    def give_up(self) -> None:
        """The caller stopped waiting (interrupted): the task is cancelled."""
        self._given_up = True
        if self._task is not None:
            self._task.cancel()
        else:
            # Interrupted before ``start`` was even scheduled: it never will be.
            self._coro.close()

    def _report(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            # Only close() cancels a task the caller still waits for; the
            # call ends as a channel closed under it does.
            self.answer.put((False, Cancelled("the client was closed during the call")))
        elif task.exception() is not None:
            self.answer.put((False, task.exception()))
        else:
            self.answer.put((True, task.result()))


async def _shut_down(last: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        await last()
    finally:
        # Calls of other threads still in flight (a watch, a backoff sleep):
        # they end with CancelledError rather than hang on a stopped loop.
        current = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_asyncgens()
