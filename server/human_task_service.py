"""The client-facing HumanTaskService: tasks made by ``ctx.ask_human``
(docs/waits.md, "Human tasks").

The store (``server.waits``) owns the task's state change, guarded in the
database; this module owns who may decide and what a decision may hold,
checked before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jsonschema.exceptions
import jsonschema.validators
import referencing.exceptions

from intentd.core.errors import ValidationError
from intentd.core.limits import MAX_SENDER_LEN, MAX_TASK_COMMENT_LEN
from intentd.core.validation import check_intent_type, check_text
from intentd.generated.v1 import human_task_pb2 as pb
from intentd.generated.v1 import human_task_pb2_grpc as pb_grpc

from . import errors, history
from .auth import Authenticator, Caller, current_caller
from .convert import TASK_STATE_NAMES, human_task_to_proto
from .db import Row
from .ids import looks_like_id, page_token, parse_page_token
from .quotas import Quotas, payload_json
from .rpc import Ctx, unary
from .settings import ServerSettings
from .store import IntentStore
from .waits import WaitStore

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def require_task_id(value: str) -> str:
    if not value:
        raise ValidationError("id", "is required")
    if not looks_like_id(value):
        # It cannot exist; one answer for every unknown id.
        raise errors.NotFound(f"human task {value[:80]!r} not found")
    return value


def task_states(values: Sequence[pb.HumanTaskState.ValueType]) -> list[str]:
    """The stored states a list asks for; none means OPEN (the inbox of
    tasks to decide)."""
    names = []
    for i, value in enumerate(values):
        name = TASK_STATE_NAMES.get(value)
        if name is None:
            raise ValidationError(f"states[{i}]", f"{value} is not a human task state")
        names.append(name)
    return names or ["OPEN"]


def check_may_decide(caller: Caller, task: Row) -> None:
    """A task naming assignees is decided by one of them, or by an admin of
    its tenant (with API keys off the one caller is an admin)."""
    assignees = task["assignees"] or ()
    if assignees and caller.name not in assignees and "admin" not in caller.roles:
        raise errors.PermissionDenied(
            f"API key {caller.name!r} is not an assignee of human task {task['id']} "
            f"({', '.join(assignees)}) and has no admin role")


def check_outcome(outcome: str, allowed: Sequence[str]) -> str:
    if outcome not in allowed:
        shown = outcome if len(outcome) <= 80 else outcome[:77] + "..."
        raise ValidationError("outcome", f"{shown!r} is not one of the task's outcomes: {', '.join(allowed)}")
    return outcome


def check_form_data(form_schema: str | None, form_data: str) -> None:
    """Checks the JSON text ``form_data`` against the task's JSON Schema
    (none: any form data is kept as sent). Names the first error's place."""
    if form_schema is None:
        return
    schema: Any = json.loads(form_schema)
    value = json.loads(form_data)
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        error = next(iter(cls(schema).iter_errors(value)), None)
    except (jsonschema.exceptions.SchemaError, referencing.exceptions.Unresolvable) as exc:
        # A schema that cannot be applied (a $ref to elsewhere, which is never
        # fetched): no form data could satisfy it, and none is let through.
        raise errors.FailedPrecondition(f"the task's form schema cannot be applied: {exc}") from None
    if error is not None:
        raise ValidationError("form_data", f"at {error.json_path}: {error.message}")


def _size_of(task: pb.HumanTask) -> int:
    return task.ByteSize()


class HumanTaskService(pb_grpc.HumanTaskServiceServicer):
    def __init__(
        self, waits: WaitStore, store: IntentStore, settings: ServerSettings, auth: Authenticator,
        quotas: Quotas,
    ) -> None:
        self._waits = waits
        self.store = store
        self.settings = settings
        self.auth = auth
        self.quotas = quotas

    @property
    def waits(self) -> WaitStore:
        return self._waits

    @unary("client")
    async def ListHumanTasks(self, request: pb.ListHumanTasksRequest, context: Ctx) -> pb.ListHumanTasksResponse:
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise ValidationError("page_size", f"must be 0 (default {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}")
        limit = request.page_size or DEFAULT_PAGE_SIZE
        states = task_states(request.states)
        check_text(request.assignee, "assignee", MAX_SENDER_LEN)
        if request.intent_type:
            check_intent_type(request.intent_type)
        if request.intent_id and not looks_like_id(request.intent_id):
            return pb.ListHumanTasksResponse()  # no intent has that id: no task either
        before_id = parse_page_token(request.page_token)
        rows = await self.waits.list_tasks(
            current_caller().tenant, states=states, assignee=request.assignee or None,
            intent_type=request.intent_type or None, intent_id=request.intent_id or None,
            limit=limit + 1, before_id=before_id)
        # The page ends at page_size tasks or before the one that would take
        # it past the byte budget (a task's schema, description and form data
        # add up); it always holds one.
        budget = history.page_bytes(self.settings.max_message_bytes)
        tasks: list[pb.HumanTask] = []
        size = 0
        more = len(rows) > limit
        for row in rows[:limit]:
            task = human_task_to_proto(row)
            size += _size_of(task)
            if tasks and size > budget:
                more = True
                break
            tasks.append(task)
        return pb.ListHumanTasksResponse(tasks=tasks, next_page_token=page_token(tasks[-1].id) if more else "")

    @unary("client")
    async def GetHumanTask(self, request: pb.GetHumanTaskRequest, context: Ctx) -> pb.GetHumanTaskResponse:
        task_id = require_task_id(request.id)
        row = await self.waits.get_task(current_caller().tenant, task_id)
        return pb.GetHumanTaskResponse(task=human_task_to_proto(row))

    @unary("client")
    async def DecideHumanTask(self, request: pb.DecideHumanTaskRequest, context: Ctx) -> pb.DecideHumanTaskResponse:
        task_id = require_task_id(request.id)
        check_text(request.comment, "comment", MAX_TASK_COMMENT_LEN)
        caller = current_caller()
        form_data = (payload_json(request.form_data, "form_data", await self.quotas.max_payload_bytes(caller))
                     if request.form_data else None)
        waits = self.waits
        task = await waits.get_task(caller.tenant, task_id)
        check_may_decide(caller, task)
        check_outcome(request.outcome, task["outcomes"])
        if form_data is not None or task["form_schema"] is not None:
            # A task with a form is checked on no form data too (as null): a
            # schema that allows none says so.
            check_form_data(task["form_schema"], form_data if form_data is not None else "null")
        row = await waits.decide_task(caller.tenant, task_id, request.outcome, request.comment, form_data,
                                      caller.name)
        if task["state"] == "OPEN":
            # Read open and now decided: this call decided it (a repeat of a
            # decision is answered unchanged and audited once).
            await self.store.audit(caller.tenant, caller.name, "human_task.decide", task_id,
                                   {"intent_id": row["intent_id"], "outcome": row["outcome"]})
        return pb.DecideHumanTaskResponse(task=human_task_to_proto(row))
