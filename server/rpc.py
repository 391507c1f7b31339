"""Turning control-plane errors into gRPC statuses, in one place."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from intentd.core.codes import RETRY_AFTER_KEY
from intentd.core.errors import ValidationError

from . import errors
from .auth import CALLER
from .db import convert_error

log = logging.getLogger("intentd.rpc")

Ctx = grpc.aio.ServicerContext
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def to_server_error(exc: Exception) -> errors.ServerError | None:
    if isinstance(exc, ValidationError):
        return errors.InvalidArgument(str(exc))
    return convert_error(exc)


async def abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    """Ends the call with the status ``exc`` maps to (INTERNAL, logged, for
    one that maps to none)."""
    mapped = to_server_error(exc)
    if mapped is None:
        log.exception("unexpected error in %s", method, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")
    else:
        retry_after = getattr(mapped, "retry_after_ms", None)
        if retry_after is not None:
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(retry_after)),))
        await context.abort(mapped.code, mapped.message)


def unary(role: str) -> Callable[[Callable[..., Awaitable[Resp]]], Callable[..., Awaitable[Resp]]]:
    """A unary handler that needs ``role``: authenticates the call, makes the
    caller available as ``current_caller()``, and maps errors to statuses."""

    def decorate(fn: Callable[..., Awaitable[Resp]]) -> Callable[..., Awaitable[Resp]]:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Resp:
            try:
                if isinstance(request, MalformedRequest):
                    raise request.invalid()
                CALLER.set(await self.auth.authenticate(context, role))
                return await fn(self, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, exc, fn.__name__)
                raise AssertionError("unreachable") from exc

        return wrapper

    return decorate


def server_stream(role: str) -> Callable[[Callable[..., AsyncIterator[Resp]]], Callable[..., AsyncIterator[Resp]]]:
    def decorate(fn: Callable[..., AsyncIterator[Resp]]) -> Callable[..., AsyncIterator[Resp]]:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
            try:
                if isinstance(request, MalformedRequest):
                    raise request.invalid()
                CALLER.set(await self.auth.authenticate(context, role))
                async for item in fn(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, exc, fn.__name__)

        return wrapper

    return decorate


class MalformedRequest:
    """Stands in for a request whose bytes are not the expected message (bad
    wire types, invalid UTF-8 in a string field): the handler answers
    INVALID_ARGUMENT instead of grpc's generic INTERNAL."""

    def __init__(self, message_name: str, error: str) -> None:
        self.message_name = message_name
        self.error = error

    def invalid(self) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"request is not a valid {self.message_name}: {self.error}")


def _safe_parser(cls: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return MalformedRequest(cls.DESCRIPTOR.full_name, str(exc) or "undecodable")

    return parse


def add_service(servicer: object, server: grpc.aio.Server, service: ServiceDescriptor) -> None:
    """Registers ``servicer`` for ``service`` like the generated
    add_*_to_server, but with request parsers that never raise."""
    handlers = {}
    for method in service.methods:
        request_cls = GetMessageClass(method.input_type)
        response_cls = GetMessageClass(method.output_type)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_safe_parser(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
