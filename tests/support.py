"""Test support: real PostgreSQL, real servers on loopback, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc

from intentd.core.aio import serving
from intentd.server.auth import KeyStore
from intentd.server.db import Database
from intentd.server.settings import ServerSettings
from intentd.testing.control_plane import ControlPlaneThread
from intentd.testing.database import connection
from intentd.testing.processes import ChildProcess

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def run_sync(coro: Any, timeout: float = 60) -> Any:
    """Runs a coroutine to completion from sync or async code alike (on a
    private loop in a worker thread)."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout)
    if error:
        raise error[0]
    return result[0] if result else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Polls a cheap local predicate (a process state, a file) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def server_settings(database_url: str, **overrides: Any) -> ServerSettings:
    base = ServerSettings(
        database_url=database_url,
        listen="127.0.0.1:0",
        pool_min_size=1,
        pool_max_size=8,
        sweep_interval_s=0.1,
        dispatch_catchup_s=0.5,
        ping_interval_ms=200,
        heartbeat_timeout_ms=2000,
        ack_timeout_ms=2000,
        shutdown_grace_s=2.0,
        auth="off",
    )
    base = replace(base, **overrides)
    base.validate()
    return base


# Our suite runs on the harness's control plane.
ServerThread = ControlPlaneThread


health_ok = serving


