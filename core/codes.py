"""gRPC status codes as intentd uses them, in one place.

The sidecar and the agent exchange codes as numbers inside frames (``WriteResult.code``),
so both ends convert through :func:`status_of` and :func:`number_of`; which codes
mean "the write may have failed in passing, send it again" is
:data:`RETRY_WRITE_CODES` for every layer that retries a fenced write.
"""

from __future__ import annotations

import grpc

OK = grpc.StatusCode.OK.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]

_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}

# After these a fenced write is sent again as it is: every write is idempotent
# per lease, and the sidecar or the control plane either did not commit it or
# cannot tell.
RETRY_WRITE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


def status_of(number: int) -> grpc.StatusCode:
    """The status for a code number from the wire; an unknown number is UNKNOWN."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def number_of(status: grpc.StatusCode) -> int:
    """The wire number of a status."""
    number: int = status.value[0]
    return number

# The trailing metadata key of a refusal that passes with time (RESOURCE_EXHAUSTED
# with a retry-after, in milliseconds); WriteResult.retry_after_ms on streams.
RETRY_AFTER_KEY = "retry-after-ms"
