"""A registered stream from its start to its end: its reader, claim loop and
pings run beside the writer that frames its outbox onto the wire, and the
first of them to end the stream ends them all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from intentd.core.framing import MAX_BATCH_MESSAGES, Framer, frame
from intentd.generated.v1 import agent_service_pb2 as pb

from ..leases import LeaseStore
from .admission import Admission
from .claims import ClaimLoop
from .inbound import Inbound
from .liveness import Liveness
from .state import Stream
from .writes import WriteRouter

log = logging.getLogger("intentd.agents")


def _response_batch(messages: list[pb.ConnectResponse]) -> pb.ConnectResponse:
    return pb.ConnectResponse(batch=pb.ConnectResponseBatch(messages=messages))


async def run_stream(
    stream: Stream, requests: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext, *,
    store: LeaseStore, admission: Admission, router: WriteRouter, claims: ClaimLoop, liveness: Liveness,
) -> None:
    """Serves the stream until it ends; then ends the call with the
    stream's failure, if the sidecar caused one."""
    inbound = Inbound(stream, store, admission, router)
    tasks = [
        asyncio.create_task(inbound.run(requests), name=f"read-{stream.id}"),
        asyncio.create_task(claims.run(stream), name=f"claim-{stream.id}"),
        asyncio.create_task(liveness.ping(stream), name=f"ping-{stream.id}"),
    ]
    frames = Framer(stream.outbox, limit=MAX_BATCH_MESSAGES if stream.batches else 1)
    ended = asyncio.ensure_future(stream.ended.wait())
    try:
        while (messages := await frames.next()) is not None:
            # A write waits for the sidecar to take it (HTTP/2 flow
            # control); one that does not read would hold the stream open
            # for ever, so the end of the stream ends the wait.
            write = asyncio.ensure_future(context.write(frame(messages, _response_batch)))
            await asyncio.wait((write, ended), return_when=asyncio.FIRST_COMPLETED)
            if not write.done():
                write.cancel()
                break
            write.result()
    finally:
        ended.cancel()
        stream.close()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        stream.leases.close()
        log.info("sidecar %s stream %s closed holding %d", stream.sidecar_id, stream.id, len(stream.leases))
    if stream.failure is not None:
        await context.abort(stream.failure.code, stream.failure.message)
