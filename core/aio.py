"""Running intentd's own processes: uvloop when it is there."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

T = TypeVar("T")


# Allocations between young-generation collections (CPython's default: 700).
# A busy stream allocates a few hundred objects per message, so the default
# collected thousands of times a second (4 % of the server's CPU in the
# end-to-end profile); nothing here builds reference cycles at that rate.
GC_GEN0_THRESHOLD = 20_000


def run(coro: Coroutine[Any, Any, T], *, tune_gc: bool = True) -> T:
    """Runs a process's main coroutine, on uvloop when installed. With
    ``tune_gc`` (intentd's own processes; not an agent, whose process and
    garbage collector belong to its author) the collector runs less often."""
    if tune_gc:
        # What is loaded by now (modules, settings) lives as long as the
        # process: out of the collector's sight, full collections stop
        # re-walking it.
        gc.freeze()
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


def serving(address: str, timeout: float = 1.0) -> bool:
    """True when the gRPC health service at ``address`` says SERVING."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False
