"""Whether a stream is still alive and still allowed: the server's pings,
the silence that ends a stream, and the re-checks of its API key."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from intentd.generated.v1 import agent_service_pb2 as pb

from .. import errors
from ..auth import KEY_RECHECK_SECONDS, Authenticator
from ..settings import MISSED_PINGS_BEFORE_CLOSE, ServerSettings
from .state import Stream

log = logging.getLogger("intentd.agents")


class Liveness:
    def __init__(self, auth: Authenticator, settings: ServerSettings) -> None:
        self.auth = auth
        self.settings = settings
        self._key_checks: set[asyncio.Future[bool]] = set()

    def recheck_keys(self, streams: Iterable[Stream], key_id: str) -> None:
        """A key changed (or changes may have been missed: ``key_id`` empty):
        its streams re-check it now rather than at their next poll."""
        for stream in streams:
            if not key_id or stream.caller.key_id == key_id:
                check = asyncio.ensure_future(self.check_key(stream))
                self._key_checks.add(check)
                check.add_done_callback(self._key_checks.discard)

    async def check_key(self, stream: Stream) -> bool:
        """False (and the stream ends UNAUTHENTICATED) when its key was
        revoked or expired."""
        if not self.auth.enabled or stream.closed:
            return not stream.closed
        try:
            valid = await self.auth.still_valid(stream.caller)
        except Exception:
            return True  # the database is away; the key is judged when it is back
        if not valid and not stream.closed:
            log.warning("API key %r of sidecar %s was revoked or expired; closing its stream",
                        stream.caller.name, stream.sidecar_id)
            stream.failure = errors.Unauthenticated("the API key of this stream was revoked or expired")
            stream.close()
        return valid

    async def ping(self, stream: Stream) -> None:
        """Pings the sidecar every interval until the stream ends; ends it
        when the sidecar was silent (or did not read) for too long."""
        interval = self.settings.ping_interval_ms / 1000
        nonce = 0
        while not stream.closed:
            await asyncio.sleep(interval)
            silent = stream.silent_for()
            if silent > MISSED_PINGS_BEFORE_CLOSE * interval:
                paused = stream.paused_since
                if paused is not None and time.monotonic() - paused > MISSED_PINGS_BEFORE_CLOSE * interval:
                    # Not read because it does not read: the same as silent.
                    log.warning("sidecar %s has not read its stream for %.1fs (%d bytes queued); closing it",
                                stream.sidecar_id, time.monotonic() - paused, stream.queued_bytes)
                    stream.failure = errors.ResourceExhausted(
                        f"the sidecar does not read its stream: {stream.queued_bytes} bytes queued for it, "
                        f"the limit is {stream.buffer_bytes}")
                else:
                    log.warning("sidecar %s silent for %.1fs; closing its stream", stream.sidecar_id, silent)
                stream.close()
                return
            nonce += 1
            stream.send(pb.ConnectResponse(ping=pb.Ping(nonce=nonce)))
            if self.auth.enabled and nonce % max(1, round(KEY_RECHECK_SECONDS / interval)) == 0:
                if not await self.check_key(stream):
                    return
