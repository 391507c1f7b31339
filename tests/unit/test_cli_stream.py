"""`intentd watch ID --stream`, `intentd streams` and `types put
--stream-keep-ms`: parsing and output, against the fake IntentService of
test_stream_client on a real loopback gRPC server."""

from __future__ import annotations

import argparse
import json

import grpc
import pytest

from intentd.client import IntentClient
from intentd.commands import cli
from intentd.generated.v1 import admin_service_pb2 as admin_pb
from intentd.generated.v1 import intent_pb2, stream_pb2
from tests.unit.test_client_unit import FakeAsyncUnary, fake_stub
from tests.unit.test_stream_client import (  # noqa: F401 - fake_fixture is the fixture fake
    FAST,
    ID,
    T0,
    FakeServer,
    fake_fixture,
    final_intent,
    jchunk,
    marker,
    text,
)


@pytest.fixture
def via_fake(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    def client(args: argparse.Namespace) -> IntentClient:
        return IntentClient(fake.address, **FAST)

    monkeypatch.setattr(cli, "_client", client)
    return fake


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def test_watch_stream_parses() -> None:
    bare = parse("watch", ID)
    assert (bare.stream, bare.from_offset, bare.skip_superseded) == (None, None, False)
    default = parse("watch", ID, "--stream")
    assert (default.stream, default.from_offset) == ("default", None)
    named = parse("watch", ID, "--stream", "tokens", "--from", "12", "--skip-superseded", "--json")
    assert (named.fn, named.id, named.stream, named.from_offset, named.skip_superseded, named.json) == (
        cli.cmd_watch, ID, "tokens", 12, True, True)
    assert parse("watch", ID, "--from", "3", "--stream").stream == "default"
    assert parse("streams", ID).fn is cli.cmd_streams
    assert parse("types", "put", "t.x.v1", "--stream-keep-ms", "0").stream_keep_ms == 0


@pytest.mark.parametrize("argv", [
    ["watch", ID, "--from", "3"],
    ["watch", ID, "--skip-superseded"],
    ["watch", ID, "--stream", "--after-seq", "2"],
    ["watch", ID, "--stream", "--from", "-1"],
])
def test_watch_stream_flags_that_do_not_fit(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match="intentd: "):
        cli.main(argv)


def test_watch_stream_prints_text_json_and_markers(via_fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    via_fake.state.append(
        text(0, "Hello"), text(1, ", wor"), jchunk(2, {"tool": "search"}, position=2), text(3, "ld"),
        marker(4, [3, 4], attempt=2), text(5, "again\n", attempt=2, position=3),
        marker(6, [3], attempt=2, reason=stream_pb2.SUPERSEDE_REASON_STEP_RETRIED), text(7, "tail", position=3),
    )
    via_fake.state.breaks = [3]  # a reconnect mid-way changes nothing in the output
    via_fake.state.finish(final_intent())
    assert cli.main(["watch", ID, "--stream", "answer", "--skip-superseded"]) == 0
    out, err = capsys.readouterr()
    assert out == 'Hello, wor\n{"tool": "search"}\nldagain\ntail\n'
    assert err.splitlines() == [
        "[superseded by attempt 2 (redelivered): positions 3, 4]",
        "[superseded by attempt 2 (step retried): position 3]",
        f"[intent {ID} COMPLETED; next offset 8]",
    ]
    assert [(r.stream, r.from_offset, r.skip_superseded) for r in via_fake.state.requests] == [
        ("answer", 0, True), ("answer", 4, True)]


def test_watch_stream_from_an_offset_ends_with_the_state(via_fake: FakeServer,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    via_fake.state.append(text(0, "a"), text(1, "b\n"))
    error = intent_pb2.IntentError(code="BOOM", message="it broke")
    via_fake.state.finish(final_intent(state=intent_pb2.INTENT_STATE_FAILED, error=error))
    assert cli.main(["watch", ID, "--stream", "--from", "1"]) == 0
    out, err = capsys.readouterr()
    assert out == "b\n"  # ended with its newline: none added
    assert err == f"[intent {ID} FAILED: BOOM: it broke; next offset 2]\n"
    assert via_fake.state.requests[0].from_offset == 1
    assert via_fake.state.requests[0].stream == "default"


def test_watch_stream_json_lines(via_fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    via_fake.state.append(text(0, "hi", position=1), jchunk(1, [1, 2], position=2), marker(2, [2]))
    via_fake.state.finish(final_intent(state=intent_pb2.INTENT_STATE_CANCELED))
    assert cli.main(["watch", ID, "--stream", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == [
        {"offset": 0, "attempt": 1, "position": 1, "format": "text", "data": "hi"},
        {"offset": 1, "attempt": 1, "position": 2, "format": "json", "data": [1, 2]},
        {"offset": 2, "attempt": 2, "position": 0, "superseded": {"positions": [2], "reason": "REDELIVERED"}},
        {"end": "CANCELED", "next_offset": 3},
    ]
    assert err == ""


def test_watch_stream_error_after_text_ends_the_line(via_fake: FakeServer,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    via_fake.state.append(text(0, "partial"))
    via_fake.state.breaks = [0]
    # The reconnect after the break is refused: the stream was pruned meanwhile.
    via_fake.state.refuse_call[2] = grpc.StatusCode.FAILED_PRECONDITION
    assert cli.main(["watch", ID, "--stream"]) == 1
    out, err = capsys.readouterr()
    assert out == "partial\n"
    assert err == "intentd: FAILED_PRECONDITION: refused by the fake\n"


def test_streams_lists_them(via_fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    info = stream_pb2.StreamInfo(name="default", next_offset=12, bytes=345)
    info.create_time.FromDatetime(T0)
    info.update_time.FromDatetime(T0)
    via_fake.state.infos = [info, stream_pb2.StreamInfo(name="tokens", next_offset=3, bytes=9, pruned=True)]
    assert cli.main(["streams", ID]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ENTRIES", "BYTES", "CREATED", "UPDATED"]
    assert lines[1].split() == ["default", "12", "345", "2026-01-02", "03:04:05", "2026-01-02", "03:04:05"]
    assert lines[2].split() == ["tokens", "3", "9", "-", "-", "pruned"]
    assert cli.main(["streams", ID, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["streams"]
    assert shown[0] == {"name": "default", "next_offset": 12, "bytes": 345, "pruned": False,
                        "create_time": T0.isoformat(), "update_time": T0.isoformat()}
    assert (shown[1]["name"], shown[1]["pruned"], shown[1]["create_time"]) == ("tokens", True, None)
    via_fake.state.infos = []
    assert cli.main(["streams", ID]) == 0
    assert capsys.readouterr().out == f"intent {ID} has no streams yet\n"


def test_types_put_passes_stream_keep_ms(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    put = FakeAsyncUnary(admin_pb.PutIntentTypeResponse(
        intent_type=admin_pb.IntentType(intent_type="t.x.v1", stream_keep_ms=0)), [])

    def client(args: argparse.Namespace) -> IntentClient:
        c = IntentClient("127.0.0.1:1", **FAST)
        c._aio._admin_instance = fake_stub(PutIntentType=put)
        return c

    monkeypatch.setattr(cli, "_client", client)
    assert cli.main(["types", "put", "t.x.v1", "--stream-keep-ms", "0"]) == 0
    sent = put.calls[0][0].intent_type
    assert sent.HasField("stream_keep_ms") and sent.stream_keep_ms == 0
    assert "stream_keep_ms=0" in capsys.readouterr().out
    assert cli.main(["types", "put", "t.x.v1"]) == 0
    assert not put.calls[1][0].intent_type.HasField("stream_keep_ms")
