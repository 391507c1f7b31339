"""The chaos soak's family invariants judge what they are given: a family
parent whose records all name its children passes, and each way a child can
be created twice, lost from a record or left behind by the cascade fails.
(The soak itself, tests/chaos/test_soak.py, runs them against a real run.)"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from intentd.commands.chaos.checks import Snapshot, _check_families
from intentd.commands.chaos.model import CHILD_STEPS, GATHER_RECORD, START_RECORD, expected_result, step_name
from intentd.commands.chaos.report import Invariant
from intentd.commands.chaos.workload import Outcome, Plan

PARENT = "p1"
LEASE = "00000000-0000-0000-0000-000000000001"
AT = datetime(2026, 1, 1, tzinfo=UTC)


def _intent(intent_id: str, state: str, parent: str | None = None, idx: int | None = None, ord_: int | None = None,
            reason: str | None = None) -> dict[str, Any]:
    return {"id": intent_id, "state": state, "parent_id": parent, "parent_idx": idx, "parent_ord": ord_,
            "cancel_reason": reason}


def _family(state: str = "COMPLETED", kid_states: tuple[str, ...] = ("COMPLETED",) * 3,
            child_at: int = 2) -> tuple[Snapshot, dict[str, Outcome]]:
    kids = [f"k{n}" for n in range(len(kid_states))]
    intents = {PARENT: _intent(PARENT, state)}
    for n, (kid, kid_state) in enumerate(zip(kids, kid_states, strict=True)):
        intents[kid] = _intent(kid, kid_state, PARENT, child_at, n,
                               f"parent {PARENT} ended {state}" if kid_state == "CANCELED" else None)
    start = {"idx": child_at, "name": START_RECORD, "lease_token": LEASE,
             "result": json.dumps({"children": [{"id": k} for k in kids]})}
    gather = {"idx": child_at + 1, "name": GATHER_RECORD, "lease_token": LEASE, "result": json.dumps(
        {"children": [{"id": k, "state": "COMPLETED", "result": expected_result(k, CHILD_STEPS)} for k in kids]})}
    after = {"idx": child_at + 2, "name": step_name(child_at), "lease_token": LEASE, "result": "{}"}
    steps = [start, gather, after] if state == "COMPLETED" else [start]
    returns = [{"attempt": 1, "lease_token": LEASE, "child_ids": json.dumps(kids),
                "results": json.dumps([expected_result(k, CHILD_STEPS) for k in kids]), "at": AT}]
    snap = Snapshot(intents=intents, events={}, steps={PARENT: steps}, ledger={}, attempts={}, waits={},
                    signals={}, children={PARENT: returns} if state == "COMPLETED" else {})
    plan = Plan(index=0, kind="family", address="agent://a", key="k", steps=4, step_ms=100, send_at=0.0,
                children=len(kids), child_at=child_at)
    return snap, {PARENT: Outcome(plan, ids=[PARENT])}


def _judge(snap: Snapshot, by_id: dict[str, Outcome]) -> tuple[Invariant, Invariant, dict[str, int]]:
    once, cascade = Invariant("once"), Invariant("cascade")
    counts = _check_families(snap, by_id, snap.children_of(), once, cascade)
    return once, cascade, counts


def test_a_family_whose_records_match_passes() -> None:
    once, cascade, counts = _judge(*_family())
    assert once.ok and cascade.ok, (once.violations, cascade.violations)
    assert counts["children"] == 3 and counts["gather returns"] == 1 and counts["parents completed"] == 1


def test_a_child_created_twice_fails() -> None:
    snap, by_id = _family()
    snap.intents["k9"] = _intent("k9", "COMPLETED", PARENT, 2, 9)
    once, _, _ = _judge(snap, by_id)
    assert any("4 children, it starts 3" in v for v in once.violations), once.violations


def test_children_at_two_positions_fail() -> None:
    snap, by_id = _family()
    snap.intents["k2"]["parent_idx"] = 5
    once, _, _ = _judge(snap, by_id)
    assert any("positions [2, 5]" in v for v in once.violations), once.violations


@pytest.mark.parametrize("field", ["child_ids", "results"])
def test_a_gather_return_naming_other_children_fails(field: str) -> None:
    snap, by_id = _family()
    wrong = json.loads(snap.children[PARENT][0][field])
    wrong[0] = "other" if field == "child_ids" else {"steps": 2, "sum": -1}
    snap.children[PARENT].append({**snap.children[PARENT][0], "attempt": 2, field: json.dumps(wrong)})
    once, _, _ = _judge(snap, by_id)
    assert any("attempt 2's gather returned" in v for v in once.violations), once.violations


def test_a_completed_parent_without_its_gather_return_fails() -> None:
    snap, by_id = _family()
    snap.children.clear()
    once, _, _ = _judge(snap, by_id)
    assert any("gather returns are missing" in v for v in once.violations), once.violations


def test_a_start_record_listing_other_ids_fails() -> None:
    snap, by_id = _family()
    snap.steps[PARENT][0]["result"] = json.dumps({"children": [{"id": "k1"}, {"id": "k0"}, {"id": "k2"}]})
    once, _, _ = _judge(snap, by_id)
    assert any("its start record" in v for v in once.violations), once.violations


def test_the_cascade_canceled_a_canceled_parents_live_children() -> None:
    once, cascade, counts = _judge(*_family("CANCELED", ("COMPLETED", "CANCELED", "CANCELED")))
    assert once.ok and cascade.ok, (once.violations, cascade.violations)
    assert counts["children canceled by the cascade"] == 2


@pytest.mark.parametrize("kid_state", ["FAILED", "IN_PROGRESS"])
def test_a_child_the_cascade_left_fails(kid_state: str) -> None:
    _, cascade, _ = _judge(*_family("TIMED_OUT", ("CANCELED", kid_state, "COMPLETED")))
    assert any(f"is {kid_state}, expected CANCELED" in v for v in cascade.violations), cascade.violations


def test_a_child_canceled_for_another_reason_fails() -> None:
    snap, by_id = _family("FAILED", ("CANCELED",) * 3)
    snap.intents["k1"]["cancel_reason"] = "by hand"
    _, cascade, _ = _judge(snap, by_id)
    assert any("reason 'by hand'" in v for v in cascade.violations), cascade.violations


def test_a_child_of_no_family_parent_fails() -> None:
    snap, by_id = _family()
    snap.intents["stray"] = _intent("stray", "COMPLETED", "nobody", 1, 0)
    once, _, _ = _judge(snap, by_id)
    assert any("children of nobody" in v for v in once.violations), once.violations
