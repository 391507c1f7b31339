"""The operator-facing AdminService: the intent-type registry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from intentd.core.errors import ValidationError
from intentd.core.limits import (
    DEFAULT_WAIT_HOLD_MS,
    MAX_RETRY_BACKOFF_MAX_MS,
    MAX_RETRY_BACKOFF_MS,
    MAX_WAIT_HOLD_MS,
)
from intentd.core.validation import check_horizon_ms, check_intent_type
from intentd.generated.v1 import admin_service_pb2 as pb
from intentd.generated.v1 import admin_service_pb2_grpc as pb_grpc

from . import errors
from .auth import Authenticator, current_caller
from .convert import timestamp
from .rpc import Ctx, unary
from .settings import MISSED_PINGS_BEFORE_CLOSE, ServerSettings
from .store import IntentStore


def _type_to_proto(row: Mapping[str, Any]) -> pb.IntentType:
    msg = pb.IntentType(
        intent_type=row["intent_type"],
        max_attempts=row["max_attempts"],
        heartbeat_timeout_ms=row["heartbeat_timeout_ms"],
        retry_backoff_ms=row["retry_backoff_ms"],
        retry_backoff_max_ms=row["retry_backoff_max_ms"],
        default_deadline_ms=row["default_deadline_ms"] or 0,
        update_time=timestamp(row["update_time"]),
    )
    if row.get("wait_hold_ms") is not None:
        msg.wait_hold_ms = row["wait_hold_ms"]
    if row.get("stream_keep_ms") is not None:
        msg.stream_keep_ms = row["stream_keep_ms"]
    return msg


class AdminService(pb_grpc.AdminServiceServicer):
    def __init__(self, store: IntentStore, settings: ServerSettings, auth: Authenticator) -> None:
        self.store = store
        self.settings = settings
        self.auth = auth

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        return current_caller().tenant

    @unary("admin")
    async def PutIntentType(self, request: pb.PutIntentTypeRequest, context: Ctx) -> pb.PutIntentTypeResponse:
        spec = request.intent_type
        check_intent_type(spec.intent_type, "intent_type.intent_type")
        max_attempts = spec.max_attempts or 3
        heartbeat = spec.heartbeat_timeout_ms or self.settings.heartbeat_timeout_ms
        backoff = spec.retry_backoff_ms
        backoff_max = spec.retry_backoff_max_ms or 60_000
        if not 1 <= max_attempts <= 1000:
            raise ValidationError("intent_type.max_attempts", "must be 1 to 1000 (0 means 3)")
        least = self.settings.min_heartbeat_timeout_ms
        if not least <= heartbeat <= 86_400_000:
            raise ValidationError(
                "intent_type.heartbeat_timeout_ms",
                f"must be {least} to 86400000: at least {MISSED_PINGS_BEFORE_CLOSE} ping intervals of "
                f"{self.settings.ping_interval_ms} ms, so a lease lapses only once its stream's silence is judged",
            )
        if not 0 <= backoff <= MAX_RETRY_BACKOFF_MS:
            raise ValidationError("intent_type.retry_backoff_ms", f"must be 0 to {MAX_RETRY_BACKOFF_MS} (one hour)")
        if not 0 <= backoff_max <= MAX_RETRY_BACKOFF_MAX_MS:
            raise ValidationError("intent_type.retry_backoff_max_ms",
                                  f"must be 0 to {MAX_RETRY_BACKOFF_MAX_MS} (one day)")
        # Refused here, not by the database: a deadline past year 9999 could
        # be stored but never read back.
        check_horizon_ms(spec.default_deadline_ms, "intent_type.default_deadline_ms")
        # Optional: unset keeps the type's hold window (the default for a new type).
        wait_hold_ms = spec.wait_hold_ms if spec.HasField("wait_hold_ms") else None
        if wait_hold_ms is not None and not 0 <= wait_hold_ms <= MAX_WAIT_HOLD_MS:
            raise ValidationError(
                "intent_type.wait_hold_ms",
                f"must be 0 (park at once) to {MAX_WAIT_HOLD_MS} (unset: keep, default {DEFAULT_WAIT_HOLD_MS})")
        # Optional too, but a put replaces it: unset means streams live as long as their intents.
        stream_keep_ms = (check_horizon_ms(spec.stream_keep_ms, "intent_type.stream_keep_ms")
                          if spec.HasField("stream_keep_ms") else None)
        row = await self.store.put_intent_type(
            self._tenant(context),
            spec.intent_type,
            max_attempts=max_attempts,
            heartbeat_timeout_ms=heartbeat,
            retry_backoff_ms=backoff,
            retry_backoff_max_ms=backoff_max,
            default_deadline_ms=spec.default_deadline_ms or None,
            wait_hold_ms=wait_hold_ms,
            stream_keep_ms=stream_keep_ms,
        )
        await self.store.audit(self._tenant(context), current_caller().name, "intent_type.put", spec.intent_type,
                               {"max_attempts": max_attempts, "heartbeat_timeout_ms": heartbeat,
                                "wait_hold_ms": row["wait_hold_ms"], "stream_keep_ms": row["stream_keep_ms"]})
        return pb.PutIntentTypeResponse(intent_type=_type_to_proto(row))

    @unary("admin")
    async def GetIntentType(self, request: pb.GetIntentTypeRequest, context: Ctx) -> pb.GetIntentTypeResponse:
        check_intent_type(request.intent_type)
        row = await self.store.get_intent_type(self._tenant(context), request.intent_type)
        if row is None:
            raise errors.NotFound(f"intent type {request.intent_type!r} is not registered (defaults apply)")
        return pb.GetIntentTypeResponse(intent_type=_type_to_proto(row))

    @unary("admin")
    async def ListIntentTypes(self, request: pb.ListIntentTypesRequest, context: Ctx) -> pb.ListIntentTypesResponse:
        rows = await self.store.list_intent_types(self._tenant(context))
        return pb.ListIntentTypesResponse(intent_types=[_type_to_proto(r) for r in rows])
