"""A stream's first message: the sidecar's Register, checked against its
API key, turned into a Stream holding the leases it may keep, and answered
with Registered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from intentd.core.errors import ValidationError
from intentd.core.limits import MAX_INTENT_TYPES, MAX_SIDECAR_ID_LEN
from intentd.core.validation import check_agent_address, check_intent_type
from intentd.generated.v1 import agent_service_pb2 as pb
from intentd.generated.v1 import delivery_pb2

from .. import errors
from ..auth import Caller
from ..leases import LeaseStore
from ..rpc import MalformedRequest
from ..settings import ServerSettings
from .admission import Admission
from .leases import StreamLeases, lease_ref
from .state import Stream

log = logging.getLogger("intentd.agents")

REGISTER_TIMEOUT_S = 10.0
MAX_CAPACITY = 10_000
MAX_ADDRESSES = 100


def validate_register(msg: pb.Register) -> None:
    if not msg.sidecar_id or len(msg.sidecar_id) > MAX_SIDECAR_ID_LEN:
        raise ValidationError("register.sidecar_id", f"must be 1 to {MAX_SIDECAR_ID_LEN} characters")
    if not msg.addresses:
        raise ValidationError("register.addresses", "must name at least one agent address")
    if len(msg.addresses) > MAX_ADDRESSES:
        raise ValidationError("register.addresses", f"at most {MAX_ADDRESSES} addresses per sidecar")
    for i, address in enumerate(msg.addresses):
        check_agent_address(address, f"register.addresses[{i}]")
    validate_types(msg.intent_types, "register.intent_types")
    if not 0 <= msg.capacity <= MAX_CAPACITY:
        raise ValidationError("register.capacity", f"must be 0 to {MAX_CAPACITY}")
    if len(msg.held) > MAX_CAPACITY:
        raise ValidationError("register.held", f"at most {MAX_CAPACITY} leases")


def validate_types(intent_types: Sequence[str], field: str) -> None:
    if len(intent_types) > MAX_INTENT_TYPES:
        raise ValidationError(field, f"at most {MAX_INTENT_TYPES} intent types")
    for i, intent_type in enumerate(intent_types):
        check_intent_type(intent_type, f"{field}[{i}]")


class Registration:
    def __init__(self, store: LeaseStore, settings: ServerSettings, admission: Admission,
                 holders: dict[str, StreamLeases]) -> None:
        self.store = store
        self.settings = settings
        self.admission = admission
        self._holders = holders

    async def register(
        self, caller: Caller, requests: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext,
        *, closing: bool,
    ) -> Stream | None:
        """The stream the first message registers (None: the sidecar hung up
        first); raises what refuses it."""
        try:
            first = await asyncio.wait_for(anext(aiter(requests)), REGISTER_TIMEOUT_S)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise ValidationError("register", f"was not sent within {REGISTER_TIMEOUT_S:.0f}s") from None
        if isinstance(first, MalformedRequest):
            raise first.invalid()
        if first.WhichOneof("msg") != "register":
            raise ValidationError("register", "the first message of a Connect stream must be register")
        if closing:
            raise errors.Unavailable("server is shutting down; connect to another replica")
        reg = first.register
        validate_register(reg)
        for address in reg.addresses:
            if not caller.may_serve(address):
                raise errors.PermissionDenied(
                    f"API key {caller.name!r} may not serve {address} (its patterns: "
                    f"{', '.join(caller.address_patterns) or 'none'})")
        stream = Stream(
            caller=caller,
            sidecar_id=reg.sidecar_id,
            addresses=tuple(dict.fromkeys(reg.addresses)),
            intent_types=tuple(dict.fromkeys(reg.intent_types)),
            capacity=reg.capacity,
            buffer_bytes=self.settings.stream_buffer_bytes,
            holders=self._holders,
            batches=reg.accepts_batches,
            fetches_steps=reg.fetches_steps,
            bucket=self.admission.stream_bucket(),
        )
        kept, lost = await self._rebind(stream, reg.held)
        await context.write(pb.ConnectResponse(registered=pb.Registered(
            session_id=stream.id, ping_interval_ms=self.settings.ping_interval_ms, kept=kept, lost=lost,
            accepts_batches=True)))
        log.info("sidecar %s connected (stream %s) for %s, capacity %d, kept %d lost %d",
                 stream.sidecar_id, stream.id, ",".join(stream.addresses), stream.capacity,
                 len(kept), len(lost))
        return stream

    async def _rebind(
        self, stream: Stream, announced: Sequence[delivery_pb2.Lease]
    ) -> tuple[list[delivery_pb2.Lease], list[delivery_pb2.Lease]]:
        """The leases a reconnecting sidecar announced, moved to the new
        stream where they are still live: (kept, lost)."""
        kept: list[delivery_pb2.Lease] = []
        lost: list[delivery_pb2.Lease] = []
        for msg in announced:
            try:
                lease = lease_ref(msg)
            except ValidationError:
                lost.append(msg)
                continue
            # Only for an address this stream may serve (checked against the
            # key above): the database refuses a lease of any other.
            bound = await self.store.rebind(lease, stream.id, stream.addresses, tenant=stream.caller.tenant)
            if bound is not None:
                stream.leases.hold(lease, bound.seq, acked=bound.acked)
                kept.append(msg)
            else:
                lost.append(msg)
        return kept, lost
