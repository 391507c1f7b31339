"""Errors of the control plane. Each carries the gRPC status it maps to, so
handlers raise and one place (``intentd.server.rpc``: ``to_server_error``
and the ``unary`` wrapper) turns them into statuses."""

from __future__ import annotations

import grpc

from intentd.core.errors import IntentdError


class ServerError(IntentdError):
    """Base of every error the control plane raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServerError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServerError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class StaleLease(FailedPrecondition):
    """A write from an attempt that no longer holds the intent's lease."""


class ResourceExhausted(ServerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        # Sent as trailing metadata "retry-after-ms" so clients back off right.
        self.retry_after_ms = retry_after_ms


class Unavailable(ServerError):
    """The database cannot be reached; the call is safe to retry."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServerError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServerError):
    code = grpc.StatusCode.PERMISSION_DENIED
