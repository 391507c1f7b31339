"""Database rows to protobuf messages."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp

from intentd.core.states import IntentState
from intentd.generated.v1 import human_task_pb2, intent_pb2, intent_service_pb2, stream_pb2

if TYPE_CHECKING:  # chunk_reader reads through the store, which converts rows with this module
    from .chunk_reader import Entry


def _by_name(enum: Any, prefix: str) -> dict[str, Any]:
    """A proto enum's values by their names without ``prefix`` (the names
    the database stores), UNSPECIFIED left out."""
    return {name.removeprefix(prefix): value for name, value in enum.items() if name != f"{prefix}UNSPECIFIED"}


_EVENT_TYPES = _by_name(intent_pb2.EventType, "EVENT_TYPE_")
_WAIT_KINDS = _by_name(intent_pb2.WaitKind, "WAIT_KIND_")
_TASK_STATES = _by_name(human_task_pb2.HumanTaskState, "HUMAN_TASK_STATE_")
TASK_STATE_NAMES = {value: name for name, value in _TASK_STATES.items()}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        ts = Timestamp()
        ts.FromDatetime(value)
        return ts
    # Timestamp.FromDatetime is pure Python and among the costliest calls of
    # a dispatch; the columns are timestamptz, so this exact arithmetic suffices.
    delta = value - _EPOCH
    return Timestamp(seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000)


def _labels(text: str) -> dict[str, str]:
    # Most intents have none; skip the JSON parser for them.
    return {} if text == "{}" else dict(json.loads(text))


def event_type_value(name: str) -> intent_pb2.EventType.ValueType:
    return _EVENT_TYPES[name]


def wait_kind_value(name: str | None) -> intent_pb2.WaitKind.ValueType:
    return _WAIT_KINDS[name] if name else intent_pb2.WAIT_KIND_UNSPECIFIED


def task_state_value(name: str) -> human_task_pb2.HumanTaskState.ValueType:
    return _TASK_STATES[name]


_STATE_NAMES = frozenset(s.value for s in IntentState)


def intent_to_proto(row: Mapping[str, Any]) -> intent_pb2.Intent:
    msg = intent_pb2.Intent(
        id=row["id"],
        tenant=row["tenant"],
        intent_type=row["intent_type"],
        to_agent=row["to_agent"],
        sender=row["sender"],
        payload=row["payload"].encode(),
        idempotency_key=row["idempotency_key"] or "",
        labels=_labels(row["labels"]),
        state=IntentState(row["state"]).to_proto(),
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        cancel_reason=row["cancel_reason"] or "",
        last_event_seq=row["last_seq"],
        checkpoint=intent_pb2.CheckpointSummary(
            steps_completed=row["steps_completed"],
            last_step=row["last_step"] or "",
            has_checkpoint=row["checkpoint"] is not None,
            checkpoint_time=timestamp(row["checkpoint_time"]),
            progress_message=row["progress_message"] or "",
            progress_fraction=row["progress_fraction"] or 0.0,
        ),
        create_time=timestamp(row["create_time"]),
        update_time=timestamp(row["update_time"]),
        finish_time=timestamp(row["finish_time"]),
        deadline=timestamp(row["deadline"]),
        # .get: rows written by RETURNING (claims, writes) have the intent's
        # own columns only; the open wait is joined in by get_intent and
        # list_intents.
        parked_attempts=row.get("parked_attempts") or 0,
        parent_id=row.get("parent_id") or "",
        parent_step_index=row.get("parent_idx") or 0,
        detached=bool(row.get("detached")),
        child_count=row.get("child_count") or 0,
    )
    wait_kind = row.get("wait_kind")
    if wait_kind is not None:
        msg.waiting.CopyFrom(intent_pb2.WaitInfo(
            kind=wait_kind_value(wait_kind),
            name=row["wait_name"] or "",
            step_index=row["wait_idx"],
            since=timestamp(row["wait_since"]),
            due_time=timestamp(row["wait_due_at"]),
            task_id=row["wait_task_id"] or "",
        ))
    if row["result"] is not None:
        msg.result = row["result"].encode()
    if row["error_code"] is not None:
        msg.error.CopyFrom(
            intent_pb2.IntentError(code=row["error_code"], message=row["error_message"] or "")
        )
    return msg


def event_to_proto(row: Mapping[str, Any]) -> intent_pb2.IntentEvent:
    msg = intent_pb2.IntentEvent(
        intent_id=row["intent_id"],
        seq=row["seq"],
        type=event_type_value(row["type"]),
        time=timestamp(row["time"]),
        state=IntentState(row["state"]).to_proto(),
        attempt=row["attempt"],
        step_name=row["step_name"] or "",
        step_index=row["step_index"] or 0,
        message=row["message"] or "",
        progress_fraction=row["progress_fraction"] or 0.0,
        wait_kind=wait_kind_value(row.get("wait_kind")),
        wait_name=row.get("wait_name") or "",
        signal_id=row.get("signal_id") or "",
        task_id=row.get("task_id") or "",
        actor=row.get("actor") or "",
        child_id=row.get("child_id") or "",
        child_state=IntentState(row["child_state"]).to_proto()
        if row.get("child_state") in _STATE_NAMES else intent_pb2.INTENT_STATE_UNSPECIFIED,
    )
    if row["error_code"] is not None:
        msg.error.CopyFrom(
            intent_pb2.IntentError(code=row["error_code"], message=row["error_message"] or "")
        )
    return msg


def step_to_proto(row: Mapping[str, Any]) -> intent_pb2.StepRecord:
    return intent_pb2.StepRecord(
        index=row["idx"],
        name=row["name"],
        result=row["result"].encode(),
        attempt=row["attempt"],
        record_time=timestamp(row["record_time"]),
    )


def signal_to_proto(row: Mapping[str, Any]) -> intent_service_pb2.Signal:
    return intent_service_pb2.Signal(
        id=row["signal_id"],
        name=row["name"],
        payload=row["payload"].encode(),
        sender=row["sender"],
        create_time=timestamp(row["create_time"]),
        consumed_by_step=row["consumed_idx"] or 0,
    )


def human_task_to_proto(row: Mapping[str, Any]) -> human_task_pb2.HumanTask:
    msg = human_task_pb2.HumanTask(
        id=row["id"],
        intent_id=row["intent_id"],
        intent_type=row["intent_type"],
        to_agent=row["to_agent"],
        step_index=row["idx"],
        title=row["title"],
        description=row["description"] or "",
        outcomes=row["outcomes"],
        assignees=row["assignees"] or (),
        form_schema=row["form_schema"].encode() if row["form_schema"] is not None else b"",
        state=task_state_value(row["state"]),
        create_time=timestamp(row["create_time"]),
        due_time=timestamp(row["due_at"]),
        remind_time=timestamp(row["remind_at"]),
    )
    if row["state"] == "DECIDED":
        msg.decision.CopyFrom(human_task_pb2.HumanDecision(
            outcome=row["outcome"] or "",
            decided_by=row["decided_by"] or "",
            decide_time=timestamp(row["decide_time"]),
            comment=row["comment"] or "",
            form_data=row["form_data"].encode() if row["form_data"] is not None else b"",
        ))
    return msg


def stream_entry_to_proto(entry: Entry) -> stream_pb2.StreamEntry:
    msg = stream_pb2.StreamEntry(
        offset=entry.offset,
        attempt=entry.attempt,
        position=entry.position,
        time=timestamp(entry.time),
        format=entry.format,  # type: ignore[arg-type]  # ChunkFormat numbers, as the frames store them
        data=entry.data,
    )
    if entry.superseded is not None:
        msg.superseded.CopyFrom(stream_pb2.Superseded(
            positions=entry.superseded,
            reason=entry.reason,  # type: ignore[arg-type]  # SupersedeReason numbers
        ))
    return msg


def stream_info_to_proto(row: Mapping[str, Any]) -> stream_pb2.StreamInfo:
    return stream_pb2.StreamInfo(
        name=row["name"],
        next_offset=row["next_offset"],
        bytes=row["bytes"],
        create_time=timestamp(row["create_time"]),
        update_time=timestamp(row["update_time"]),
        pruned=row["pruned"],
    )
