"""One Attach stream to the sidecar, and how an attempt's writes travel.

A sidecar that greets the agent with ``AgentWelcome(stream_writes=True)``
takes the writes on the Attach stream itself, answered by ``write_result``
messages; under load the messages queued on either side go as one batch
frame. Against an older sidecar (no welcome) each write is its own unary
call, as before. Either way a write is answered only after the control plane
committed it, and a refusal carries the same gRPC status.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import grpc

from intentd.core.codes import OK, RETRY_AFTER_KEY, status_of
from intentd.core.framing import MAX_BATCH_MESSAGES, Framer, frame
from intentd.generated.v1 import agent_service_pb2, delivery_pb2, intent_pb2, runtime_pb2, runtime_pb2_grpc

from .errors import WriteRefused

log = logging.getLogger("intentd.agent")

# How long closing a session waits for cancelled handlers to unwind.
UNWIND_SECONDS = 5.0

# The unary call of each write, for sidecars that take no writes on the stream.
_UNARY: dict[str, tuple[str, Callable[[delivery_pb2.IntentWrite], Any]]] = {
    "step": ("RecordStep", lambda w: runtime_pb2.RecordStepRequest(lease=w.lease, step=w.step)),
    "checkpoint": ("SaveCheckpoint",
                   lambda w: runtime_pb2.SaveCheckpointRequest(lease=w.lease, checkpoint=w.checkpoint)),
    "progress": ("ReportProgress", lambda w: runtime_pb2.ReportProgressRequest(lease=w.lease, progress=w.progress)),
    "complete": ("CompleteIntent", lambda w: runtime_pb2.CompleteIntentRequest(lease=w.lease, complete=w.complete)),
    "fail": ("FailIntent", lambda w: runtime_pb2.FailIntentRequest(lease=w.lease, fail=w.fail)),
    "wait": ("Wait", lambda w: runtime_pb2.WaitRequest(lease=w.lease, wait=w.wait)),
    "emit": ("Emit", lambda w: runtime_pb2.EmitRequest(lease=w.lease, emit=w.emit)),
}


# Writes with no unary call: only a sidecar that takes writes on the stream takes them.
_STREAM_ONLY = {"start_children": "StartChildren"}


def method_of(write: delivery_pb2.IntentWrite) -> str:
    """The name the write has in the runtime API (``RecordStep``...), for messages."""
    op = write.WhichOneof("op") or "step"
    return _STREAM_ONLY.get(op) or _UNARY[op][0]


class Running(Protocol):
    """What a session needs of the attempts started on it (``attempt.Attempt``;
    named here as a protocol so that the session does not import the engine
    that writes through it)."""

    @property
    def intent_id(self) -> str: ...

    @property
    def task(self) -> asyncio.Task[None] | None: ...

    def revoke(self, reason: str, message: str = "") -> bool: ...

    def park(self, message: str) -> None: ...


A = TypeVar("A", bound=Running)


def retry_after_ms(exc: grpc.aio.AioRpcError) -> int:
    """The retry-after a refusal's trailing metadata carries (0: none)."""
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0, int(value))
            except (TypeError, ValueError):
                return 0
    return 0


