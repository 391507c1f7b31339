"""Streams with real processes: a real server (two, for the replica test),
real sidecars supervising the stream test agent (tests/agents/stream_agent.py),
real SIGKILL, and readers through the client SDK. What is checked is what a
reader sees: every offset once and in order, across reconnects at any
offset, across a crash and its redelivery (what a reader saw before the
crash is still there after it; the chunks of the step that re-runs are
superseded by a marker, never silently repeated), whatever other readers do."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intentd.client import IntentClient, IntentState
from intentd.generated.v1 import admin_service_pb2, admin_service_pb2_grpc
from tests.agents.stream_agent import flood_chunk, token
from tests.e2e.test_node_examples import CLIENT_JS
from tests.integration.test_metrics_live import scrape
from tests.support import free_port, sql

AGENT = "tests.agents.stream_agent"
ROLES = ("tokens", "flood", "limits")


class Streams:
    """One test's intent types (a prefix of its own), its server and sidecars."""

    def __init__(self, cluster: Any, server: Any = None, **type_settings: Any) -> None:
        self.cluster = cluster
        self.server = server or cluster.server()
        self.prefix = f"test.stream.s{uuid.uuid4().hex[:8]}"
        with grpc.insecure_channel(self.server.address) as channel:
            stub = admin_service_pb2_grpc.AdminServiceStub(channel)
            for role in ROLES:
                stub.PutIntentType(admin_service_pb2.PutIntentTypeRequest(intent_type=admin_service_pb2.IntentType(
                    intent_type=self.type(role), **type_settings)))

    def type(self, role: str) -> str:
        return f"{self.prefix}.{role}.v1"

    def sidecar(self, capacity: int = 4) -> Any:
        return self.cluster.sidecar(self.server.address, AGENT, capacity=str(capacity),
                                    TEST_AGENT_CAPACITY=str(capacity), TEST_STREAM_PREFIX=self.prefix)

    def send(self, client: IntentClient, role: str, **payload: Any) -> str:
        return client.send_intent(intent_type=self.type(role), to_agent=self.cluster.address, payload=payload,
                                  max_attempts=int(payload.pop("max_attempts", 0)))

    def finish(self, client: IntentClient, intent_id: str, timeout: float = 90) -> Any:
        final = client.wait_for(intent_id, timeout=timeout)
        assert final.state is IntentState.COMPLETED, (final.state, final.error, self.cluster.logs()[-6000:])
        return final


def read_all(client: IntentClient, intent_id: str, **kw: Any) -> tuple[list[Any], Any]:
    reader = client.stream(intent_id, **kw)
    entries = list(reader)
    return entries, reader


def chunks(entries: list[Any]) -> list[Any]:
    return [e for e in entries if not e.is_marker]


def frames_of(cluster: Any, intent_id: str) -> int:
    return int(sql(cluster.db, "SELECT count(*) AS n FROM stream_frames WHERE intent_id = $1", intent_id)[0]["n"])


def test_a_reader_sees_the_chunks_across_an_agent_sigkill_and_the_redelivery(cluster, tmp_path: Path) -> None:
    streams = Streams(cluster, heartbeat_timeout_ms=1500)
    streams.sidecar()
    marks = tmp_path / "marks"
    marks.mkdir()
    with IntentClient(streams.server.address) as client:
        intent_id = streams.send(client, "tokens", steps=3, count=20, kill_in_step=2, kill_after=10,
                                 kill_marks=str(marks))
        live, reader = read_all(client, intent_id)  # follows from the start, across the crash
        final = streams.finish(client, intent_id)
        assert final.attempt == 2 and (marks / intent_id).exists()
        assert reader.intent.state is IntentState.COMPLETED
        assert [e.offset for e in live] == list(range(len(live)))  # every offset once, in order
        assert reader.next_offset == len(live)
        # Attempt 1: the body's start (position 1, before step 1), step 1 whole,
        # step 2 up to the kill; each committed before the kill, so seen by the reader.
        first = [(e.attempt, e.position, e.data) for e in live[:31]]
        assert first == ([(1, 1, {"phase": "start"})] + [(1, 1, token(1, i)) for i in range(20)]
                         + [(1, 2, token(2, i)) for i in range(10)])
        # Attempt 2 begins: its ack supersedes step 2's chunks (not recorded by
        # attempt 1); the body's start and step 1 (recorded) are not repeated.
        marker = live[31]
        assert marker.is_marker and marker.attempt == 2
        assert marker.superseded.positions == (2,) and marker.superseded.reason == "REDELIVERED"
        rest = [(e.attempt, e.position, e.data) for e in live[32:]]
        assert rest == ([(2, 2, token(2, i)) for i in range(20)] + [(2, 3, token(3, i)) for i in range(20)]
                        + [(2, 4, {"phase": "done"})])
        # Nothing a reader saw was lost: reading again gives the same entries.
        again, _ = read_all(client, intent_id)
        assert [(e.offset, e.attempt, e.position, e.raw) for e in again] == [
            (e.offset, e.attempt, e.position, e.raw) for e in live]
        # A reader asking only for what stands: attempt 1's step 2 is left out.
        current, _ = read_all(client, intent_id, skip_superseded=True)
        assert [e.data for e in chunks(current)] == ([{"phase": "start"}] + [token(1, i) for i in range(20)]
                                                     + [token(2, i) for i in range(20)]
                                                     + [token(3, i) for i in range(20)] + [{"phase": "done"}])


