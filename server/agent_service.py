"""The sidecar-facing AgentService: one Connect stream per sidecar carries
registration, assignments, acknowledgements, fenced writes and pings
(served by ``intentd.server.stream``, one job per module), and
ListRecordedSteps pages a held intent's history."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from intentd.core.errors import ValidationError
from intentd.generated.v1 import agent_service_pb2 as pb
from intentd.generated.v1 import agent_service_pb2_grpc as pb_grpc

from .auth import Authenticator, Caller, current_caller
from .children import ChildStore
from .chunks import ChunkStore
from .convert import step_to_proto
from .hub import NotificationHub
from .leases import LeaseStore
from .quotas import Quotas
from .rpc import abort, unary
from .settings import ServerSettings
from .stream.admission import Admission
from .stream.claims import ClaimLoop
from .stream.leases import StreamLeases, lease_ref
from .stream.lifecycle import run_stream
from .stream.liveness import Liveness
from .stream.registration import Registration
from .stream.state import Stream
from .stream.writes import WriteRouter
from .waits import WaitStore

MAX_STREAM_ID_LEN = 100


class AgentService(pb_grpc.AgentServiceServicer):
    def __init__(
        self, leases: LeaseStore, hub: NotificationHub, settings: ServerSettings, auth: Authenticator,
        quotas: Quotas, waits: WaitStore, children: ChildStore, chunks: ChunkStore,
    ) -> None:
        self.leases = leases
        self.auth = auth
        self.settings = settings
        self.streams: set[Stream] = set()
        # Which of this replica's streams holds each intent (kept by their StreamLeases).
        self._holders: dict[str, StreamLeases] = {}
        self._closing = False
        self.admission = Admission(settings, quotas, enforced=auth.enabled)
        self.liveness = Liveness(auth, settings)
        self.registration = Registration(leases, settings, self.admission, self._holders)
        self.router = WriteRouter(leases, settings, waits, hub, children, chunks)
        self.claims = ClaimLoop(leases, settings, self.liveness, lambda: self._closing)
        hub.on_pending(self._on_pending)
        hub.on_event(self._on_event)
        auth.on_change(self._on_key_change)

    # ------------------------------------------------------------ wake-ups

    def _on_pending(self, address: str) -> None:
        for stream in list(self.streams):
            if not address or address in stream.addresses:
                stream.recheck_delayed = True
                stream.wake.set()

    def _on_event(self, intent_id: str, seq: int, state: str) -> None:
        holder = self._holders.get(intent_id)
        if holder is not None:
            holder.on_event(intent_id, seq, state)

    def _on_key_change(self, key_id: str) -> None:
        self.liveness.recheck_keys(list(self.streams), key_id)

    # ------------------------------------------------------------ the stream

    async def Connect(  # type: ignore[override]  # grpc.aio also takes a coroutine that writes via context
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> None:
        try:
            # Before anything is read: a stream without a good key ends at once.
            caller = await self.auth.authenticate(context, "agent")
            self.admission.admit(caller)
        except Exception as exc:
            await self._refuse(context, exc)
            return
        try:
            await self._serve(caller, request_iterator, context)
        finally:
            self.admission.leave(caller)

    @staticmethod
    async def _refuse(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        await abort(context, exc, "registration")

    async def _serve(self, caller: Caller, request_iterator: AsyncIterator[pb.ConnectRequest],
                     context: grpc.aio.ServicerContext) -> None:
        try:
            stream = await self.registration.register(caller, request_iterator, context, closing=self._closing)
        except Exception as exc:
            await self._refuse(context, exc)
            return
        if stream is None:
            return
        self.streams.add(stream)
        try:
            await run_stream(stream, request_iterator, context, store=self.leases, admission=self.admission,
                             router=self.router, claims=self.claims, liveness=self.liveness)
        finally:
            self.streams.discard(stream)

    @unary("agent")
    async def ListRecordedSteps(
        self, request: pb.ListRecordedStepsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRecordedStepsResponse:
        """A page of a held intent's history, for a sidecar whose assignment
        carried only the first. Only the stream holding the lease may read
        it: the database checks lease, stream and tenant."""
        if not request.session_id or len(request.session_id) > MAX_STREAM_ID_LEN:
            raise ValidationError("session_id", "must be the Registered.session_id of the stream")
        # Each page is a database read: paced like the stream's writes (its
        # own budget too when the stream is on this replica).
        caller = current_caller()
        stream = next((s for s in self.streams if s.id == request.session_id and s.caller.tenant == caller.tenant),
                      None)
        await self.admission.pace(caller.tenant, stream.bucket if stream is not None else None)
        recorded, rows = await self.leases.recorded_steps(
            lease_ref(request.lease), request.session_id, request.from_index, request.max_bytes,
            tenant=caller.tenant)
        return pb.ListRecordedStepsResponse(steps=[step_to_proto(r) for r in rows], recorded_steps=recorded)

    async def close_all(self) -> None:
        """Ends every stream so sidecars reconnect to another replica (their
        leases stay theirs: they re-announce them there)."""
        self._closing = True
        for stream in list(self.streams):
            stream.close()
