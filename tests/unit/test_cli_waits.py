"""Unit tests of the CLI's durable-wait commands (`intentd signal`, `intentd
tasks ...`) and of how `get` and `watch` show waits: parsing, formatting and
exit codes, with the client's calls going to fake stubs (no server)."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from typing import Any

import grpc
import pytest

from intentd.client import IntentClient
from intentd.client.models import event_from_proto, intent_from_proto
from intentd.commands import cli
from intentd.generated.v1 import human_task_pb2 as task_pb
from intentd.generated.v1 import intent_pb2
from intentd.generated.v1 import intent_service_pb2 as pb
from tests.unit.test_client_waits import (
    FAST,
    ID,
    T0,
    TASK,
    FakeUnary,
    _Stub,
    decided_task,
    open_task,
    signal_response,
    ts,
    waiting_intent,
)


@pytest.fixture
def stubs(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The fake methods the CLI's client calls; tests fill in what they need."""
    methods: dict[str, Any] = {}

    def client(args: argparse.Namespace) -> IntentClient:
        c = IntentClient("127.0.0.1:1", **FAST)
        c._aio._stub_instance = _Stub(methods)
        c._aio._tasks_instance = _Stub(methods)
        return c

    monkeypatch.setattr(cli, "_client", client)
    return methods


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


# ---------------------------------------------------------------- parsing


def test_signal_parses() -> None:
    args = parse("signal", ID, "ci.passed", "--payload", '{"sha": "abc"}', "--id", "hook-7", "--target", "h:1")
    assert (args.fn, args.id, args.name, args.payload, args.signal_id, args.target) == (
        cli.cmd_signal, ID, "ci.passed", '{"sha": "abc"}', "hook-7", "h:1")
    bare = parse("signal", ID, "go")
    assert bare.payload is None and bare.signal_id is None and not bare.json


def test_tasks_parse() -> None:
    listed = parse("tasks", "list", "--state", "OPEN", "--state", "decided", "--assignee", "alice",
                   "--type", "intent.demo.deploy.v1", "--intent", ID, "--json")
    assert (listed.fn, listed.action, listed.state, listed.assignee, listed.intent_type, listed.intent,
            listed.json) == (cli.cmd_tasks, "list", ["OPEN", "decided"], "alice", "intent.demo.deploy.v1", ID, True)
    assert parse("tasks", "get", TASK).task == TASK
    decided = parse("tasks", "decide", TASK, "defer", "--comment", "later", "--form", "{}")
    assert (decided.action, decided.task, decided.outcome, decided.comment, decided.form) == (
        "decide", TASK, "defer", "later", "{}")
    approved = parse("tasks", "approve", TASK, "--comment", "ship it", "--target", "h:1")
    assert (approved.action, approved.comment, approved.target, approved.form) == ("approve", "ship it", "h:1", None)
    assert parse("tasks", "reject", TASK).comment == ""
    with pytest.raises(SystemExit):
        parse("tasks", "decide", TASK)  # an outcome is required
    with pytest.raises(SystemExit):
        parse("tasks")


def test_types_put_takes_wait_hold_ms() -> None:
    assert parse("types", "put", "intent.demo.deploy.v1", "--wait-hold-ms", "0").wait_hold_ms == 0


def test_demo_parses_its_story() -> None:
    assert parse("demo").story == "etl"
    args = parse("demo", "approval", "--hold-ms", "50", "--no-color")
    assert (args.story, args.hold_ms, args.no_color) == ("approval", 50, True)
    with pytest.raises(SystemExit):
        parse("demo", "nope")


# ---------------------------------------------------------------- commands over fake stubs


