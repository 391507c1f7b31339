"""The intentd client SDK: send intents, follow them, cancel them, signal
them and decide their human tasks (docs/waits.md).

    from . import IntentClient

    with IntentClient.from_env() as client:  # INTENTD_TARGET, INTENTD_API_KEY[_FILE], INTENTD_TLS_*
        handle = client.start(
            intent_type="intent.pipeline.process.v1",
            to_agent="agent://acme/prod/processor",
            payload={"order": 42},
        )
        print(handle.result(timeout=60))

``client.stream(intent_id, "default")`` iterates what the intent's agent emits
to a stream (``StreamEntry``: text, JSON or a superseded marker), stored then
live, until the intent ends; it resumes after an outage without gap or
duplicate (docs/streams.md).

``AsyncIntentClient`` has the same methods as coroutines (``watch`` and
``iter_intents`` as async iterators), and ``start`` gives an
``AsyncIntentHandle``. Every error the client raises is a ``ClientError``
(under intentd's root ``IntentdError``) carrying its gRPC status as ``code``.
"""

from intentd.core.states import IntentState

from ._async import AsyncIntentClient, AsyncIntentHandle, AsyncStreamReader
from ._common import ListQuery
from ._sync import IntentClient, IntentHandle, StreamReader
from .config import ClientSettings
from .errors import (
    AlreadyExists,
    Cancelled,
    ClientError,
    DeadlineExceeded,
    FailedPrecondition,
    IntentCanceled,
    IntentdError,
    IntentFailed,
    IntentNotCompleted,
    IntentTimedOut,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    WaitTimeout,
    from_rpc_error,
)
from .models import (
    Event,
    HumanDecision,
    HumanTask,
    HumanTaskPage,
    HumanTaskState,
    Intent,
    IntentError,
    IntentFields,
    IntentType,
    Page,
    Signal,
    SignalResult,
    Step,
    StreamEntry,
    StreamInfo,
    Superseded,
    WaitInfo,
    build_spec,
)

__all__ = [
    "AlreadyExists",
    "AsyncIntentClient",
    "AsyncIntentHandle",
    "AsyncStreamReader",
    "Cancelled",
    "ClientError",
    "ClientSettings",
    "DeadlineExceeded",
    "Event",
    "FailedPrecondition",
    "HumanDecision",
    "HumanTask",
    "HumanTaskPage",
    "HumanTaskState",
    "Intent",
    "IntentCanceled",
    "IntentClient",
    "IntentError",
    "IntentFailed",
    "IntentFields",
    "IntentHandle",
    "IntentNotCompleted",
    "IntentState",
    "IntentTimedOut",
    "IntentType",
    "IntentdError",
    "Internal",
    "InvalidArgument",
    "ListQuery",
    "NotFound",
    "Page",
    "PermissionDenied",
    "ResourceExhausted",
    "Signal",
    "SignalResult",
    "Step",
    "StreamEntry",
    "StreamInfo",
    "StreamReader",
    "Superseded",
    "Unauthenticated",
    "Unavailable",
    "WaitInfo",
    "WaitTimeout",
    "build_spec",
    "from_rpc_error",
]
