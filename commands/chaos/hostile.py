"""The hostile tenant of a soak: one actor per process, with the agent and
client keys of a tenant of its own, beside the normal workload
(``python -m intentd.commands.chaos.hostile --mode poison|silent|flood ...``).

- ``poison``: a capacity-0 sidecar whose writes are malformed or not its
  own: NUL characters in progress messages, step names, failure messages,
  signal names and lease intent ids, a step passing for a wait's record,
  a human task far past every limit, and well-formed writes (progress,
  waits) for leases it does not hold.
- ``silent``: a sidecar that takes one of its tenant's intents, records one
  big step, then repeats that step write over and over and never reads its
  stream again (each repeat is answered with the full record).
- ``flood``: a sidecar holding its tenant's intents that sends well-formed
  progress writes as fast as its rate allows.

Each actor reconnects when its stream ends and rewrites a JSON summary of
what it sent and what came back (``--summary``) every second, so the harness
reads it even after SIGKILLing it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import queue
import random
import signal
import string
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from intentd.generated.v1 import agent_service_pb2 as apb
from intentd.generated.v1 import agent_service_pb2_grpc as apb_grpc
from intentd.generated.v1 import delivery_pb2 as dpb
from intentd.generated.v1 import intent_pb2 as ipb

MODES = ("poison", "silent", "flood")
HOSTILE_TYPE = "chaos.hostile.run.v1"
# The poison variants, cycled through in order.
POISON_KINDS = ("nul_progress", "nul_step_name", "nul_fail_message", "nul_intent_id", "foreign_lease",
                "nul_signal_name", "reserved_step_name", "foreign_wait", "huge_task")
_CODE_NAMES: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}
_ID_CHARS = string.digits + "abcdefghjkmnpqrstvwxyz"


def _fake_id(rng: random.Random) -> str:
    return "01" + "".join(rng.choice(_ID_CHARS) for _ in range(24))


class Stats:
    def __init__(self, mode: str, path: Path) -> None:
        self.mode = mode
        self.path = path
        self.lock = threading.Lock()
        self.sent: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()
        self.stream_ends: Counter[str] = Counter()
        self.connects = 0
        self.assignments = 0
        self.notes: list[str] = []
        self.started_at = time.time()

    def dump(self) -> None:
        with self.lock:
            data: dict[str, Any] = {
                "mode": self.mode, "started_at": self.started_at, "updated_at": time.time(),
                "sent": dict(self.sent), "answers": dict(self.answers), "stream_ends": dict(self.stream_ends),
                "connects": self.connects, "assignments": self.assignments, "notes": self.notes[-5:],
            }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)


class Stream:
    """One Connect stream fed from a queue; ``reading`` False stops reading it."""

    def __init__(self, args: argparse.Namespace, stats: Stats, capacity: int) -> None:
        self.stats = stats
        self.requests: queue.Queue[apb.ConnectRequest | None] = queue.Queue()
        self.channel = grpc.insecure_channel(args.server, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.requests.put(apb.ConnectRequest(register=apb.Register(
            sidecar_id=f"hostile-{args.mode}-{uuid.uuid4().hex[:6]}", addresses=[args.address],
            intent_types=[HOSTILE_TYPE], capacity=capacity)))
        self.call = apb_grpc.AgentServiceStub(self.channel).Connect(
            self._iterate(), metadata=[("authorization", f"Bearer {args.agent_key}")])
        self.assignments: queue.Queue[dpb.Lease] = queue.Queue()
        self.closed = threading.Event()
        self.read_until_assigned = False
        threading.Thread(target=self._read, daemon=True).start()

    def _iterate(self) -> Iterator[apb.ConnectRequest]:
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for frame in self.call:
                replies = list(frame.batch.messages) if frame.WhichOneof("msg") == "batch" else [frame]
                for reply in replies:
                    kind = reply.WhichOneof("msg")
                    if kind == "ping":
                        self.requests.put(apb.ConnectRequest(pong=apb.Pong(nonce=reply.ping.nonce)))
                    elif kind == "write_result":
                        with self.stats.lock:
                            self.stats.answers[_CODE_NAMES.get(reply.write_result.code, "?")] += 1
                    elif kind == "assignment":
                        with self.stats.lock:
                            self.stats.assignments += 1
                        self.requests.put(apb.ConnectRequest(ack=dpb.AckAssignment(lease=reply.assignment.lease)))
                        self.assignments.put(reply.assignment.lease)
                        if self.read_until_assigned:
                            # From here on nothing is read: the server's answers pile up.
                            self.closed.wait()
                            return
            with self.stats.lock:
                self.stats.stream_ends["OK"] += 1  # the server ended it without an error
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            with self.stats.lock:
                self.stats.stream_ends[code.name if code else "UNKNOWN"] += 1
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    details = err.details() if hasattr(err, "details") else ""
                    self.stats.notes.append(f"stream ended {code}: {details}"[:300])
        finally:
            self.closed.set()

    def write(self, request_id: int, write: dpb.IntentWrite, kind: str) -> None:
        with self.stats.lock:
            self.stats.sent[kind] += 1
        self.requests.put(apb.ConnectRequest(write=apb.WriteRequest(request_id=request_id, write=write)))

    def ping(self, nonce: int) -> None:
        self.requests.put(apb.ConnectRequest(ping=apb.Ping(nonce=nonce)))

    def close(self) -> None:
        self.closed.set()
        self.requests.put(None)
        with contextlib.suppress(Exception):
            self.call.cancel()
        self.channel.close()


def _send_own_intents(args: argparse.Namespace, count: int) -> None:
    """Intents of the hostile tenant for its own sidecars to hold."""
    from intentd.client import IntentClient

    with IntentClient(args.server, sender="hostile", max_retries=20,
                      metadata=[("authorization", f"Bearer {args.client_key}")]) as client:
        for _ in range(count):
            client.send_intent(intent_type=HOSTILE_TYPE, to_agent=args.address, payload={"hostile": True},
                               max_attempts=1000)


def _poison(args: argparse.Namespace, stats: Stats, rng: random.Random, stop: threading.Event) -> None:
    request_id = 0
    while not stop.is_set():
        stream = Stream(args, stats, capacity=0)
        with stats.lock:
            stats.connects += 1
        period = 1.0 / max(0.1, args.rate)
        next_at = time.monotonic()
        while not stream.closed.is_set() and not stop.is_set():
            request_id += 1
            kind = POISON_KINDS[request_id % len(POISON_KINDS)]
            lease = dpb.Lease(intent_id=_fake_id(rng), attempt=1, token=str(uuid.uuid4()))
            if kind == "nul_progress":
                write = dpb.IntentWrite(lease=lease, progress=dpb.ProgressWrite(message="po\x00ison", fraction=0.5))
            elif kind == "nul_step_name":
                write = dpb.IntentWrite(lease=lease, step=dpb.StepWrite(index=1, name="st\x00ep", result=b"{}"))
            elif kind == "nul_fail_message":
                write = dpb.IntentWrite(lease=lease, fail=dpb.FailWrite(code="X", message="fa\x00il", retryable=True))
            elif kind == "nul_signal_name":
                write = dpb.IntentWrite(lease=lease, wait=dpb.WaitWrite(
                    index=1, step_name="@signal:g\x00o", kind=ipb.WAIT_KIND_SIGNAL, signal_name="g\x00o"))
            elif kind == "reserved_step_name":
                # Only waits record names from "@": a step may not pass for one.
                write = dpb.IntentWrite(lease=lease, step=dpb.StepWrite(index=1, name="@signal:go", result=b"{}"))
            elif kind == "foreign_wait":
                write = dpb.IntentWrite(lease=lease, wait=dpb.WaitWrite(
                    index=1, step_name="@signal:go", kind=ipb.WAIT_KIND_SIGNAL, signal_name="go", timeout_ms=1000))
            elif kind == "huge_task":
                write = dpb.IntentWrite(lease=lease, wait=dpb.WaitWrite(
                    index=1, step_name="@human:t", kind=ipb.WAIT_KIND_HUMAN,
                    task=dpb.HumanTaskSpec(title="t", outcomes=["o"] * 10_000, form_schema=b"[" * 50_000)))
            elif kind == "nul_intent_id":
                lease.intent_id = lease.intent_id[:10] + "\x00" + lease.intent_id[11:]
                write = dpb.IntentWrite(lease=lease, progress=dpb.ProgressWrite(message="ok", fraction=0.1))
            else:
                write = dpb.IntentWrite(lease=lease, progress=dpb.ProgressWrite(message="not mine", fraction=0.2))
            stream.write(request_id, write, kind)
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            elif delay < -1.0:
                next_at = time.monotonic()  # fell behind (the server pushed back): no burst to catch up
        stream.close()
        stop.wait(0.5)


def _holding(args: argparse.Namespace, stats: Stats, stop: threading.Event, *, silent: bool) -> None:
    request_id = 0
    big = json.dumps({"blob": "x" * (args.step_kib * 1024)}).encode()
    repeats = 0
    while not stop.is_set():
        stream = Stream(args, stats, capacity=1)
        stream.read_until_assigned = silent
        with stats.lock:
            stats.connects += 1
        try:
            lease = stream.assignments.get(timeout=10)
        except queue.Empty:
            stream.close()
            continue
        if silent:
            request_id += 1
            stream.write(request_id, dpb.IntentWrite(lease=lease, step=dpb.StepWrite(index=1, name="big", result=big)),
                         "step")
        period = 1.0 / max(0.1, args.rate)
        next_at = time.monotonic()
        nonce = 0
        while not stop.is_set() and not stream.closed.is_set() and (not silent or repeats < args.repeats):
            request_id += 1
            if silent:
                repeats += 1
                stream.write(request_id, dpb.IntentWrite(
                    lease=lease, step=dpb.StepWrite(index=1, name="big", result=big)), "step_repeat")
            else:
                stream.write(request_id, dpb.IntentWrite(
                    lease=lease, progress=dpb.ProgressWrite(message=f"flood {request_id}", fraction=0.5)), "progress")
            if request_id % 20 == 0:
                nonce += 1
                stream.ping(nonce)  # keeps the stream (and the lease) alive without reading
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            elif delay < -1.0:
                next_at = time.monotonic()
        if silent and repeats >= args.repeats:
            # Done repeating; stay connected, pinging, still not reading.
            while not stop.is_set() and not stream.closed.is_set():
                nonce += 1
                stream.ping(nonce)
                stop.wait(0.2)
        stream.close()
        stop.wait(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m intentd.commands.chaos.hostile")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--server", required=True, help="one control-plane replica HOST:PORT")
    p.add_argument("--address", required=True, help="an agent address of the hostile tenant")
    p.add_argument("--agent-key", required=True)
    p.add_argument("--client-key", required=True)
    p.add_argument("--rate", type=float, default=200.0, help="writes per second")
    p.add_argument("--repeats", type=int, default=1000, help="silent: repeats of the big step")
    p.add_argument("--step-kib", type=int, default=100, help="silent: size of the big step")
    p.add_argument("--summary", type=Path, required=True)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # dies with the harness
    stats = Stats(args.mode, args.summary)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.mode != "poison":
        try:
            _send_own_intents(args, 2)
        except Exception as exc:
            stats.notes.append(f"sending its own intents failed: {type(exc).__name__}: {exc}"[:300])
    rng = random.Random(args.seed)
    if args.mode == "poison":
        worker = threading.Thread(target=_poison, args=(args, stats, rng, stop), daemon=True)
    else:
        worker = threading.Thread(target=_holding, args=(args, stats, stop), kwargs={"silent": args.mode == "silent"},
                                  daemon=True)
    worker.start()
    while not stop.wait(1.0):
        stats.dump()
    stats.dump()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
