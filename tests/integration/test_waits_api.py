"""The gRPC surface of durable waits (docs/waits.md): SignalIntent, the
HumanTaskService and IntentType.wait_hold_ms, on real servers and a real
PostgreSQL. Every refusal is checked for its status and for nothing having
been written."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from intentd.client import IntentClient
from intentd.core import waits
from intentd.generated.v1 import admin_service_pb2 as admin_pb
from intentd.generated.v1 import admin_service_pb2_grpc as admin_grpc
from intentd.generated.v1 import delivery_pb2, intent_pb2
from intentd.generated.v1 import human_task_pb2 as hpb
from intentd.generated.v1 import human_task_pb2_grpc as hpb_grpc
from intentd.generated.v1 import intent_service_pb2 as pb
from intentd.generated.v1 import intent_service_pb2_grpc as pb_grpc
from intentd.server.ids import new_id
from tests.support import Keys, RawSidecar, bearer

TYPE = "intent.waits.api.v1"


def code_of(call: Any, request: Any, metadata: list[tuple[str, str]] | None = None) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(request, metadata=metadata, timeout=10)
    return err.value.code(), err.value.details()


def intent_events(keys: Keys, intent_id: str) -> list[str]:
    return [r["type"] for r in keys.sql("SELECT type FROM intent_events WHERE intent_id = $1 ORDER BY seq",
                                        intent_id)]


def signals_of(keys: Keys, intent_id: str) -> int:
    return int(keys.sql("SELECT count(*) AS n FROM intent_signals WHERE intent_id = $1", intent_id)[0]["n"])


# ------------------------------------------------------------------ SignalIntent, API keys off


@pytest.fixture
def keys(database_url: str) -> Keys:
    return Keys(database_url)


def test_signal_requests_that_are_not_valid_write_nothing(make_server, agent_address, keys) -> None:
    srv = make_server(max_payload_bytes=1024)
    with IntentClient(srv.address) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
    before = intent_events(keys, intent_id)
    with grpc.insecure_channel(srv.address) as channel:
        signal = pb_grpc.IntentServiceStub(channel).SignalIntent
        cases = [
            (pb.SignalIntentRequest(id="", name="go"), grpc.StatusCode.INVALID_ARGUMENT, "id: is required"),
            # An id that cannot exist is answered as one that does not.
            (pb.SignalIntentRequest(id="nope", name="go"), grpc.StatusCode.NOT_FOUND, "not found"),
            (pb.SignalIntentRequest(id=intent_id, name=""), grpc.StatusCode.INVALID_ARGUMENT, "name: must be 1 to"),
            (pb.SignalIntentRequest(id=intent_id, name="has space"), grpc.StatusCode.INVALID_ARGUMENT,
             "name: may only contain"),
            (pb.SignalIntentRequest(id=intent_id, name="x" * 129), grpc.StatusCode.INVALID_ARGUMENT, "name:"),
            (pb.SignalIntentRequest(id=intent_id, name="go", signal_id="a/b"), grpc.StatusCode.INVALID_ARGUMENT,
             "signal_id: may only contain"),
            (pb.SignalIntentRequest(id=intent_id, name="go", signal_id="s" * 129), grpc.StatusCode.INVALID_ARGUMENT,
             "signal_id: must be at most 128"),
            (pb.SignalIntentRequest(id=intent_id, name="go", payload=b"{"), grpc.StatusCode.INVALID_ARGUMENT,
             "payload: is not valid JSON"),
            (pb.SignalIntentRequest(id=intent_id, name="go", payload=b"\xff"), grpc.StatusCode.INVALID_ARGUMENT,
             "payload: is not UTF-8"),
            (pb.SignalIntentRequest(id=intent_id, name="go", payload=b"NaN"), grpc.StatusCode.INVALID_ARGUMENT,
             "payload: is not valid JSON"),
            (pb.SignalIntentRequest(id=intent_id, name="go", payload=json.dumps("x" * 2000).encode()),
             grpc.StatusCode.RESOURCE_EXHAUSTED, "payload: is 2002 bytes; the limit is 1024"),
        ]
        for request, code, message in cases:
            got = code_of(signal, request)
            assert got[0] == code and message in got[1], (request, got)
    assert intent_events(keys, intent_id) == before
    assert signals_of(keys, intent_id) == 0


def test_signal_of_an_unknown_or_ended_intent(server, agent_address, keys) -> None:
    with IntentClient(server.address) as client, grpc.insecure_channel(server.address) as channel:
        signal = pb_grpc.IntentServiceStub(channel).SignalIntent
        assert code_of(signal, pb.SignalIntentRequest(id=new_id(), name="go"))[0] == grpc.StatusCode.NOT_FOUND
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
        client.cancel(intent_id, reason="done")
        code, message = code_of(signal, pb.SignalIntentRequest(id=intent_id, name="go", payload=b"1"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, message
    assert intent_events(keys, intent_id) == ["CREATED", "CANCELED"]
    assert signals_of(keys, intent_id) == 0


def test_a_signal_waits_in_the_inbox_and_a_repeat_is_matched(server, agent_address, keys) -> None:
    with IntentClient(server.address) as client, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.IntentServiceStub(channel)
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
        first = stub.SignalIntent(pb.SignalIntentRequest(id=intent_id, name="ci.passed", payload=b'{"build": 7}',
                                                         signal_id="ci-7"), timeout=10)
        assert first.created
        assert (first.signal.id, first.signal.name, json.loads(first.signal.payload), first.signal.sender,
                first.signal.consumed_by_step) == ("ci-7", "ci.passed", {"build": 7}, "anonymous", 0)
        assert first.intent.id == intent_id and first.intent.state == intent_pb2.INTENT_STATE_PENDING
        again = stub.SignalIntent(pb.SignalIntentRequest(id=intent_id, name="ci.passed", payload=b'{"build": 8}',
                                                         signal_id="ci-7"), timeout=10)
        assert not again.created and again.signal == first.signal
        made = stub.SignalIntent(pb.SignalIntentRequest(id=intent_id, name="ci.passed"), timeout=10)
        assert made.created and made.signal.id and made.signal.id != "ci-7"
        assert json.loads(made.signal.payload) is None
    assert signals_of(keys, intent_id) == 2
    audited = keys.sql("SELECT actor, detail FROM audit_log WHERE action = 'intent.signal' AND target = $1 "
                       "ORDER BY id", intent_id)
    assert [(r["actor"], json.loads(r["detail"])["signal_id"]) for r in audited] == [
        ("anonymous", "ci-7"), ("anonymous", made.signal.id)]


# ------------------------------------------------------------------ with API keys


@pytest.fixture(scope="module")
def secure(database_url: str) -> Iterator[tuple[Any, Keys, dict[str, str], str]]:
    from tests.support import ServerThread, server_settings

    srv = ServerThread(server_settings(database_url, auth="on")).start()
    keys = Keys(database_url)
    a, b = f"wa{uuid.uuid4().hex[:6]}", f"wb{uuid.uuid4().hex[:6]}"
    made = {
        "alice": keys.create(a, "alice", ["client"]),
        "bob": keys.create(a, "bob", ["client"]),
        "ops": keys.create(a, "ops", ["admin"]),
        "runner": keys.create(a, "runner", ["agent"], (f"agent://{a}/prod/*",)),
        "other": keys.create(b, "other", ["client", "admin"]),
    }
    # Park at once: the tests make tasks by reaching ask_human waits.
    put_type(srv.address, bearer(made["ops"]))
    yield srv, keys, made, a
    srv.stop()


def put_type(address: str, metadata: list[tuple[str, str]] | None = None) -> None:
    with grpc.insecure_channel(address) as channel:
        admin_grpc.AdminServiceStub(channel).PutIntentType(admin_pb.PutIntentTypeRequest(
            intent_type=admin_pb.IntentType(intent_type=TYPE, wait_hold_ms=0)), metadata=metadata, timeout=10)


def test_signal_of_another_tenants_intent_is_not_found(secure) -> None:
    srv, keys, made, tenant = secure
    with IntentClient(srv.address, metadata=bearer(made["alice"])) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=f"agent://{tenant}/prod/s", payload={})
    with grpc.insecure_channel(srv.address) as channel:
        signal = pb_grpc.IntentServiceStub(channel).SignalIntent
        request = pb.SignalIntentRequest(id=intent_id, name="go")
        assert code_of(signal, request, bearer(made["other"]))[0] == grpc.StatusCode.NOT_FOUND
        assert code_of(signal, request, bearer(made["runner"]))[0] == grpc.StatusCode.PERMISSION_DENIED
        assert signals_of(keys, intent_id) == 0
        sent = signal(request, metadata=bearer(made["bob"]), timeout=10)
    assert sent.signal.sender == "bob"  # the key's name, whoever the intent's sender was


def test_signals_count_against_the_senders_rate(secure) -> None:
    srv, keys, made, tenant = secure
    slow = keys.create(tenant, f"slow{uuid.uuid4().hex[:6]}", ["client"], rate=0.5)
    with IntentClient(srv.address, metadata=bearer(made["alice"])) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=f"agent://{tenant}/prod/r", payload={})
    with grpc.insecure_channel(srv.address) as channel:
        signal = pb_grpc.IntentServiceStub(channel).SignalIntent
        signal(pb.SignalIntentRequest(id=intent_id, name="go", signal_id="one"), metadata=bearer(slow), timeout=10)
        code, details = code_of(signal, pb.SignalIntentRequest(id=intent_id, name="go", signal_id="two"),
                                bearer(slow))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert signals_of(keys, intent_id) == 1  # the refused one wrote nothing


def ask_human(srv: Any, made: dict[str, str], tenant: str, *, assignees: tuple[str, ...] = (),
              outcomes: tuple[str, ...] = waits.DEFAULT_OUTCOMES, form_schema: dict[str, Any] | None = None,
              title: str = "Deploy to prod?") -> tuple[str, str]:
    """A sent intent and an open human task of it, its row written as the
    registration of an ask_human wait writes it (the wait's own path is
    test_a_parked_ask_human_wait_names_its_task); returns (intent id, task id)."""
    with IntentClient(srv.address, metadata=bearer(made["alice"])) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=f"agent://{tenant}/prod/h", payload={})
    task_id = new_id()
    Keys(srv.settings.database_url).sql(
        "INSERT INTO human_tasks (id, tenant, intent_id, idx, intent_type, to_agent, title, outcomes, assignees,"
        " form_schema, create_time) SELECT $1, tenant, id, 1, intent_type, to_agent, $3, $4, $5, $6::jsonb, now()"
        " FROM intents WHERE id = $2",
        task_id, intent_id, title, list(outcomes), list(assignees),
        json.dumps(form_schema) if form_schema is not None else None)
    return intent_id, task_id


def test_a_parked_ask_human_wait_names_its_task(secure) -> None:
    srv, _, made, tenant = secure
    agent_address = f"agent://{tenant}/prod/h{uuid.uuid4().hex[:8]}"
    with IntentClient(srv.address, metadata=bearer(made["alice"])) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
    raw = RawSidecar(srv.address, agent_address, ping_every=0.2, metadata=bearer(made["runner"]))
    try:
        lease = raw.recv("assignment").lease
        raw.send(ack=delivery_pb2.AckAssignment(lease=lease))
        result = raw.write(1, delivery_pb2.IntentWrite(lease=lease, wait=delivery_pb2.WaitWrite(
            index=1, step_name=waits.record_name(waits.HUMAN, "Ship?"), kind=intent_pb2.WAIT_KIND_HUMAN,
            task=delivery_pb2.HumanTaskSpec(title="Ship?", assignees=["alice"]))))
    finally:
        raw.close()
    assert (result.code, result.message) == (0, "") and result.wait.parked, result
    with grpc.insecure_channel(srv.address) as channel:
        intent = pb_grpc.IntentServiceStub(channel).GetIntent(pb.GetIntentRequest(id=intent_id),
                                                               metadata=bearer(made["alice"]), timeout=10).intent
        assert intent.state == intent_pb2.INTENT_STATE_WAITING
        assert (intent.waiting.kind, intent.waiting.name, intent.waiting.step_index) == (
            intent_pb2.WAIT_KIND_HUMAN, "Ship?", 1)
        assert intent.waiting.task_id and intent.parked_attempts == 1
        task = hpb_grpc.HumanTaskServiceStub(channel).GetHumanTask(
            hpb.GetHumanTaskRequest(id=intent.waiting.task_id), metadata=bearer(made["alice"]), timeout=10).task
    assert (task.intent_id, task.title, list(task.assignees), task.state) == (
        intent_id, "Ship?", ["alice"], hpb.HUMAN_TASK_STATE_OPEN)


def audit_rows(keys: Keys, task_id: str) -> list[tuple[str, str, str]]:
    rows = keys.sql("SELECT actor, detail FROM audit_log WHERE action = 'human_task.decide' AND target = $1 "
                    "ORDER BY id", task_id)
    return [(r["actor"], json.loads(r["detail"])["intent_id"], json.loads(r["detail"])["outcome"]) for r in rows]


def test_a_task_is_listed_read_and_decided_by_its_assignee_only(secure) -> None:
    srv, keys, made, tenant = secure
    intent_id, task_id = ask_human(srv, made, tenant, assignees=("alice",))
    with grpc.insecure_channel(srv.address) as channel:
        tasks = hpb_grpc.HumanTaskServiceStub(channel)
        listed = tasks.ListHumanTasks(hpb.ListHumanTasksRequest(intent_id=intent_id), metadata=bearer(made["bob"]),
                                      timeout=10)
        assert [t.id for t in listed.tasks] == [task_id] and not listed.next_page_token
        task = tasks.GetHumanTask(hpb.GetHumanTaskRequest(id=task_id), metadata=bearer(made["alice"]),
                                  timeout=10).task
        assert (task.intent_id, task.intent_type, task.step_index, task.title, task.state) == (
            intent_id, TYPE, 1, "Deploy to prod?", hpb.HUMAN_TASK_STATE_OPEN)
        assert list(task.outcomes) == list(waits.DEFAULT_OUTCOMES) and list(task.assignees) == ["alice"]

        decide = tasks.DecideHumanTask
        approve = hpb.DecideHumanTaskRequest(id=task_id, outcome="approve", comment="ship it")
        # Another tenant sees no such task, not even to be refused.
        for call, request in ((tasks.GetHumanTask, hpb.GetHumanTaskRequest(id=task_id)), (decide, approve)):
            assert code_of(call, request, bearer(made["other"]))[0] == grpc.StatusCode.NOT_FOUND
        assert not tasks.ListHumanTasks(hpb.ListHumanTasksRequest(intent_id=intent_id),
                                        metadata=bearer(made["other"]), timeout=10).tasks
        code, message = code_of(decide, approve, bearer(made["bob"]))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not an assignee" in message
        assert code_of(decide, approve, bearer(made["runner"]))[0] == grpc.StatusCode.PERMISSION_DENIED
        code, message = code_of(decide, hpb.DecideHumanTaskRequest(id=task_id, outcome="maybe"), bearer(made["alice"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "approve, reject" in message
        code, message = code_of(decide, hpb.DecideHumanTaskRequest(id=task_id, outcome="approve", comment="x" * 4097),
                                bearer(made["alice"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "comment" in message
        unchanged = tasks.GetHumanTask(hpb.GetHumanTaskRequest(id=task_id), metadata=bearer(made["alice"]),
                                       timeout=10).task
        assert unchanged == task and audit_rows(keys, task_id) == []

        decided = decide(approve, metadata=bearer(made["alice"]), timeout=10).task
        assert decided.state == hpb.HUMAN_TASK_STATE_DECIDED
        assert (decided.decision.outcome, decided.decision.decided_by, decided.decision.comment) == (
            "approve", "alice", "ship it")
        # The same decision again (a retried call) is the same task.
        assert decide(approve, metadata=bearer(made["alice"]), timeout=10).task == decided
        # Another decision, even by an admin, finds it closed and changes nothing.
        code, _ = code_of(decide, hpb.DecideHumanTaskRequest(id=task_id, outcome="reject"), bearer(made["ops"]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert tasks.GetHumanTask(hpb.GetHumanTaskRequest(id=task_id), metadata=bearer(made["ops"]),
                                  timeout=10).task == decided
        assert not tasks.ListHumanTasks(hpb.ListHumanTasksRequest(intent_id=intent_id),
                                        metadata=bearer(made["alice"]), timeout=10).tasks  # OPEN only
        assert [t.id for t in tasks.ListHumanTasks(
            hpb.ListHumanTasksRequest(intent_id=intent_id, states=[hpb.HUMAN_TASK_STATE_DECIDED]),
            metadata=bearer(made["alice"]), timeout=10).tasks] == [task_id]
    assert audit_rows(keys, task_id) == [("alice", intent_id, "approve")]
    decided_events = keys.sql("SELECT actor, task_id FROM intent_events WHERE intent_id = $1 AND type = "
                              "'TASK_DECIDED'", intent_id)
    assert [(r["actor"], r["task_id"]) for r in decided_events] == [("alice", task_id)]


def test_an_admin_may_decide_a_task_of_its_tenant_assigned_to_others(secure) -> None:
    srv, keys, made, tenant = secure
    intent_id, task_id = ask_human(srv, made, tenant, assignees=("alice",), outcomes=("go", "stop"))
    with grpc.insecure_channel(srv.address) as channel:
        task = hpb_grpc.HumanTaskServiceStub(channel).DecideHumanTask(
            hpb.DecideHumanTaskRequest(id=task_id, outcome="stop"), metadata=bearer(made["ops"]), timeout=10).task
    assert (task.state, task.decision.decided_by) == (hpb.HUMAN_TASK_STATE_DECIDED, "ops")
    assert audit_rows(keys, task_id) == [("ops", intent_id, "stop")]


def test_form_data_must_satisfy_the_tasks_schema(secure) -> None:
    srv, _, made, tenant = secure
    schema = {"type": "object", "properties": {"amount": {"type": "integer"}}, "required": ["amount"]}
    _, task_id = ask_human(srv, made, tenant, form_schema=schema)
    with grpc.insecure_channel(srv.address) as channel:
        tasks = hpb_grpc.HumanTaskServiceStub(channel)
        assert json.loads(tasks.GetHumanTask(hpb.GetHumanTaskRequest(id=task_id), metadata=bearer(made["bob"]),
                                             timeout=10).task.form_schema) == schema
        for form, expected in ((b'{"amount": "ten"}', "at $.amount: 'ten' is not of type 'integer'"),
                               (b"{}", "at $: 'amount' is a required property"),
                               (b"", "None is not of type 'object'"),
                               (b'{"amount": ', "form_data: is not valid JSON")):
            code, message = code_of(tasks.DecideHumanTask, hpb.DecideHumanTaskRequest(
                id=task_id, outcome="approve", form_data=form), bearer(made["bob"]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in message, (form, message)
        assert tasks.GetHumanTask(hpb.GetHumanTaskRequest(id=task_id), metadata=bearer(made["bob"]),
                                  timeout=10).task.state == hpb.HUMAN_TASK_STATE_OPEN
        decided = tasks.DecideHumanTask(hpb.DecideHumanTaskRequest(id=task_id, outcome="approve",
                                                                   form_data=b'{"amount": 10}'),
                                        metadata=bearer(made["bob"]), timeout=10).task
    assert json.loads(decided.decision.form_data) == {"amount": 10}
    assert decided.decision.decided_by == "bob"  # no assignees: any client key of the tenant


def test_list_pages_and_refusals(secure) -> None:
    srv, _, made, tenant = secure
    made_ids = [ask_human(srv, made, tenant, title=f"page {i}")[1] for i in range(3)]
    with grpc.insecure_channel(srv.address) as channel:
        listing = hpb_grpc.HumanTaskServiceStub(channel).ListHumanTasks
        seen: list[str] = []
        request = hpb.ListHumanTasksRequest(intent_type=TYPE, page_size=2)
        while True:
            page = listing(request, metadata=bearer(made["alice"]), timeout=10)
            assert len(page.tasks) <= 2
            seen += [t.id for t in page.tasks]
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        mine = [i for i in seen if i in made_ids]
        assert mine == sorted(made_ids, reverse=True)  # newest first, each once
        assert len(seen) == len(set(seen))
        for bad in (hpb.ListHumanTasksRequest(page_size=1001), hpb.ListHumanTasksRequest(page_size=-1),
                    hpb.ListHumanTasksRequest(page_token="nope"), hpb.ListHumanTasksRequest(intent_type="Bad"),
                    hpb.ListHumanTasksRequest(states=[hpb.HUMAN_TASK_STATE_UNSPECIFIED])):
            assert code_of(listing, bad, bearer(made["alice"]))[0] == grpc.StatusCode.INVALID_ARGUMENT, bad


def test_human_task_calls_need_a_key_with_the_client_role(secure) -> None:
    srv, _, made, _ = secure
    with grpc.insecure_channel(srv.address) as channel:
        tasks = hpb_grpc.HumanTaskServiceStub(channel)
        for call, request in ((tasks.ListHumanTasks, hpb.ListHumanTasksRequest()),
                              (tasks.GetHumanTask, hpb.GetHumanTaskRequest(id=new_id())),
                              (tasks.DecideHumanTask, hpb.DecideHumanTaskRequest(id=new_id(), outcome="approve"))):
            assert code_of(call, request)[0] == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(call, request, bearer(made["runner"]))[0] == grpc.StatusCode.PERMISSION_DENIED
        for request, code in ((hpb.GetHumanTaskRequest(id=""), grpc.StatusCode.INVALID_ARGUMENT),
                              (hpb.GetHumanTaskRequest(id="x"), grpc.StatusCode.NOT_FOUND)):
            assert code_of(tasks.GetHumanTask, request, bearer(made["alice"]))[0] == code
        # Checked before anything is read: a bad request costs no look-up.
        for request in (hpb.DecideHumanTaskRequest(id="", outcome="approve"),
                        hpb.DecideHumanTaskRequest(id=new_id(), outcome="approve", comment="x" * 4097),
                        hpb.DecideHumanTaskRequest(id=new_id(), outcome="approve", form_data=b"{")):
            assert code_of(tasks.DecideHumanTask, request, bearer(made["alice"]))[0] == (
                grpc.StatusCode.INVALID_ARGUMENT)


def test_with_api_keys_off_the_one_caller_decides_any_task(make_server, database_url) -> None:
    """The anonymous caller of a server without keys holds every role, so a
    task naming assignees is still decided (as "anonymous")."""
    srv = make_server(auth="off")
    keys = Keys(database_url)
    with IntentClient(srv.address) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=f"agent://{srv.settings.tenant}/prod/off",
                                       payload={})
    task_id = new_id()
    keys.sql("INSERT INTO human_tasks (id, tenant, intent_id, idx, intent_type, to_agent, title, outcomes,"
             " assignees, create_time) SELECT $1, tenant, id, 1, intent_type, to_agent, 'ok?', '{approve,reject}',"
             " '{alice}', now() FROM intents WHERE id = $2", task_id, intent_id)
    with grpc.insecure_channel(srv.address) as channel:
        task = hpb_grpc.HumanTaskServiceStub(channel).DecideHumanTask(
            hpb.DecideHumanTaskRequest(id=task_id, outcome="approve"), timeout=10).task
    assert (task.state, task.decision.decided_by) == (hpb.HUMAN_TASK_STATE_DECIDED, "anonymous")
    assert audit_rows(keys, task_id) == [("anonymous", intent_id, "approve")]


# ------------------------------------------------------------------ IntentType.wait_hold_ms


def test_wait_hold_ms_of_an_intent_type(secure) -> None:
    srv, _, made, _ = secure
    name = f"intent.waits.hold{uuid.uuid4().hex[:6]}.v1"
    with grpc.insecure_channel(srv.address) as channel:
        admin = admin_grpc.AdminServiceStub(channel)

        def put(**fields: Any) -> admin_pb.IntentType:
            return admin.PutIntentType(admin_pb.PutIntentTypeRequest(
                intent_type=admin_pb.IntentType(intent_type=name, **fields)), metadata=bearer(made["ops"]),
                timeout=10).intent_type

        created = put()
        assert created.HasField("wait_hold_ms") and created.wait_hold_ms == 2000
        assert put(wait_hold_ms=0).wait_hold_ms == 0  # 0 is a value: park at once
        assert put(max_attempts=5).wait_hold_ms == 0  # unset keeps it
        assert put(wait_hold_ms=30_000).wait_hold_ms == 30_000
        for bad in (30_001, -1):
            code, message = code_of(admin.PutIntentType, admin_pb.PutIntentTypeRequest(
                intent_type=admin_pb.IntentType(intent_type=name, wait_hold_ms=bad)), bearer(made["ops"]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "wait_hold_ms" in message
        got = admin.GetIntentType(admin_pb.GetIntentTypeRequest(intent_type=name), metadata=bearer(made["ops"]),
                                  timeout=10).intent_type
        assert got.wait_hold_ms == 30_000
        listed = admin.ListIntentTypes(admin_pb.ListIntentTypesRequest(), metadata=bearer(made["ops"]), timeout=10)
        assert [t.wait_hold_ms for t in listed.intent_types if t.intent_type == name] == [30_000]
