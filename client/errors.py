"""Typed errors of the client SDK.

Every gRPC failure reaches the caller as a ``ClientError`` subclass chosen by
its status code, so callers can write ``except NotFound`` instead of comparing
``err.code()``. The original ``grpc.RpcError`` stays available as
``__cause__``. ``ClientError`` sits under intentd's one root,
``intentd.core.errors.IntentdError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from intentd.core.errors import IntentdError

if TYPE_CHECKING:
    from .models import Intent


class ClientError(IntentdError):
    """Root of every error the client raises on purpose; ``code`` is the
    gRPC status the call ended with (or the one closest in meaning)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", code: grpc.StatusCode | None = None) -> None:
        if code is not None:
            # An instance attribute, so the fallback base keeps the real code
            # while subclasses keep their class-level one.
            self.code = code
        self.details = details
        super().__init__(f"{self.code.name}: {details}" if details else self.code.name)


class InvalidArgument(ClientError, ValueError):
    """Also a ValueError: client-side checks raise it before any call is made."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ClientError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ClientError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ClientError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(ClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Internal(ClientError):
    code = grpc.StatusCode.INTERNAL


class Cancelled(ClientError):
    code = grpc.StatusCode.CANCELLED


class WaitTimeout(DeadlineExceeded):
    """``wait_for``'s own timeout passed before the intent became terminal;
    ``intent`` is the last state seen."""

    def __init__(self, details: str, intent: Intent) -> None:
        super().__init__(details)
        self.intent = intent


class IntentNotCompleted(ClientError):
    """The intent reached a terminal state other than COMPLETED.

    Raised by ``wait_for(raise_on_failure=True)``; ``intent`` is the final
    state. The code is the status closest in meaning to the outcome: nothing
    went wrong with the call itself.
    """

    def __init__(self, intent: Intent) -> None:
        super().__init__(_outcome_details(intent))
        self.intent = intent


class IntentFailed(IntentNotCompleted):
    code = grpc.StatusCode.ABORTED


class IntentCanceled(IntentNotCompleted):
    code = grpc.StatusCode.CANCELLED


class IntentTimedOut(IntentNotCompleted):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def _outcome_details(intent: Intent) -> str:
    text = f"intent {intent.id} is {intent.state.value}"
    if intent.cancel_reason:
        text += f": {intent.cancel_reason}"
    if intent.error is not None:
        text += f" ({intent.error.code}: {intent.error.message})"
    return text


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        PermissionDenied,
        Unauthenticated,
        Internal,
        Cancelled,
    )
}


def rpc_code(err: Any) -> grpc.StatusCode:
    """The status code of a sync or aio RPC error; UNKNOWN when it has none
    (a bare ``grpc.RpcError`` raised outside a call)."""
    code = getattr(err, "code", None)
    if callable(code):
        value = code()
        if isinstance(value, grpc.StatusCode):
            return value
    return grpc.StatusCode.UNKNOWN


def from_rpc_error(err: grpc.RpcError) -> ClientError:
    code = rpc_code(err)
    details_fn = getattr(err, "details", None)
    details = (details_fn() if callable(details_fn) else None) or ""
    cls = _BY_CODE.get(code)
    if cls is None:
        return ClientError(details, code)
    return cls(details)


__all__ = [
    "AlreadyExists",
    "Cancelled",
    "ClientError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "IntentCanceled",
    "IntentFailed",
    "IntentNotCompleted",
    "IntentTimedOut",
    "IntentdError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "WaitTimeout",
    "from_rpc_error",
]