class SidecarSession(Generic[A]):
    """One Attach stream and the attempts started on it."""

    def __init__(self, channel: grpc.aio.Channel, capacity: int) -> None:
        self.stub: runtime_pb2_grpc.AgentRuntimeServiceAsyncStub = (
            runtime_pb2_grpc.AgentRuntimeServiceStub(channel)  # type: ignore[assignment]
        )
        self.call: Any = self.stub.Attach()
        self.slots = asyncio.Semaphore(capacity)
        self.running: dict[str, A] = {}  # by lease token
        self.heard = False
        # Set by the sidecar's welcome.
        self.stream_writes = False
        self.peer_batches = False
        self._outbox: asyncio.Queue[runtime_pb2.AttachRequest | None] = asyncio.Queue()
        # By request id: the answer's future, and the lease token of a wait
        # (its attempt is over the moment the answer says parked).
        self._pending: dict[int, asyncio.Future[agent_service_pb2.WriteResult]] = {}
        self._waits: dict[int, str] = {}
        self._ids = itertools.count(1)
        self._closed = False

    # -- sending ---------------------------------------------------------------

    def send(self, request: runtime_pb2.AttachRequest) -> None:
        """Queues a message for the stream (the writer task sends it in order)."""
        if self._closed:
            raise WriteRefused(grpc.StatusCode.UNAVAILABLE, "the sidecar stream closed")
        self._outbox.put_nowait(request)

    async def write_loop(self) -> None:
        """Sends queued messages until the session closes; raises the stream's error."""
        frames: Framer[runtime_pb2.AttachRequest] = Framer(self._outbox, limit=1)
        while (messages := await frames.next()) is not None:
            await self.call.write(frame(messages, _request_batch))
            # The welcome (read meanwhile) says whether the sidecar takes batches.
            frames.limit = MAX_BATCH_MESSAGES if self.peer_batches else 1

    async def write(self, write: delivery_pb2.IntentWrite, timeout: float | None) -> agent_service_pb2.WriteResult:
        """One write of an attempt; the answer once the control plane committed
        it. Raises ``WriteRefused`` with the status otherwise."""
        if not self.stream_writes:
            return await self._unary(write, timeout)
        request_id = next(self._ids)
        future: asyncio.Future[agent_service_pb2.WriteResult] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if write.WhichOneof("op") == "wait":
            self._waits[request_id] = write.lease.token
        try:
            self.send(runtime_pb2.AttachRequest(write=agent_service_pb2.WriteRequest(
                request_id=request_id, write=write)))
            try:
                result = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise WriteRefused(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"no answer from the sidecar within {timeout}s") from None
        finally:
            self._pending.pop(request_id, None)
            self._waits.pop(request_id, None)
        if result.code != OK:
            raise WriteRefused(status_of(result.code), result.message or "refused by the control plane",
                               result.retry_after_ms)
        return result

    async def _unary(self, write: delivery_pb2.IntentWrite, timeout: float | None) -> agent_service_pb2.WriteResult:
        op = write.WhichOneof("op") or ""
        if op in _STREAM_ONLY:
            raise WriteRefused(grpc.StatusCode.UNIMPLEMENTED, (
                f"{_STREAM_ONLY[op]}: this sidecar does not take writes on the Attach stream, and child "
                "intents have no unary call; upgrade the sidecar"))
        method, request = _UNARY[op]
        try:
            response = await getattr(self.stub, method)(request(write), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise WriteRefused(exc.code(), exc.details() or "", retry_after_ms(exc)) from None
        if isinstance(response, runtime_pb2.RecordStepResponse):
            return agent_service_pb2.WriteResult(step=response.step)
        if isinstance(response, runtime_pb2.WaitResponse):
            return agent_service_pb2.WriteResult(wait=response.outcome)
        if isinstance(response, runtime_pb2.EmitResponse):
            return agent_service_pb2.WriteResult(emit=response.outcome)
        return agent_service_pb2.WriteResult()

    async def recorded_step(self, lease: delivery_pb2.Lease, index: int, name: str,
                            timeout: float | None) -> intent_pb2.StepRecord | None:
        """The step an earlier attempt recorded at ``index`` that the
        assignment did not carry (the sidecar fetches it), or None. Raises
        ``WriteRefused`` with the call's status."""
        try:
            response: runtime_pb2.BeginStepResponse = await self.stub.BeginStep(
                runtime_pb2.BeginStepRequest(lease=lease, index=index, name=name, any_name=True), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise WriteRefused(exc.code(), exc.details() or "") from None
        return response.step if response.recorded else None

    # -- receiving -------------------------------------------------------------

    def on_welcome(self, welcome: runtime_pb2.AgentWelcome) -> None:
        self.stream_writes = welcome.stream_writes
        self.peer_batches = welcome.accepts_batches

    def on_write_result(self, result: agent_service_pb2.WriteResult) -> None:
        future = self._pending.get(result.request_id)
        if future is not None and not future.done():
            future.set_result(result)
        token = self._waits.get(result.request_id)
        if token is not None and result.code == OK and result.wait.parked:
            # Stopped here, before the next message is read: the sidecar frees
            # the slot on this answer and may assign the next intent in the
            # same frame, which must find this attempt over.
            attempt = self.running.get(token)
            if attempt is not None:
                attempt.park("the intent parked on a wait")

    # -- attempts --------------------------------------------------------------

    def find(self, lease: delivery_pb2.Lease) -> A | None:
        if lease.token:
            return self.running.get(lease.token)
        for attempt in self.running.values():
            if attempt.intent_id == lease.intent_id:
                return attempt
        return None

    def tasks(self) -> list[asyncio.Task[None]]:
        return [attempt.task for attempt in self.running.values() if attempt.task is not None]

    async def close(self, reason: str) -> None:
        """Stops every attempt of the session (``reason``: why, as the
        attempts see it): their leases go with the stream. Writes still
        waiting are answered UNAVAILABLE; the stopped attempts do not retry them."""
        self._closed = True
        for attempt in list(self.running.values()):
            attempt.revoke(reason, "the sidecar stream closed")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WriteRefused(grpc.StatusCode.UNAVAILABLE, "the sidecar stream closed"))
        self._outbox.put_nowait(None)
        tasks = self.tasks()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=UNWIND_SECONDS)
            for task in stuck:
                log.warning("handler task %s ignores cancellation; abandoning it", task.get_name())
        self.call.cancel()


def _request_batch(messages: list[runtime_pb2.AttachRequest]) -> runtime_pb2.AttachRequest:
    return runtime_pb2.AttachRequest(batch=runtime_pb2.AttachRequestBatch(messages=messages))