def test_readers_reconnecting_at_random_offsets_get_every_later_chunk_once(cluster) -> None:
    streams = Streams(cluster)
    streams.sidecar()
    count = 300
    expected = [{"phase": "start"}] + [token(1, i) for i in range(count)] + [{"phase": "done"}]
    with IntentClient(streams.server.address) as client:
        # Paced, so the first examples read while it is live and the later ones after its end.
        intent_id = streams.send(client, "tokens", steps=1, count=count, pace_ms=5)

        @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(start=st.integers(0, len(expected)), cuts=st.lists(st.integers(1, 60), max_size=8))
        def read_in_pieces(start: int, cuts: list[int]) -> None:
            seen: list[Any] = []
            offset = start
            for cut in [*cuts, None]:  # None: the last reader reads to the end
                reader = client.stream(intent_id, from_offset=offset)
                got = 0
                with contextlib.closing(reader):
                    for entry in reader:
                        seen.append(entry)
                        got += 1
                        if cut is not None and got >= cut:
                            break
                offset = start + len(seen)
                if offset >= len(expected):
                    break
            assert [e.offset for e in seen] == list(range(start, len(expected)))
            assert [e.data for e in seen] == expected[start:]

        read_in_pieces()
        streams.finish(client, intent_id)


def test_a_reader_that_stops_reading_slows_neither_the_agent_nor_another_reader(cluster) -> None:
    streams = Streams(cluster)
    streams.sidecar()
    count = 5000
    with IntentClient(streams.server.address) as client:
        intent_id = streams.send(client, "flood", count=count)
        slow = client.stream(intent_id)
        slow_entries = [next(iter(slow))]  # then it reads nothing until the agent is done
        fast, _ = read_all(client, intent_id)
        final = streams.finish(client, intent_id)
        assert final.result == {"count": count}
        assert [e.data for e in fast] == [flood_chunk(i, 20) for i in range(count)]
        # The agent finished while the slow reader sat at its first entry; it still gets everything, once.
        slow_entries += list(slow)
        assert [e.offset for e in slow_entries] == list(range(count))
        assert slow.intent.state is IntentState.COMPLETED


def test_a_reader_on_another_replica_follows_the_stream_live(cluster, tmp_path: Path) -> None:
    near = cluster.server()
    far = cluster.server()
    streams = Streams(cluster, near)
    streams.sidecar()
    gate = tmp_path / "gate"
    with IntentClient(streams.server.address) as client, IntentClient(far.address) as remote:
        intent_id = streams.send(client, "tokens", steps=2, count=50, block_until=str(gate))
        reader = remote.stream(intent_id)
        entries = iter(reader)
        seen = [next(entries), next(entries)]  # the start and step 1's first chunk, while the agent waits
        assert client.get(intent_id).state is IntentState.IN_PROGRESS
        gate.write_text("go")
        seen += list(entries)
        streams.finish(client, intent_id)
        assert [e.data for e in seen] == ([{"phase": "start"}] + [token(1, i) for i in range(50)]
                                          + [token(2, i) for i in range(50)] + [{"phase": "done"}])
        assert [e.offset for e in seen] == list(range(len(seen)))


def test_stream_limits_refuse_the_write_that_passes_them_and_nothing_else(cluster) -> None:
    server = cluster.server(INTENTD_STREAM_MAX_BYTES="4096")
    streams = Streams(cluster, server)
    streams.sidecar()
    with IntentClient(server.address) as client:
        intent_id = streams.send(client, "limits", chunks=60, size=100, oversize=True)
        final = streams.finish(client, intent_id)
        refused = final.result["refused"]
        assert refused[0] == "oversize:RESOURCE_EXHAUSTED"  # refused at the emit, nothing sent
        assert refused[1:] and all(r.endswith(":RESOURCE_EXHAUSTED") for r in refused[1:])
        a, _ = read_all(client, intent_id, stream="a")
        b, _ = read_all(client, intent_id, stream="b")
        # Writes of 10 chunks (1,000 bytes): four fit in 4,096 bytes, each later one is refused whole.
        assert [e.data for e in a] == [flood_chunk(i, 100) for i in range(40)]
        assert len(refused) == 1 + 2  # the oversize chunk, then the two refused writes (raised once each)
        # The refusal cost nothing else: the step was recorded, the other stream and the result stand.
        assert [e.data for e in b] == ["after"]
        assert final.steps_completed == 1


