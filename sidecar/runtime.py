"""The agent-facing ``AgentRuntimeService``, served on a unix socket or a
loopback port.

Every write is forwarded upstream and answered only after the control plane
committed it; a refusal comes back as the same gRPC status. ``Attach`` is the
agent's stream: when it ends, whatever the agent held is released at once.
A durable wait (``Wait``, or op ``wait`` on the stream; an AGENT wait on
child intents too) is a write like the others, answered resolved or parked;
the dispatcher frees the agent's slot on parked (sidecar/dispatch.py). A start
of child intents (op ``start_children``) goes only on the stream: it has no
unary call. An emit (``Emit``, or op ``emit`` on the stream) is a write like
the others, checked here for its shape (the limits of one write) and
forwarded; the control plane checks the rest (docs/streams.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import grpc

from intentd.core.codes import INVALID_ARGUMENT, RETRY_AFTER_KEY, status_of
from intentd.core.errors import ValidationError
from intentd.core.framing import CHANNEL_OPTIONS, MAX_BATCH_MESSAGES, Framer, frame
from intentd.core.limits import (
    MAX_CHILDREN_PER_START,
    MAX_CHUNK_BYTES,
    MAX_EMIT_BYTES,
    MAX_EMIT_CHUNKS,
    MAX_INTENT_TYPES,
)
from intentd.core.streams import stream_name_problem
from intentd.core.validation import check_intent_type
from intentd.core.waits import RESERVED_PREFIX, start_record_name
from intentd.generated.v1 import agent_service_pb2, delivery_pb2, runtime_pb2, runtime_pb2_grpc

from .dispatch import AttachedAgent, Dispatcher
from .errors import LeaseNotHeld, RecordedStepMismatch, StepsUnavailable
from .settings import unix_socket_path

log = logging.getLogger("intentd.sidecar.runtime")

# The writes an agent may make (release is the sidecar's own).
AGENT_WRITE_OPS = frozenset({"step", "checkpoint", "progress", "complete", "fail", "wait", "start_children",
                             "emit"})
# A start's record name (docs/children.md); the control plane checks the rest.
START_PREFIX = start_record_name("")
MAX_CHILDREN = MAX_CHILDREN_PER_START


class _UnaryWrite(Protocol):
    """A unary write request: the lease, and the write in the field its op names."""

    @property
    def lease(self) -> delivery_pb2.Lease: ...


class AgentRuntime(runtime_pb2_grpc.AgentRuntimeServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def Attach(
        self, request_iterator: AsyncIterator[runtime_pb2.AttachRequest], context: Any
    ) -> AsyncIterator[runtime_pb2.AttachResponse]:
        requests = request_iterator.__aiter__()
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        if first.WhichOneof("msg") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first Attach message must be hello")
        hello = first.hello
        if len(hello.intent_types) > MAX_INTENT_TYPES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"hello.intent_types: at most {MAX_INTENT_TYPES} intent types")
        try:
            for intent_type in hello.intent_types:
                check_intent_type(intent_type, "hello.intent_types")
        except ValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if hello.capacity < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hello.capacity must not be negative")
        agent = self._dispatcher.attach(hello.intent_types, hello.capacity, language=hello.language,
                                        peer=context.peer(), fetches_steps=hello.fetches_steps)
        reader = asyncio.create_task(self._read(agent, requests), name=f"agent-{agent.id}-read")
        frames = Framer(agent.outbox, limit=MAX_BATCH_MESSAGES if hello.accepts_batches else 1)
        try:
            yield runtime_pb2.AttachResponse(welcome=runtime_pb2.AgentWelcome(stream_writes=True, accepts_batches=True))
            while (messages := await frames.next()) is not None:
                yield frame(messages, _response_batch)
        finally:
            reader.cancel()
            # Also runs when the agent vanished (the handler is cancelled then).
            self._dispatcher.detach(agent)

    async def _read(self, agent: AttachedAgent, requests: AsyncIterator[runtime_pb2.AttachRequest]) -> None:
        # Writes run to their answer even if the stream ends meanwhile; kept
        # here so they are not garbage-collected mid-flight.
        writes: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                kind = request.WhichOneof("msg")
                if kind == "batch":
                    for inner in request.batch.messages:
                        self._handle(agent, inner, inner.WhichOneof("msg"), writes)
                else:
                    self._handle(agent, request, kind, writes)
            log.info("agent %d closed its Attach stream", agent.id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The usual way a killed agent shows up; its stream ends below.
            log.info("agent %d stream broke: %r", agent.id, exc)
        finally:
            agent.close()

    def _handle(self, agent: AttachedAgent, request: runtime_pb2.AttachRequest, kind: str | None,
                writes: set[asyncio.Task[None]]) -> None:
        if kind == "ack":
            self._dispatcher.ack(agent, request.ack.lease)
        elif kind == "write":
            task = asyncio.create_task(self._stream_write(agent, request.write))
            writes.add(task)
            task.add_done_callback(writes.discard)
        else:
            log.warning("agent %d sent %s after hello; ignored", agent.id, kind)

    async def _stream_write(self, agent: AttachedAgent, request: agent_service_pb2.WriteRequest) -> None:
        result = await self._forward(request.write)
        result.request_id = request.request_id
        agent.send(runtime_pb2.AttachResponse(write_result=result))

    async def _forward(self, write: delivery_pb2.IntentWrite) -> agent_service_pb2.WriteResult:
        """An agent's write, answered by the control plane after its commit,
        or refused here (INVALID_ARGUMENT) when it is malformed."""
        op = write.WhichOneof("op")
        if op not in AGENT_WRITE_OPS:
            problem = f"write.op must be one of {', '.join(sorted(AGENT_WRITE_OPS))}"
        elif op == "step" and (write.step.index < 1 or not write.step.name):
            problem = "step needs a 1-based index and a name"
        elif op == "step" and write.step.name.startswith(RESERVED_PREFIX):
            problem = f"step names starting with {RESERVED_PREFIX!r} are reserved for waits"
        elif op == "wait" and (write.wait.index < 1 or not write.wait.step_name.startswith(RESERVED_PREFIX)
                               or not write.wait.kind):
            problem = f"wait needs a 1-based index, a kind and its record name (starting with {RESERVED_PREFIX!r})"
        elif op == "start_children" and (write.start_children.index < 1
                                         or not write.start_children.step_name.startswith(START_PREFIX)):
            problem = f"start_children needs a 1-based index and its record name (starting with {START_PREFIX!r})"
        elif op == "start_children" and not 1 <= len(write.start_children.children) <= MAX_CHILDREN:
            problem = f"start_children takes 1 to {MAX_CHILDREN} children"
        elif op == "emit" and (malformed := emit_problem(write.emit)) is not None:
            problem = malformed
        elif not write.lease.intent_id or not write.lease.token:
            problem = "lease (intent_id and token) is required"
        else:
            return await self._dispatcher.write(write)
        return agent_service_pb2.WriteResult(code=INVALID_ARGUMENT, message=problem)

    async def BeginStep(self, request: runtime_pb2.BeginStepRequest, context: Any) -> runtime_pb2.BeginStepResponse:
        if request.index < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "index is 1-based")
        try:
            _check_lease(request.lease)
            record = await self._dispatcher.begin_step(request.lease, request.index, request.name,
                                                       any_name=request.any_name)
        except (RecordedStepMismatch, LeaseNotHeld) as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StepsUnavailable as exc:
            await context.abort(status_of(exc.code), f"recorded steps could not be fetched: {exc.message}")
        if record is None:
            return runtime_pb2.BeginStepResponse(recorded=False)
        return runtime_pb2.BeginStepResponse(recorded=True, step=record)

    async def RecordStep(self, request: runtime_pb2.RecordStepRequest,
                         context: Any) -> runtime_pb2.RecordStepResponse:
        result = await self._write(context, request, "step")
        return runtime_pb2.RecordStepResponse(step=result.step)

    async def SaveCheckpoint(self, request: runtime_pb2.SaveCheckpointRequest,
                             context: Any) -> runtime_pb2.SaveCheckpointResponse:
        await self._write(context, request, "checkpoint")
        return runtime_pb2.SaveCheckpointResponse()

    async def ReportProgress(self, request: runtime_pb2.ReportProgressRequest,
                             context: Any) -> runtime_pb2.ReportProgressResponse:
        await self._write(context, request, "progress")
        return runtime_pb2.ReportProgressResponse()

    async def CompleteIntent(self, request: runtime_pb2.CompleteIntentRequest,
                             context: Any) -> runtime_pb2.CompleteIntentResponse:
        await self._write(context, request, "complete")
        return runtime_pb2.CompleteIntentResponse()

    async def FailIntent(self, request: runtime_pb2.FailIntentRequest,
                         context: Any) -> runtime_pb2.FailIntentResponse:
        await self._write(context, request, "fail")
        return runtime_pb2.FailIntentResponse()

    async def Wait(self, request: runtime_pb2.WaitRequest, context: Any) -> runtime_pb2.WaitResponse:
        result = await self._write(context, request, "wait")
        return runtime_pb2.WaitResponse(outcome=result.wait)

    async def Emit(self, request: runtime_pb2.EmitRequest, context: Any) -> runtime_pb2.EmitResponse:
        result = await self._write(context, request, "emit")
        return runtime_pb2.EmitResponse(outcome=result.emit)

    async def _write(self, context: Any, request: _UnaryWrite, op: str) -> agent_service_pb2.WriteResult:
        """The unary calls: each is the stream's write of one op (a field of
        the same name on request and IntentWrite), a refusal as the call's status."""
        result = await self._forward(delivery_pb2.IntentWrite(lease=request.lease, **{op: getattr(request, op)}))
        if result.code != 0:
            if result.retry_after_ms:
                # The unary form of WriteResult.retry_after_ms, as the control plane's own calls send it.
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(result.retry_after_ms)),))
            await context.abort(status_of(result.code), result.message or "refused by the control plane")
        return result


