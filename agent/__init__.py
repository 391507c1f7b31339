"""intentd.agent: write agents whose work survives being killed.

::

    from . import Agent, Context

    agent = Agent("agent://acme/prod/data-pipeline", capacity=4)

    @agent.handler("intent.pipeline.process.v1")
    async def process(ctx: Context, payload):
        rows = await ctx.step("extract", extract, payload["source"])
        clean = await ctx.step("transform", transform, rows)
        await ctx.step("load", load, clean)
        return {"rows": len(clean)}

    agent.run()   # or: await agent.run_async() ... await agent.stop()

The agent attaches to the sidecar beside it (``INTENTD_SIDECAR_ADDRESS``,
``unix:///path.sock`` or ``127.0.0.1:PORT``) over ``AgentRuntimeService.Attach``,
takes assignments for its registered intent types and runs up to ``capacity``
handlers at once. If the agent (or its machine) dies at step 47 of 50, the
intent is delivered again and the handler runs from the top: steps 1-46 return
their recorded results without running, step 47 runs. There is no checkpoint
code to write.

Guarantees (see docs/protocol.md, "Guarantees"):

- **Recorded results are exactly-once.** ``ctx.step`` returns only after the
  control plane committed the step's result; a step whose result was recorded
  never runs again for that intent, and every later attempt gets the stored
  result (the JSON round trip of what the step returned -- on the first run
  too, so the handler sees the same types either way).
- **Steps are at-least-once.** A step interrupted before its result was
  committed (agent killed, lease lost, sidecar unreachable) runs again in the
  next attempt. Make side effects idempotent, or key them by
  ``(ctx.intent_id, step index)``, if running twice matters. Code between steps
  runs again on every attempt.
- **Steps must be deterministic in name and order.** Steps are numbered 1, 2,
  3... in call order, when ``ctx.step`` is called (so ``asyncio.gather`` of
  ``ctx.step`` calls numbers them in argument order and runs them at once, up
  to ``Agent(max_steps_in_flight=)``; ``SyncContext.parallel`` is the same
  for ``def`` handlers). When an attempt calls step *n* under a
  different name than an earlier attempt recorded, the handler gets
  ``StepDivergence`` and the intent fails non-retryably with code
  ``STEP_DIVERGENCE`` rather than hand a step another step's result. So decide
  which steps to call from the payload and from earlier step results only --
  not from the clock, randomness or outside state read between steps (read
  those inside a step). A step that raises is not recorded and does not use up
  its index (when it ran alone; among concurrent steps it leaves a hole that
  the next attempt runs); if the handler catches that and calls a different step instead,
  the sequence depends on the failure -- return an error value from inside the
  step instead if you need to branch on it.

Outcomes: the handler's return value (JSON) completes the intent.
``NonRetryableError(code, message)`` fails it at once; any other exception
fails the attempt retryably with code ``AGENT_ERROR`` (the intent is delivered
again while attempts remain). When the sidecar revokes the attempt (intent
canceled, timed out, lease lost), the handler's task is cancelled,
``ctx.cancelled`` turns True, ``ctx.cancel_reason`` says why and nothing more is
reported for it; a write the control plane refuses as stale stops the handler
the same way (``LeaseLost``). Writes the sidecar could not commit
(``UNAVAILABLE``) are retried with backoff: every write is idempotent per lease.

Durable waits (docs/waits.md): ``await ctx.wait_for_signal(name, timeout=)``
returns a signal's payload, ``ctx.sleep(seconds)`` / ``ctx.sleep_until(when)``
sleep on the control plane's clock, ``ctx.ask_human(title, ...)`` returns a
``HumanDecision``. A wait takes the next position like a step and its value is
recorded there. While nothing satisfies it the intent parks (``WAITING``):
the attempt ends (``cancel_reason`` ``PARKED``, the handler is stopped as on a
revocation, nothing is reported, the agent's slot is free) and the next
delivery replays to the wait, which returns at once. A timeout raises
``WaitTimedOut`` at the wait in every attempt that reaches it. Step names
starting with ``@`` are reserved for waits.

Child intents (docs/children.md): ``await ctx.call(to_agent, intent_type,
payload)`` sends an intent to another agent and returns its result;
``ctx.start`` / ``ctx.start_many([ChildCall(...), ...])`` return handles,
``ctx.gather(*handles)`` / ``ctx.first(*handles)`` wait for them, durably (the
intent parks meanwhile). A child is started once whatever the attempts (it is
keyed by this intent and its position); one that does not complete raises
``ChildFailed`` at the wait.

Streams (docs/streams.md): ``await ctx.emit(chunk, stream="default")`` appends
a text (``str``) or JSON chunk to a stream of the intent that clients read
live (``IntentClient.stream``); it is buffered and sent behind the handler, so
it can be called per token. Each chunk carries the position it belongs to and
commits before that position's record: a replay does not emit a recorded
step's chunks again, and chunks of a step that runs again are marked
superseded. ``await ctx.flush_streams()`` waits until they are committed.

``def`` handlers run in a thread of their own and get a ``SyncContext`` whose
methods block; a revoked ``def`` handler cannot be interrupted, but its next
``ctx`` call raises ``LeaseLost``. Plain-function steps of ``async def``
handlers run in a worker thread; on revocation they are abandoned, not stopped.

Logs go to the ``intentd.agent`` logger, each line naming intent and attempt.
"""

from intentd.core.backoff import Backoff

from .attempt import CANCELED, LEASE_LOST, PARKED, SHUTDOWN, TIMED_OUT
from .children import ChildCall, ChildHandle, SyncChildHandle
from .context import Context, StepScope, SyncContext, SyncStepScope
from .errors import (
    AgentError,
    ChildFailed,
    ChildResultsTooLarge,
    LeaseLost,
    NonRetryableError,
    StepDivergence,
    StreamLimitExceeded,
    WaitTimedOut,
    WriteError,
)
from .runtime import ADDRESS_ENV, Agent
from .waits import HumanDecision

__all__ = [
    "ADDRESS_ENV",
    "CANCELED",
    "LEASE_LOST",
    "PARKED",
    "SHUTDOWN",
    "TIMED_OUT",
    "Agent",
    "AgentError",
    "Backoff",
    "ChildCall",
    "ChildFailed",
    "ChildHandle",
    "ChildResultsTooLarge",
    "Context",
    "HumanDecision",
    "LeaseLost",
    "NonRetryableError",
    "StepDivergence",
    "StepScope",
    "StreamLimitExceeded",
    "SyncChildHandle",
    "SyncContext",
    "SyncStepScope",
    "WaitTimedOut",
    "WriteError",
]
