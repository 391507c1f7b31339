"""The intentd client SDK: send intents, follow them, cancel them.

    from intentd.client import IntentClient

    with IntentClient("127.0.0.1:7300", sender="billing") as client:
        intent_id = client.send_intent(
            intent_type="intent.pipeline.process.v1",
            to_agent="agent://acme/prod/processor",
            payload={"order": 42},
        )
        intent = client.wait_for(intent_id, timeout=60, raise_on_failure=True)
        print(intent.result)

``AsyncIntentClient`` has the same methods as coroutines (``watch`` and
``iter_intents`` as async iterators).
"""

from intentd.core.states import IntentState

from ._async import AsyncIntentClient
from ._sync import IntentClient
from .errors import (
    AlreadyExists,
    Cancelled,
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
from .models import Event, Intent, IntentError, Page, Step, build_spec

__all__ = [
    "AlreadyExists",
    "AsyncIntentClient",
    "Cancelled",
    "DeadlineExceeded",
    "Event",
    "FailedPrecondition",
    "Intent",
    "IntentCanceled",
    "IntentClient",
    "IntentError",
    "IntentFailed",
    "IntentNotCompleted",
    "IntentState",
    "IntentTimedOut",
    "IntentdError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "Page",
    "PermissionDenied",
    "ResourceExhausted",
    "Step",
    "Unauthenticated",
    "Unavailable",
    "WaitTimeout",
    "build_spec",
    "from_rpc_error",
]