def emit_problem(emit: delivery_pb2.EmitWrite) -> str | None:
    """Why an emit is malformed as one write, or None (what a chunk's data
    must be, and the intent's limits, the control plane checks)."""
    name = stream_name_problem(emit.stream)
    if name is not None:
        return f"emit.stream {name}"
    if not emit.chunks and not emit.supersede_positions:
        return "emit needs chunks or supersede_positions"
    if len(emit.chunks) > MAX_EMIT_CHUNKS:
        return f"emit.chunks: at most {MAX_EMIT_CHUNKS} chunks in one write"
    size = 0
    for number, chunk in enumerate(emit.chunks):
        if len(chunk.data) > MAX_CHUNK_BYTES:
            return f"emit.chunks[{number}].data: at most {MAX_CHUNK_BYTES} bytes"
        if chunk.position < 1:
            return f"emit.chunks[{number}].position is 1-based"
        size += len(chunk.data)
    if size > MAX_EMIT_BYTES:
        return f"emit.chunks: at most {MAX_EMIT_BYTES} bytes of data in one write"
    if any(position < 1 for position in emit.supersede_positions):
        return "emit.supersede_positions are 1-based"
    return None


def _response_batch(messages: list[runtime_pb2.AttachResponse]) -> runtime_pb2.AttachResponse:
    return runtime_pb2.AttachResponse(batch=runtime_pb2.AttachResponseBatch(messages=messages))


