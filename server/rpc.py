"""Turning control-plane errors into gRPC statuses, in one place."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from intentd.server import errors
from intentd.server.db import convert_error
from intentd.validation import ValidationError

log = logging.getLogger("intentd.rpc")

Ctx = grpc.aio.ServicerContext
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def to_server_error(exc: Exception) -> errors.ServerError | None:
    if isinstance(exc, ValidationError):
        return errors.InvalidArgument(str(exc))
    return convert_error(exc)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    mapped = to_server_error(exc)
    if mapped is None:
        log.exception("unexpected error in %s", method, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")
    else:
        await context.abort(mapped.code, mapped.message)


def unary(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__name__)
            raise AssertionError("unreachable") from exc

    return wrapper


def server_stream(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__name__)

    return wrapper
