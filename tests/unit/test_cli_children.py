"""Unit tests of what a user sees of child intents outside the agent SDK
(docs/children.md): the client's models and its ListIntents by parent, and
the CLI's `get --tree`, `list --parent`, the child lines of `watch` and
`keys create --send`. The client's calls go to fake stubs serving an
in-memory family of intents; tests/integration/test_children_cli.py draws
the tree from a real server."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import pytest

from intentd.client import AsyncIntentClient, IntentClient, IntentState
from intentd.client._common import list_request
from intentd.client.models import (
    CHILD_EVENT_TYPES,
    WAIT_KINDS,
    event_from_proto,
    intent_from_proto,
    wait_kind_name,
)
from intentd.commands import cli
from intentd.generated.v1 import intent_pb2
from intentd.generated.v1 import intent_service_pb2 as pb
from tests.unit.test_client_waits import FAST, T0, FakeUnary, _Stub, ts

ROOT = "01jroot00000000000000000000"


def intent(intent_id: str, *, parent: str = "", step: int = 0, children: int = 0,
           state: int = intent_pb2.INTENT_STATE_COMPLETED, detached: bool = False,
           to_agent: str = "agent://acme/prod/worker", intent_type: str = "intent.work.v1",
           attempt: int = 1, **extra: Any) -> intent_pb2.Intent:
    return intent_pb2.Intent(
        id=intent_id, intent_type=intent_type, to_agent=to_agent, state=state, attempt=attempt, max_attempts=3,
        parent_id=parent, parent_step_index=step, child_count=children, detached=detached,
        create_time=ts(T0), **extra)


class Family:
    """A fake IntentService holding a tree of intents: GetIntent by id and
    ListIntents by parent_id, in start order, in pages of page_size (the
    token is the offset), as the server does."""

    def __init__(self) -> None:
        self.intents: dict[str, intent_pb2.Intent] = {}
        self.children: dict[str, list[str]] = {}
        self.list_calls: list[pb.ListIntentsRequest] = []

    def add(self, msg: intent_pb2.Intent) -> None:
        self.intents[msg.id] = msg
        if msg.parent_id:
            self.children.setdefault(msg.parent_id, []).append(msg.id)
            self.intents[msg.parent_id].child_count = len(self.children[msg.parent_id])

    def methods(self) -> dict[str, Any]:
        return {"GetIntent": FakeUnary(lambda r: pb.GetIntentResponse(intent=self.intents[r.id])),
                "ListIntents": FakeUnary(self.list)}

    def list(self, request: pb.ListIntentsRequest) -> pb.ListIntentsResponse:
        seen = pb.ListIntentsRequest()
        seen.CopyFrom(request)
        self.list_calls.append(seen)
        assert request.parent_id, "the tree lists by parent only"
        ids = self.children.get(request.parent_id, [])
        start = int(request.page_token or 0)
        size = request.page_size or 100
        page = ids[start:start + size]
        more = start + size < len(ids)
        return pb.ListIntentsResponse(intents=[self.intents[i] for i in page],
                                      next_page_token=str(start + size) if more else "")


def orchestration() -> Family:
    """An orchestrator that started research and coding at step 1 (one
    start_many), then a reviewer at step 3; the coder started two tools."""
    f = Family()
    f.add(intent(ROOT, to_agent="agent://acme/prod/orchestrator", intent_type="intent.orchestrate.v1",
                 state=intent_pb2.INTENT_STATE_WAITING,
                 waiting=intent_pb2.WaitInfo(kind=intent_pb2.WAIT_KIND_AGENT, name="ALL", step_index=4)))
    f.add(intent("01jresearch", parent=ROOT, step=1, to_agent="agent://acme/prod/research"))
    f.add(intent("01jcoder", parent=ROOT, step=1, to_agent="agent://acme/prod/coder",
                 state=intent_pb2.INTENT_STATE_IN_PROGRESS))
    f.add(intent("01jreviewer", parent=ROOT, step=3, to_agent="agent://acme/prod/reviewer", detached=True,
                 state=intent_pb2.INTENT_STATE_PENDING, attempt=0))
    f.add(intent("01jtool1", parent="01jcoder", step=2, to_agent="agent://acme/prod/tool"))
    f.add(intent("01jtool2", parent="01jcoder", step=2, to_agent="agent://acme/prod/tool",
                 state=intent_pb2.INTENT_STATE_FAILED, attempt=3))
    return f


@pytest.fixture
def family(monkeypatch: pytest.MonkeyPatch) -> Family:
    f = orchestration()

    def client(args: argparse.Namespace) -> IntentClient:
        c = IntentClient("127.0.0.1:1", **FAST)
        c._aio._stub_instance = _Stub(f.methods())
        return c

    monkeypatch.setattr(cli, "_client", client)
    return f


# ---------------------------------------------------------------- models


def test_intent_carries_its_family() -> None:
    child = intent_from_proto(intent("01jc", parent=ROOT, step=3, detached=True, children=2))
    assert (child.parent_id, child.parent_step_index, child.detached, child.child_count) == (ROOT, 3, True, 2)
    assert child.is_child
    plain = intent_from_proto(intent_pb2.Intent(id="x", state=intent_pb2.INTENT_STATE_PENDING))
    assert (plain.parent_id, plain.parent_step_index, plain.detached, plain.child_count) == ("", 0, False, 0)
    assert not plain.is_child


def test_child_events_and_the_agent_wait_kind() -> None:
    started = event_from_proto(intent_pb2.IntentEvent(
        intent_id=ROOT, seq=5, type=intent_pb2.EVENT_TYPE_CHILD_STARTED, state=intent_pb2.INTENT_STATE_IN_PROGRESS,
        step_index=2, message="agent://acme/prod/research", child_id="01jc"))
    assert (started.type, started.child_id, started.child_state) == ("CHILD_STARTED", "01jc", None)
    finished = event_from_proto(intent_pb2.IntentEvent(
        intent_id=ROOT, seq=6, type=intent_pb2.EVENT_TYPE_CHILD_FINISHED, state=intent_pb2.INTENT_STATE_WAITING,
        child_id="01jc", child_state=intent_pb2.INTENT_STATE_FAILED))
    assert (finished.type, finished.child_id, finished.child_state) == ("CHILD_FINISHED", "01jc", IntentState.FAILED)
    assert {started.type, finished.type} == CHILD_EVENT_TYPES
    # A state this client does not know is no state, not an error.
    odd = event_from_proto(intent_pb2.IntentEvent(intent_id=ROOT, seq=7, type=intent_pb2.EVENT_TYPE_CHILD_FINISHED,
                                                  state=intent_pb2.INTENT_STATE_WAITING, child_state=99))  # type: ignore[arg-type]
    assert odd.child_state is None
    assert wait_kind_name(intent_pb2.WAIT_KIND_AGENT) == "AGENT"
    proto_kinds = [n.removeprefix("WAIT_KIND_") for n in intent_pb2.WaitKind.keys() if n != "WAIT_KIND_UNSPECIFIED"]
    assert tuple(proto_kinds) == WAIT_KINDS


def test_list_by_parent_sync_and_async() -> None:
    assert list_request(parent_id=ROOT).parent_id == ROOT
    assert list_request().parent_id == ""
    f = orchestration()
    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = _Stub(f.methods())
        page = client.list(parent_id=ROOT, page_size=2)
        assert [i.id for i in page.intents] == ["01jresearch", "01jcoder"] and page.next_page_token == "2"
        assert [i.id for i in client.iter_intents(parent_id=ROOT, page_size=2)] == [
            "01jresearch", "01jcoder", "01jreviewer"]
        assert [i.id for i in client.children("01jcoder")] == ["01jtool1", "01jtool2"]
        assert [i.id for i in client.handle(ROOT).children()] == ["01jresearch", "01jcoder", "01jreviewer"]

    async def go() -> None:
        async with AsyncIntentClient("127.0.0.1:1", **FAST) as client:
            client._stub_instance = _Stub(f.methods())
            assert [i.id async for i in client.iter_intents(parent_id="01jcoder", page_size=1)] == [
                "01jtool1", "01jtool2"]
            assert [i.id for i in await client.children(ROOT)] == ["01jresearch", "01jcoder", "01jreviewer"]
            assert [i.id for i in await client.handle("01jcoder").children()] == ["01jtool1", "01jtool2"]
            assert (await client.list(parent_id="01jtool1")).intents == []

    asyncio.run(go())


# ---------------------------------------------------------------- get --tree


def test_tree_draws_the_family(family: Family, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["get", ROOT, "--tree"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{ROOT}  intent.orchestrate.v1  agent://acme/prod/orchestrator  WAITING  attempt 1/3  "
        "waits for its children",
        "├── 01jresearch  intent.work.v1  agent://acme/prod/research  COMPLETED  attempt 1/3  step 1",
        "├── 01jcoder  intent.work.v1  agent://acme/prod/coder  IN_PROGRESS  attempt 1/3  step 1",
        "│   ├── 01jtool1  intent.work.v1  agent://acme/prod/tool  COMPLETED  attempt 1/3  step 2",
        "│   └── 01jtool2  intent.work.v1  agent://acme/prod/tool  FAILED  attempt 3/3  step 2",
        "└── 01jreviewer  intent.work.v1  agent://acme/prod/reviewer  PENDING  attempt 0/3  step 3  detached",
    ]
    # Intents without children are never listed: child_count says so.
    assert [c.parent_id for c in family.list_calls] == [ROOT, "01jcoder"]


def test_tree_cuts_by_count_and_depth(family: Family, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["get", ROOT, "--tree", "--max", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # The budget goes to the first level first: research and coder, then it is spent.
    assert [line.split("  ")[0] for line in lines[:3]] == [ROOT, "├── 01jresearch", "├── 01jcoder"]
    assert lines[3:] == ["│   └── ... 2 children (past --max)", "└── ... 1 more"]
    assert family.list_calls[0].page_size == 2
    assert cli.main(["get", ROOT, "--tree", "--depth", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3] == "│   └── ... 2 children (below --depth 1)"
    assert len(lines) == 5 and lines[4].startswith("└── 01jreviewer")
    with pytest.raises(SystemExit, match="at least 1"):
        cli.main(["get", ROOT, "--tree", "--depth", "0"])


def test_tree_of_a_wide_fan_out_follows_pages_up_to_the_budget(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    f = Family()
    f.add(intent(ROOT, state=intent_pb2.INTENT_STATE_WAITING))
    for n in range(2500):
        f.add(intent(f"01jc{n:05d}", parent=ROOT, step=1))
    with IntentClient("127.0.0.1:1", **FAST) as client:
        client._aio._stub_instance = _Stub(f.methods())
        tree = cli.fetch_tree(client, ROOT, max_nodes=1201)
    assert len(tree.children) == 1200 and tree.more == 1300
    assert [c.page_size for c in f.list_calls] == [1000, 200]
    lines = cli.render_tree(tree)
    assert lines[-1] == "└── ... 1300 more" and lines[-2].startswith("├── 01jc01199")


def test_tree_json(family: Family, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["get", ROOT, "--tree", "--json", "--max", "4"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["id"] == ROOT and tree["child_count"] == 3 and tree["more_children"] == 0
    assert [c["id"] for c in tree["children"]] == ["01jresearch", "01jcoder", "01jreviewer"]
    coder = tree["children"][1]
    assert (coder["parent_id"], coder["parent_step_index"], coder["children"], coder["more_children"]) == (
        ROOT, 1, [], 2)
    assert tree["children"][2]["detached"] is True


def test_get_names_parent_and_children(family: Family, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["get", ROOT]) == 0
    out = capsys.readouterr().out
    assert f"children:    3 (intentd get {ROOT} --tree)" in out
    assert "waits for:   its child intents (all of them: gather) at step 4 (parked, holds no agent)" in out
    assert "parent:" not in out
    assert cli.main(["get", "01jreviewer"]) == 0
    out = capsys.readouterr().out
    assert f"parent:      {ROOT} (started at its step 3, detached: keeps running when its parent ends)" in out
    assert cli.main(["get", "01jresearch", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["parent_id"], shown["parent_step_index"], shown["detached"], shown["child_count"]) == (
        ROOT, 1, False, 0)


def test_list_parent(family: Family, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "--parent", ROOT, "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATE", "TYPE", "TO_AGENT", "ATTEMPT", "STEPS", "CREATED", "AT_STEP",
                                "CHILDREN"]
    assert lines[1].split()[0] == "01jresearch" and lines[1].split()[-2:] == ["1", "0"]
    assert lines[2].split()[0] == "01jcoder" and lines[2].split()[-2:] == ["1", "2"]
    assert lines[3] == "(more: --page-token 2)"
    assert (family.list_calls[0].parent_id, family.list_calls[0].page_size) == (ROOT, 2)
    assert cli.main(["list", "--parent", ROOT, "--page-token", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "01jreviewer" and lines[1].split()[-3:] == ["3", "detached", "0"]


# ---------------------------------------------------------------- watch


def test_watch_lines_of_children() -> None:
    started = event_from_proto(intent_pb2.IntentEvent(
        intent_id=ROOT, seq=5, type=intent_pb2.EVENT_TYPE_CHILD_STARTED, state=intent_pb2.INTENT_STATE_IN_PROGRESS,
        attempt=1, step_index=2, message="agent://acme/prod/research", child_id="01jc", time=ts(T0)))
    line = cli._describe_event(started)
    assert line.endswith("attempt 1  CHILD_STARTED 01jc at step 2 -> agent://acme/prod/research")
    finished = event_from_proto(intent_pb2.IntentEvent(
        intent_id=ROOT, seq=6, type=intent_pb2.EVENT_TYPE_CHILD_FINISHED, state=intent_pb2.INTENT_STATE_WAITING,
        child_id="01jc", child_state=intent_pb2.INTENT_STATE_FAILED, time=ts(T0),
        error=intent_pb2.IntentError(code="BAD_INPUT", message="no")))
    assert cli._describe_event(finished).endswith("CHILD_FINISHED 01jc FAILED  BAD_INPUT: no")
    waiting = event_from_proto(intent_pb2.IntentEvent(
        intent_id=ROOT, seq=7, type=intent_pb2.EVENT_TYPE_WAITING, state=intent_pb2.INTENT_STATE_WAITING,
        wait_kind=intent_pb2.WAIT_KIND_AGENT, wait_name="FIRST", step_index=3, time=ts(T0)))
    assert cli._describe_event(waiting).endswith("WAITING children (the first) at step 3")
    shown = cli.event_dict(finished)
    assert (shown["child_id"], shown["child_state"]) == ("01jc", "FAILED")
    assert cli.event_dict(waiting)["child_state"] is None


# ---------------------------------------------------------------- keys


def test_keys_create_takes_send_patterns() -> None:
    args = cli.build_parser().parse_args(["keys", "create", "orch", "--tenant", "acme", "--role", "agent",
                                          "--address", "agent://acme/prod/orchestrator",
                                          "--send", "agent://acme/prod/*", "--send", "agent://acme/dev/*"])
    assert args.send == ["agent://acme/prod/*", "agent://acme/dev/*"]
    assert cli.build_parser().parse_args(["keys", "create", "web"]).send is None