def _check_lease(lease: delivery_pb2.Lease) -> None:
    # BeginStep is answered locally, so a missing lease reads as "not held".
    if not lease.token:
        raise LeaseNotHeld("lease is required")


class RuntimeServer:
    """The gRPC server agents connect to."""

    def __init__(self, dispatcher: Dispatcher, listen: str) -> None:
        self._dispatcher = dispatcher
        self.listen = listen
        self.address: str | None = None
        self._server: Any = None
        self._socket: Path | None = None

    async def start(self) -> str:
        """Binds and serves; returns the address agents dial
        (``unix:///path`` or ``127.0.0.1:PORT``)."""
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        runtime_pb2_grpc.add_AgentRuntimeServiceServicer_to_server(AgentRuntime(self._dispatcher), server)
        path = unix_socket_path(self.listen)
        if path is not None:
            _clear_stale_socket(path)
            # grpc binds here; the umask makes the socket 0600 from its first
            # instant, so no other user can connect in between.
            old = os.umask(0o177)
            try:
                bound = server.add_insecure_port(f"unix://{path}")
            finally:
                os.umask(old)
            if bound == 0:
                raise OSError(f"cannot listen on unix socket {path}")
            os.chmod(path, 0o600)
            self._socket = path
            self.address = f"unix://{path}"
        else:
            port = server.add_insecure_port(self.listen)
            if port == 0:
                raise OSError(f"cannot listen on {self.listen}")
            self.address = f"{self.listen.rpartition(':')[0]}:{port}"
        await server.start()
        self._server = server
        return self.address

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            # Cancels Attach streams still open after the grace: they detach.
            await self._server.stop(grace)
            self._server = None
        if self._socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self._socket.unlink()
            self._socket = None


def _clear_stale_socket(path: Path) -> None:
    """Removes a socket left by a dead process; refuses to touch anything else."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
    if info.st_uid != os.getuid():
        raise OSError(errno.EACCES, f"{path} belongs to another user; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by another live process")