def test_a_stream_of_100000_chunks_arrives_whole_in_few_rows(cluster) -> None:
    streams = Streams(cluster)
    streams.sidecar()
    count = 100_000
    with IntentClient(streams.server.address) as client:
        intent_id = streams.send(client, "flood", count=count)
        received = 0
        ordered = True
        reader = client.stream(intent_id)
        for entry in reader:
            ordered = ordered and entry.offset == received and entry.data == flood_chunk(received, 20)
            received += 1
        streams.finish(client, intent_id, timeout=180)
        assert ordered and received == count
        assert reader.intent.state is IntentState.COMPLETED
        # Rows are appends (frames), not chunks.
        assert frames_of(cluster, intent_id) <= count // 10


def test_two_live_readers_of_one_stream_get_the_same_entries(cluster) -> None:
    streams = Streams(cluster)
    streams.sidecar()
    with IntentClient(streams.server.address) as client:
        intent_id = streams.send(client, "tokens", steps=2, count=200, pace_ms=1)
        results: list[list[Any]] = [[], []]

        def read(into: list[Any]) -> None:
            into.extend((e.offset, e.raw) for e in client.stream(intent_id))

        threads = [threading.Thread(target=read, args=(r,)) for r in results]
        for t in threads:
            t.start()
        streams.finish(client, intent_id)
        for t in threads:
            t.join(60)
        assert results[0] == results[1] and len(results[0]) == 402


def test_the_node_client_reads_a_stream_live(cluster, node: str) -> None:
    streams = Streams(cluster)
    streams.sidecar()
    with IntentClient(streams.server.address) as client:
        intent_id = streams.send(client, "tokens", steps=2, count=30, pace_ms=2)
        reader = subprocess.Popen([node, str(CLIENT_JS), "stream", intent_id], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "INTENTD_SERVER": streams.server.address})
        out, err = reader.communicate(timeout=90)
        assert reader.returncode == 0, err
        streams.finish(client, intent_id)
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert lines[-1] == {"end": "COMPLETED"}
    entries = lines[:-1]
    assert [e["offset"] for e in entries] == list(range(len(entries)))
    assert [e["data"] for e in entries] == ([{"phase": "start"}] + [token(1, i) for i in range(30)]
                                            + [token(2, i) for i in range(30)] + [{"phase": "done"}])
    assert {e["format"] for e in entries} == {"text", "json"} and all(e["attempt"] == 1 for e in entries)


def test_an_agent_faster_than_the_rate_limit_is_paced_and_loses_nothing(cluster) -> None:
    port = free_port()
    server = cluster.server(INTENTD_STREAM_MAX_CHUNKS_PER_S="1000", INTENTD_METRICS_LISTEN=f"127.0.0.1:{port}")
    streams = Streams(cluster, server)
    streams.sidecar()
    count = 2500
    with IntentClient(server.address) as client:
        intent_id = streams.send(client, "flood", count=count)
        got, reader = read_all(client, intent_id)
        final = streams.finish(client, intent_id)
    assert final.result == {"count": count} and reader.intent.state is IntentState.COMPLETED
    assert [e.data for e in got] == [flood_chunk(i, 20) for i in range(count)]
    # The control plane did refuse writes (RESOURCE_EXHAUSTED): the SDK sent them again after the window.
    refused = scrape(f"http://127.0.0.1:{port}/metrics").get('intentd_writes_total{code="RESOURCE_EXHAUSTED",op="emit"}')
    assert refused is not None and refused >= 1


def test_intentd_watch_stream_prints_the_tokens(cluster) -> None:
    streams = Streams(cluster)
    streams.sidecar()
    with IntentClient(streams.server.address) as client:
        intent_id = streams.send(client, "tokens", steps=2, count=25, pace_ms=1)
        done = subprocess.run([sys.executable, "-m", "intentd.commands", "watch", intent_id, "--stream",
                               "--target", streams.server.address], capture_output=True, text=True, timeout=90)
        streams.finish(client, intent_id)
    assert done.returncode == 0, done.stderr
    # Text chunks as they are, JSON chunks on lines of their own; the end on stderr.
    lines = done.stdout.splitlines()
    assert json.loads(lines[0]) == {"phase": "start"}
    assert lines[1] == "".join(token(1, i) for i in range(25)) + "".join(token(2, i) for i in range(25))
    assert json.loads(lines[2]) == {"phase": "done"}
    assert "COMPLETED" in done.stderr