def test_signal_command(stubs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    stubs["SignalIntent"] = send = FakeUnary(signal_response)
    assert cli.main(["signal", ID, "ci.passed", "--payload", '{"sha": "abc"}', "--id", "hook-7"]) == 0
    assert (send.calls[0].name, send.calls[0].payload, send.calls[0].signal_id) == (
        "ci.passed", b'{"sha":"abc"}', "hook-7")
    out = capsys.readouterr().out
    assert out == f"signal hook-7 'ci.passed' -> intent {ID} (PENDING): satisfied the wait at step 4\n"
    assert cli.main(["signal", ID, "ci.passed", "--json"]) == 0
    sent = json.loads(capsys.readouterr().out)
    assert sent["created"] is True and sent["signal"]["name"] == "ci.passed" and sent["signal"]["payload"] is None
    assert sent["intent"]["id"] == ID and send.calls[1].signal_id  # made up by the client


def test_signal_kept_in_the_inbox_and_repeated(stubs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    stubs["SignalIntent"] = FakeUnary(pb.SignalIntentResponse(
        intent=intent_pb2.Intent(id=ID, state=intent_pb2.INTENT_STATE_IN_PROGRESS),
        signal=pb.Signal(id="s1", name="go"), created=False))
    assert cli.main(["signal", ID, "go"]) == 0
    out = capsys.readouterr().out
    assert "kept in the intent's inbox" in out and "not delivered again" in out


def test_errors_print_the_status_and_exit_1(stubs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    stubs["SignalIntent"] = FakeUnary(None, [grpc.StatusCode.FAILED_PRECONDITION])
    assert cli.main(["signal", ID, "go"]) == 1
    assert capsys.readouterr().err == "intentd: FAILED_PRECONDITION: fake\n"
    assert cli.main(["signal", ID, "no spaces"]) == 1  # refused before any call
    assert capsys.readouterr().err.startswith("intentd: INVALID_ARGUMENT: name: ")
    stubs["DecideHumanTask"] = FakeUnary(None, [grpc.StatusCode.PERMISSION_DENIED])
    assert cli.main(["tasks", "approve", TASK]) == 1
    assert capsys.readouterr().err == "intentd: PERMISSION_DENIED: fake\n"
    stubs["GetHumanTask"] = FakeUnary(None, [grpc.StatusCode.NOT_FOUND])
    assert cli.main(["tasks", "get", TASK]) == 1
    assert capsys.readouterr().err == "intentd: NOT_FOUND: fake\n"


def test_bad_json_flags_exit_with_a_message(stubs: dict[str, Any]) -> None:
    with pytest.raises(SystemExit, match="--payload is not valid JSON"):
        cli.main(["signal", ID, "go", "--payload", "{nope"])
    with pytest.raises(SystemExit, match="--form is not valid JSON"):
        cli.main(["tasks", "decide", TASK, "approve", "--form", "[1,"])


def test_tasks_list(stubs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    stubs["ListHumanTasks"] = listed = FakeUnary(task_pb.ListHumanTasksResponse(
        tasks=[open_task(), open_task(id="t2", assignees=[], due_time=None)], next_page_token="more"))
    assert cli.main(["tasks", "list", "--state", "open", "--assignee", "alice", "--intent", ID,
                     "--type", "intent.demo.deploy.v1"]) == 0
    request = listed.calls[0]
    assert list(request.states) == [task_pb.HUMAN_TASK_STATE_OPEN]
    assert (request.assignee, request.intent_id, request.intent_type) == ("alice", ID, "intent.demo.deploy.v1")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATE", "TITLE", "INTENT", "STEP", "ASSIGNEES", "CREATED", "DUE"]
    assert lines[1].startswith(TASK) and "Deploy to prod?" in lines[1] and "alice,bob" in lines[1]
    assert lines[2].startswith("t2") and lines[2].rstrip().endswith("-")
    assert lines[3] == "(more: --page-token more)"
    assert cli.main(["tasks", "list", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["next_page_token"] == "more" and shown["tasks"][0]["form_schema"] == {"type": "object"}
    assert list(listed.calls[1].states) == []  # the server's default: OPEN


def test_tasks_get_and_decide(stubs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    stubs["GetHumanTask"] = FakeUnary(task_pb.GetHumanTaskResponse(task=open_task()))
    stubs["DecideHumanTask"] = decide = FakeUnary(
        lambda r: task_pb.DecideHumanTaskResponse(task=decided_task(r.outcome)))
    assert cli.main(["tasks", "get", TASK]) == 0
    out = capsys.readouterr().out
    for text in (f"id:          {TASK}", "title:       Deploy to prod?", "state:       OPEN",
                 f"intent:      {ID} (intent.demo.deploy.v1 -> agent://demo/local/deploy), step 6",
                 "outcomes:    approve, reject", "assignees:   alice, bob", 'form:        {"type": "object"}',
                 "due:         2026-03-02 12:00:00"):
        assert text in out
    assert "decision:" not in out
    assert cli.main(["tasks", "approve", TASK, "--comment", "ship it"]) == 0
    out = capsys.readouterr().out
    assert "state:       DECIDED" in out and "decision:    approve by alice at 2026-03-01 12:03:00" in out
    assert "comment:     ship it" in out and 'form data:   {"ticket": "OPS-1"}' in out
    assert (decide.calls[0].outcome, decide.calls[0].comment) == ("approve", "ship it")
    assert cli.main(["tasks", "reject", TASK, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"]["outcome"] == "reject"
    assert cli.main(["tasks", "decide", TASK, "defer", "--form", '{"until": "monday"}']) == 0
    assert (decide.calls[-1].outcome, decide.calls[-1].form_data) == ("defer", b'{"until":"monday"}')


def test_get_shows_what_a_waiting_intent_waits_for(stubs: dict[str, Any],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    stubs["GetIntent"] = FakeUnary(pb.GetIntentResponse(intent=waiting_intent()))
    assert cli.main(["get", ID]) == 0
    out = capsys.readouterr().out
    assert "state:       WAITING" in out
    assert "attempt:     1/3 (1 parked on waits, not counted: 0 used)" in out
    assert "waits for:   a human decision: 'Deploy to prod?' at step 6 (parked, holds no agent)" in out
    assert "  since:     2026-03-01 12:00:00" in out
    assert "  due:       2026-03-02 12:00:00 (then it times out)" in out
    assert f"  task:      {TASK}  (intentd tasks approve {TASK} | intentd tasks reject {TASK})" in out
    assert cli.main(["get", ID, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["parked_attempts"] == 1
    assert shown["waiting"] == {"kind": "HUMAN", "name": "Deploy to prod?", "step_index": 6,
                                "since": T0.isoformat(), "due_time": (T0 + timedelta(days=1)).isoformat(),
                                "task_id": TASK}


def test_get_shows_signal_and_timer_waits(capsys: pytest.CaptureFixture[str]) -> None:
    signal = intent_from_proto(intent_pb2.Intent(
        id=ID, state=intent_pb2.INTENT_STATE_IN_PROGRESS, attempt=1, max_attempts=3, create_time=ts(T0),
        waiting=intent_pb2.WaitInfo(kind=intent_pb2.WAIT_KIND_SIGNAL, name="ci.passed", step_index=3,
                                    since=ts(T0))))
    cli._print_intent(signal, False)
    out = capsys.readouterr().out
    assert "attempt:     1/3\n" in out
    assert "waits for:   the signal 'ci.passed' at step 3 (held by its attempt)" in out and "due:" not in out
    timer = intent_from_proto(intent_pb2.Intent(
        id=ID, state=intent_pb2.INTENT_STATE_WAITING, create_time=ts(T0),
        waiting=intent_pb2.WaitInfo(kind=intent_pb2.WAIT_KIND_TIME, step_index=2, since=ts(T0),
                                    due_time=ts(T0 + timedelta(minutes=10)))))
    cli._print_intent(timer, False)
    out = capsys.readouterr().out
    assert "waits for:   a timer at step 2 (parked, holds no agent)" in out
    assert "  fires:     2026-03-01 12:10:00" in out and "task:" not in out


def event(type_: int, **fields: Any) -> Any:
    return event_from_proto(intent_pb2.IntentEvent(intent_id=ID, seq=7, time=ts(T0), type=type_,  # type: ignore[arg-type]
                                                   state=fields.pop("state", intent_pb2.INTENT_STATE_WAITING),
                                                   **fields))


@pytest.mark.parametrize(("fields", "line"), [
    (dict(type_=intent_pb2.EVENT_TYPE_WAITING, wait_kind=intent_pb2.WAIT_KIND_HUMAN, wait_name="Deploy to prod?",
          step_index=6, attempt=1), "WAITING human 'Deploy to prod?' at step 6"),
    (dict(type_=intent_pb2.EVENT_TYPE_WAITING, wait_kind=intent_pb2.WAIT_KIND_SIGNAL, wait_name="ci.passed",
          step_index=3), "WAITING signal 'ci.passed' at step 3"),
    (dict(type_=intent_pb2.EVENT_TYPE_WAITING, wait_kind=intent_pb2.WAIT_KIND_TIME, step_index=2),
     "WAITING sleep at step 2"),
    (dict(type_=intent_pb2.EVENT_TYPE_SIGNALED, wait_name="ci.passed", signal_id="s1", actor="alice",
          step_index=3), "SIGNALED ci.passed by alice (id s1, satisfied the wait at step 3)"),
    (dict(type_=intent_pb2.EVENT_TYPE_SIGNALED, wait_name="ci.passed", signal_id="s2", actor="alice"),
     "SIGNALED ci.passed by alice (id s2, kept in the inbox)"),
    (dict(type_=intent_pb2.EVENT_TYPE_TASK_CREATED, task_id=TASK, wait_name="Deploy to prod?", step_index=6),
     f"TASK_CREATED 'Deploy to prod?' at step 6 (task {TASK})"),
    (dict(type_=intent_pb2.EVENT_TYPE_TASK_DECIDED, task_id=TASK, message="approve", actor="alice"),
     f"TASK_DECIDED approve by alice (task {TASK})"),
    (dict(type_=intent_pb2.EVENT_TYPE_TIMER_FIRED, wait_kind=intent_pb2.WAIT_KIND_TIME, step_index=2),
     "TIMER_FIRED sleep ended at step 2"),
    (dict(type_=intent_pb2.EVENT_TYPE_TIMER_FIRED, wait_kind=intent_pb2.WAIT_KIND_SIGNAL, wait_name="ci.passed",
          step_index=4, message="TIMEOUT"), "TIMER_FIRED timeout of signal 'ci.passed' at step 4"),
    (dict(type_=intent_pb2.EVENT_TYPE_TASK_REMINDED, task_id=TASK), f"TASK_REMINDED (task {TASK})"),
])
def test_watch_describes_wait_events(fields: dict[str, Any], line: str) -> None:
    e = event(**fields)
    assert cli.describe_wait_event(e) == line
    shown = cli._describe_event(e)
    assert shown.startswith("#7  ") and shown.endswith(line)


def test_other_events_read_as_before_and_name_their_actor() -> None:
    step = event(intent_pb2.EVENT_TYPE_STEP_COMPLETED, step_name="build", step_index=2, attempt=1,
                 state=intent_pb2.INTENT_STATE_IN_PROGRESS)
    assert cli.describe_wait_event(step) is None
    assert cli._describe_event(step).endswith("attempt 1  step 2 build")
    canceled = event(intent_pb2.EVENT_TYPE_CANCELED, message="changed my mind", actor="bob",
                     state=intent_pb2.INTENT_STATE_CANCELED)
    assert cli._describe_event(canceled).endswith("changed my mind  by bob")


def test_watch_prints_wait_events(stubs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from tests.unit.test_client_unit import FakeStream, FakeWatch

    events = [
        intent_pb2.IntentEvent(intent_id=ID, seq=1, time=ts(T0), type=intent_pb2.EVENT_TYPE_WAITING,
                               state=intent_pb2.INTENT_STATE_WAITING, wait_kind=intent_pb2.WAIT_KIND_HUMAN,
                               wait_name="Deploy to prod?", step_index=6, attempt=1),
        intent_pb2.IntentEvent(intent_id=ID, seq=2, time=ts(T0), type=intent_pb2.EVENT_TYPE_TASK_DECIDED,
                               state=intent_pb2.INTENT_STATE_PENDING, task_id=TASK, message="approve",
                               actor="alice"),
    ]
    stream = [pb.WatchIntentResponse(event=e) for e in events]
    stubs["WatchIntent"] = FakeWatch([FakeStream(stream, None), FakeStream(stream, None)])
    assert cli.main(["watch", ID]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("WAITING human 'Deploy to prod?' at step 6")
    assert lines[1].endswith(f"TASK_DECIDED approve by alice (task {TASK})")
    assert cli.main(["watch", ID, "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (shown[0]["wait_kind"], shown[0]["wait_name"], shown[0]["step_index"]) == ("HUMAN", "Deploy to prod?", 6)
    assert (shown[1]["task_id"], shown[1]["actor"], shown[1]["message"]) == (TASK, "alice", "approve")