class Process(ChildProcess):
    """A real intentd process (``python -m intentd.commands ARGS``: server or
    sidecar) with its output in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        super().__init__(log_path)
        self.args = args
        self.env = env

    def start(self) -> Process:
        self.launch([sys.executable, "-m", "intentd.commands", *self.args], self.env)
        return self

    def kill(self) -> None:
        """SIGKILLs the process alone (a sidecar's agent lives on) and reaps it."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def terminate(self, timeout: float = 15) -> int:
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        return self.proc.wait(timeout)


class ServerProcess(Process):
    def __init__(self, database_url: str, log_path: Path, port: int | None = None, **env: str) -> None:
        self.port = port or free_port()
        base = {
            "INTENTD_DATABASE_URL": database_url,
            "INTENTD_LISTEN": f"127.0.0.1:{self.port}",
            "INTENTD_SWEEP_INTERVAL_S": "0.1",
            "INTENTD_PING_INTERVAL_MS": "200",
            "INTENTD_HEARTBEAT_TIMEOUT_MS": "2000",
            "INTENTD_ACK_TIMEOUT_MS": "5000",
            "INTENTD_SHUTDOWN_GRACE_S": "2",
            "INTENTD_DISPATCH_CATCHUP_S": "0.5",
            "INTENTD_AUTH": "off",
        }
        super().__init__(["server"], {**base, **env}, log_path)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        super().start()
        try:
            wait_until(lambda: health_ok(self.address) or not self.alive(), 60, 0.05, "server health")
        except AssertionError:
            raise AssertionError(f"server did not start:\n{self.log()}") from None
        if not self.alive():
            raise AssertionError(f"server exited:\n{self.log()}")
        return self


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[None]:
    try:
        yield
    finally:
        for p in processes:
            if p.alive():
                p.kill()


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


class Keys:
    """API keys made and revoked in the database directly, as ``intentd keys`` does."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url

    def create(self, tenant: str, name: str, roles: list[str], patterns: tuple[str, ...] = (),
               expire: datetime | None = None, rate: float | None = None, send: tuple[str, ...] = ()) -> str:
        _, key = self._on_store(lambda store: store.create(tenant, name, roles, patterns, expire, rate,
                                                           send_patterns=send))
        return key

    def revoke(self, tenant: str, name: str) -> None:
        self._on_store(lambda store: store.revoke(tenant, name))

    def sql(self, query: str, *args: Any) -> Any:
        async def go() -> Any:
            async with connection(self.url) as conn:
                return await conn.fetch(query, *args)

        return run_sync(go())

    def _on_store(self, work: Callable[[KeyStore], Awaitable[T]]) -> T:
        async def go() -> T:
            db = Database(self.url, min_size=1, max_size=1)
            await db.open(run_migrations=False)
            try:
                return await work(KeyStore(db))
            finally:
                await db.close()

        result: T = run_sync(go())
        return result


class RawSidecar:
    """A hand-driven AgentService.Connect stream, for protocol tests."""

    def __init__(self, address: str, agent_address: str, capacity: int = 1, sidecar_id: str = "raw",
                 metadata: list[tuple[str, str]] | None = None, ping_every: float | None = None,
                 batches: bool = False, fetches_steps: bool = False, held: list[Any] | None = None) -> None:
        """``ping_every``: also ping on that period (every ping renews the
        stream's leases), as a live sidecar does. ``batches``: announce that
        it takes batch frames (they are unpacked into ``received``; ``frames``
        counts what arrived as such). ``held``: leases to re-announce."""
        import queue

        from intentd.generated.v1 import agent_service_pb2 as apb
        from intentd.generated.v1 import agent_service_pb2_grpc as apb_grpc

        self.apb = apb
        self._requests: queue.Queue[Any] = queue.Queue()
        self._replies: queue.Queue[Any] = queue.Queue()
        self._channel = grpc.insecure_channel(address)
        self._requests.put(apb.ConnectRequest(register=apb.Register(
            sidecar_id=sidecar_id, addresses=[agent_address], capacity=capacity, accepts_batches=batches,
            fetches_steps=fetches_steps, held=held or [])))

        def requests() -> Iterator[Any]:
            while True:
                item = self._requests.get()
                if item is None:
                    return
                yield item

        self._call = apb_grpc.AgentServiceStub(self._channel).Connect(requests(), metadata=metadata)

        # Everything the server sent, in order, for tests that look back.
        self.received: list[Any] = []
        # Sizes of the batch frames received.
        self.frames: list[int] = []
        self._closed = threading.Event()

        def pump() -> None:
            try:
                for frame in self._call:
                    replies = [frame]
                    if frame.WhichOneof("msg") == "batch":
                        replies = list(frame.batch.messages)
                        self.frames.append(len(replies))
                    for reply in replies:
                        self.received.append(reply)
                        if reply.WhichOneof("msg") == "ping":
                            # Answered at once, so the stream stays alive however the test reads it.
                            self.send(pong=apb.Pong(nonce=reply.ping.nonce))
                            continue
                        self._replies.put(reply)
            except grpc.RpcError as err:
                self._replies.put(err)

        threading.Thread(target=pump, daemon=True).start()
        self.registered = self.recv("registered")
        if ping_every is not None:
            threading.Thread(target=self._ping, args=(ping_every,), daemon=True).start()

    def _ping(self, period: float) -> None:
        nonce = 0
        while not self._closed.wait(period):
            nonce += 1
            self.send(ping=self.apb.Ping(nonce=nonce))

    def of(self, kind: str) -> list[Any]:
        """The messages of ``kind`` received so far."""
        return [getattr(r, kind) for r in list(self.received) if r.WhichOneof("msg") == kind]

    def send(self, **kwargs: Any) -> None:
        self._requests.put(self.apb.ConnectRequest(**kwargs))

    def recv(self, kind: str, timeout: float = 10) -> Any:
        """The next message of ``kind`` (answering pings on the way)."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self._replies.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(reply, grpc.RpcError):
                raise reply
            if reply.WhichOneof("msg") == kind:
                return getattr(reply, kind)

    def write(self, request_id: int, write: Any, timeout: float = 10) -> Any:
        self.send(write=self.apb.WriteRequest(request_id=request_id, write=write))
        while True:
            result = self.recv("write_result", timeout)
            if result.request_id == request_id:
                return result

    def close(self) -> None:
        self._closed.set()
        self._requests.put(None)
        self._call.cancel()
        self._channel.close()


def sql(database_url: str, query: str, *args: Any) -> list[Any]:
    """One query on its own connection, from a synchronous test: its rows."""
    async def go() -> list[Any]:
        conn = await asyncpg.connect(database_url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return list(run_sync(go()))
