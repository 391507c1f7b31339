"""The acks and fenced writes a stream carries, each routed to its
LeaseStore call and answered on the stream; one rule orders a lease's ack
before its writes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from intentd.core.backoff import Backoff
from intentd.core.codes import number_of
from intentd.core.errors import ValidationError
from intentd.core.observability import metrics
from intentd.generated.v1 import agent_service_pb2 as pb
from intentd.generated.v1 import delivery_pb2

from .. import errors
from ..children import ChildStore, start_spec
from ..chunks import ChunkStore, EmitResult, EmitSpec, emit_spec
from ..convert import step_to_proto
from ..db import Row
from ..hub import NotificationHub
from ..leases import LeaseRef, LeaseStore
from ..rpc import to_server_error
from ..settings import ServerSettings
from ..waits import WaitStore
from .holds import hold_wait, wait_spec
from .leases import lease_ref
from .state import Stream

log = logging.getLogger("intentd.agents")

# An ack whose database is away is retried this way, within the ack timeout.
ACK_RETRY = Backoff(0.05, 1.0)
FINAL_OPS = ("complete", "fail", "release")
# Writes that need their lease acknowledged (IN_PROGRESS); a release also
# gives back a delivery that was never acknowledged.
AFTER_ACK_OPS = ("step", "checkpoint", "progress", "complete", "fail", "wait", "start_children", "emit")


def count_attempt_end(row: Row, cause: str) -> None:
    """Metrics for an attempt that ended without a result: a redelivery, or
    the dead letter when it was the last attempt."""
    if row["state"] == "PENDING":
        metrics.record_redelivery(cause)
    elif row["state"] == "FAILED":
        if row["error_code"] == "ATTEMPTS_EXHAUSTED":
            metrics.ATTEMPTS_EXHAUSTED.inc()
        if row["age_s"] is not None:
            metrics.observe_end_to_end("FAILED", float(row["age_s"]))


def committed_frame(lease: LeaseRef, spec: EmitSpec, emitted: EmitResult) -> Row | None:
    """The frame an emit appended, as ``stream_frames`` holds it, for the
    local readers (``hub.appended``); None when the position rule dropped
    some of its chunks (which ones is not known here: the readers read it)."""
    if emitted.appended != len(spec.chunks) or emitted.time is None:
        return None
    chunks = spec.chunks
    return {"first_offset": emitted.first_offset, "end_offset": emitted.first_offset + emitted.appended,
            "attempt": lease.attempt, "time": emitted.time,
            "positions": [c.position for c in chunks], "formats": [c.format for c in chunks],
            "data": [c.data for c in chunks], "superseded": None, "reason": None}


class WriteRouter:
    def __init__(self, store: LeaseStore, settings: ServerSettings, waits: WaitStore, hub: NotificationHub,
                 children: ChildStore, chunks: ChunkStore) -> None:
        self.store = store
        self.chunks = chunks
        self.settings = settings
        self.waits = waits
        self.hub = hub
        self.children = children

    @property
    def ack_wait_s(self) -> float:
        """The longest a write waits for its lease's ack: by the ack timeout an
        unacknowledged delivery is taken back anyway."""
        return self.settings.ack_timeout_ms / 1000

    async def ack(self, stream: Stream, msg: delivery_pb2.Lease) -> None:
        """Acknowledges a lease; its writes wait until this is done."""
        held = stream.leases.get(msg.intent_id, msg.token)
        try:
            await self._acknowledge(stream, msg)
        finally:
            if held is not None:
                held.settle_ack()

    async def _acknowledge(self, stream: Stream, msg: delivery_pb2.Lease) -> None:
        # The sidecar sends an ack once; a database hiccup must not waste the
        # attempt, so an unavailable database is retried until the stream ends
        # or the ack timeout would have taken the delivery back anyway.
        deadline = time.monotonic() + self.ack_wait_s
        retries = 0
        while True:
            try:
                await self.store.ack(lease_ref(msg), stream=stream.id)
                return
            except errors.FailedPrecondition as exc:
                held = stream.leases.get(msg.intent_id, msg.token)
                if held is not None:
                    stream.leases.revoke(held, "LEASE_LOST", exc.message)
                return
            except errors.NotFound as exc:
                # Nothing to take back; a flood of these must not flood the log.
                log.debug("ack of %s refused: %s", msg.intent_id, exc)
                return
            except errors.Unavailable as exc:
                delay = ACK_RETRY.delay(retries)
                retries += 1
                if stream.closed or time.monotonic() + delay > deadline:
                    log.warning("ack of %s failed: %s", msg.intent_id, exc)
                    return
                await asyncio.sleep(delay)
            except Exception as exc:
                log.warning("ack of %s failed: %s", msg.intent_id, exc)
                return

    async def write(self, stream: Stream, request: pb.WriteRequest, on_hold: Callable[[], None] | None = None) -> None:
        """Runs a fenced write and sends its answer on the stream. A wait
        write calls ``on_hold`` when it starts holding."""
        result = pb.WriteResult(request_id=request.request_id)
        write = request.write
        op = write.WhichOneof("op")
        held = stream.leases.get(write.lease.intent_id, write.lease.token)
        final = op in FINAL_OPS
        if held is not None:
            if op in AFTER_ACK_OPS and not held.acked.done():
                # Ack before writes: a write that overtook its lease's ack (or
                # ran beside it) would find the intent still DELIVERED.
                await held.ack_settled(self.ack_wait_s)
            if final:
                held.finishing = True
        try:
            lease = lease_ref(write.lease)
            # Only the stream holding the lease may write under it.
            mine = stream.id
            if op == "step":
                row = await self.store.record_step(
                    lease, write.step.index, write.step.name, write.step.result, stream=mine)
                result.step.CopyFrom(step_to_proto(row))
                metrics.STEPS_RECORDED.inc()
            elif op == "checkpoint":
                await self.store.save_checkpoint(lease, write.checkpoint.state, stream=mine)
            elif op == "progress":
                await self.store.report_progress(lease, write.progress.message, write.progress.fraction, stream=mine)
            elif op == "complete":
                age = await self.store.complete(lease, write.complete.result, stream=mine)
                if age is not None:
                    metrics.observe_end_to_end("COMPLETED", age)
            elif op == "fail":
                ended = await self.store.fail(
                    lease, write.fail.code, write.fail.message, write.fail.retryable, stream=mine)
                count_attempt_end(ended, metrics.FAILED_RETRYABLE)
            elif op == "release":
                ended = await self.store.release(lease, write.release.reason, stream=mine)
                count_attempt_end(ended, metrics.release_cause(write.release.reason))
            elif op == "start_children":
                spec = start_spec(write.start_children, await self.children.max_payload_bytes(stream.caller))
                row = await self.children.start(lease, mine, stream.caller, spec)
                result.step.CopyFrom(step_to_proto(row))
            elif op == "emit":
                emits = emit_spec(write.emit)
                emitted = await self.chunks.emit(lease, emits, session=mine)
                result.emit.CopyFrom(emitted.to_proto())
                metrics.CHUNKS_APPENDED.inc(emitted.appended)
                if emitted.appended:
                    self.hub.appended(lease.intent_id, emits.stream, committed_frame(lease, emits, emitted))
            elif op == "wait":
                reached = await hold_wait(self.waits, self.hub, stream, held, lease, wait_spec(write.wait), on_hold)
                if reached is None:
                    return  # the stream ended while the wait was held: nobody to answer
                if reached.parked:
                    result.wait.parked = True
                    # The attempt is over: the stream neither renews it nor expects its writes.
                    stream.leases.forget(lease.intent_id, lease.token)
                else:
                    assert reached.record is not None
                    result.wait.step.CopyFrom(step_to_proto(reached.record))
            else:
                raise ValidationError("write.op", "is required")
            if final:
                stream.leases.forget(lease.intent_id, lease.token)
        except Exception as exc:
            mapped = to_server_error(exc)
            if mapped is None:
                log.exception("write %s on %s failed", op, write.lease.intent_id)
                mapped = errors.ServerError(f"internal error in {op}")
            result.code = number_of(mapped.code)
            result.message = mapped.message
            result.retry_after_ms = getattr(mapped, "retry_after_ms", None) or 0
            if held is not None and (isinstance(mapped, errors.StaleLease) or (
                final and isinstance(mapped, errors.FailedPrecondition))):
                stream.leases.forget(write.lease.intent_id, write.lease.token)
            elif held is not None:
                held.finishing = False
        metrics.record_write(op, result.code)
        stream.send(pb.ConnectResponse(write_result=result))
