"""The invariants, checked at the end of a run against what the database
holds (intents, events, step records, the agents' ledger) and what every
client call answered."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .config import INTENT_KINDS, SoakConfig
from .db import SyncDb
from .faults import Fault
from .model import (
    CHILD_STEPS,
    FAIL_CODE,
    GATHER_RECORD,
    START_RECORD,
    expected_result,
    signal_value,
    step_name,
    step_value,
)
from .report import Invariant, Latency, Report
from .workload import Outcome

TERMINAL = {"COMPLETED", "FAILED", "CANCELED", "TIMED_OUT"}
# finish_time is the database's now() (a transaction's start) and the
# deadline the client's clock: one machine, so only this much apart.
CLOCK_SLACK = timedelta(seconds=0.05)


@dataclass
class Snapshot:
    intents: dict[str, dict[str, Any]]
    events: dict[str, list[dict[str, Any]]]
    steps: dict[str, list[dict[str, Any]]]
    ledger: dict[str, list[dict[str, Any]]]
    attempts: dict[str, list[dict[str, Any]]]
    waits: dict[str, list[dict[str, Any]]]
    signals: dict[str, list[dict[str, Any]]]
    # A family parent's gather returns (chaos_children), by parent.
    children: dict[str, list[dict[str, Any]]]

    def children_of(self) -> dict[str, list[dict[str, Any]]]:
        """The intents that have a parent, by parent, in start order."""
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in sorted((r for r in self.intents.values() if r["parent_id"] is not None),
                          key=lambda r: (r["parent_idx"], r["parent_ord"])):
            out[row["parent_id"]].append(row)
        return out


def _group(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        out[row["intent_id"]].append(row)
    return out


def snapshot(db: SyncDb, tenant: str) -> Snapshot:
    """The normal tenant's intents (a hostile tenant's are not the workload's)."""
    intents = {r["id"]: r for r in db.fetch(
        "SELECT id, state::text AS state, attempt, parked_attempts, max_attempts, steps_completed,"
        " result::text AS result,"
        " error_code, error_message, deadline, finish_time, create_time, last_seq, idempotency_key, sender,"
        " parent_id, parent_idx, parent_ord, cancel_reason"
        " FROM intents WHERE tenant = $1", tenant, timeout=120)}
    events = _group(db.fetch(
        "SELECT intent_id, seq, type, time, state::text AS state, attempt, message, step_index"
        " FROM intent_events WHERE intent_id IN (SELECT id FROM intents WHERE tenant = $1)"
        " ORDER BY intent_id, seq", tenant, timeout=120))
    steps = _group(db.fetch(
        "SELECT intent_id, idx, name, result::text AS result, attempt, lease_token::text AS lease_token,"
        " record_time FROM intent_steps WHERE intent_id IN (SELECT id FROM intents WHERE tenant = $1)"
        " ORDER BY intent_id, idx", tenant, timeout=120))
    ledger = _group(db.fetch(
        "SELECT intent_id, step, attempt, lease_token::text AS lease_token, pid, began, at"
        " FROM chaos_ledger ORDER BY id", timeout=120))
    attempts = _group(db.fetch(
        "SELECT intent_id, attempt, lease_token::text AS lease_token, pid, at FROM chaos_attempts ORDER BY at",
        timeout=120))
    waits = _group(db.fetch(
        "SELECT intent_id, attempt, lease_token::text AS lease_token, value::text AS value, at"
        " FROM chaos_waits ORDER BY at", timeout=120))
    signals = _group(db.fetch(
        "SELECT intent_id, signal_id, name, payload::text AS payload, consumed_idx FROM intent_signals"
        " WHERE intent_id IN (SELECT id FROM intents WHERE tenant = $1) ORDER BY seq", tenant, timeout=120))
    children = _group(db.fetch(
        "SELECT intent_id, attempt, lease_token::text AS lease_token, child_ids::text AS child_ids,"
        " results::text AS results, at FROM chaos_children ORDER BY at", timeout=120))
    return Snapshot(intents, events, steps, ledger, attempts, waits, signals, children)


def _expected_states(outcome: Outcome) -> set[str]:
    kind = outcome.plan.kind
    if kind in ("plain", "idem", "wait") or (kind == "family" and outcome.plan.cancel_after is None):
        return {"COMPLETED"}
    if kind == "fail":
        return {"FAILED"}
    if kind == "deadline":
        return {"TIMED_OUT", "COMPLETED"}
    # cancel, or a family parent cancelled while its children run
    if outcome.cancel == "canceled":
        return {"CANCELED"}
    if outcome.cancel is None or outcome.cancel == "too_late":
        return {"COMPLETED"}
    return {"CANCELED", "COMPLETED"}  # the cancel call itself failed: either


def check(cfg: SoakConfig, snap: Snapshot, outcomes: list[Outcome], faults: list[Fault], report: Report,
          extra: dict[str, list[str]]) -> None:
    m = cfg.steps
    inv = {name: Invariant(name) for name in (
        "every intent terminal",
        "final state as expected",
        "no intent lost",
        "one intent per idempotency key",
        "recorded steps exact (1..n, once, in order)",
        "no COMPLETED intent with incomplete steps",
        "no step run after it was recorded",
        "recorded steps ran under their lease",
        "attempts counted right",
        "event log gapless, ends in the intent's state",
        "wait_for returned the right terminal state",
        "no wait returned twice or lost its value",
        "no child created twice, recorded children = awaited",
        "children of a parent that did not complete canceled",
        "no process died on its own",
        "harness ran cleanly",
        *(["hostile tenant attacked, answered only with client errors"] if cfg.hostile else []),
    )}

    # ---------------------------------------------------------------- sends
    lost = inv["no intent lost"]
    by_id: dict[str, Outcome] = {}
    by_key = {r["idempotency_key"]: r["id"] for r in snap.intents.values() if r["idempotency_key"]}
    refused_late = 0
    for outcome in outcomes:
        lost.checked += 1
        plan = outcome.plan
        if not outcome.ids:
            created = by_key.get(plan.key)
            if created is not None:
                by_id[created] = outcome
                lost.fail(f"#{plan.index} ({plan.kind}): every send failed ({'; '.join(outcome.send_errors)}),"
                          f" yet intent {created} was created under its key")
            elif plan.kind == "deadline" and outcome.send_errors and all(
                    "is in the past" in e for e in outcome.send_errors[-1:]):
                # Nothing was promised: the deadline passed while the client
                # retried through an outage, and nothing was created.
                refused_late += 1
            else:
                lost.fail(f"#{plan.index} ({plan.kind}) was never acknowledged: {'; '.join(outcome.send_errors)}")
            continue
        for intent_id in outcome.ids:
            if intent_id not in snap.intents:
                lost.fail(f"#{plan.index}: send answered {intent_id}, which is not in the database")
        by_id[outcome.ids[0]] = outcome
    for intent_id, row in snap.intents.items():
        # A child was sent by its parent, not the workload: its own invariant
        # checks it belongs to a family parent.
        if intent_id not in by_id and row["parent_id"] is None:
            lost.fail(f"{intent_id} is in the database but no send answered it")
    report.sends_refused = refused_late
    if refused_late:
        lost.note = (f"{refused_late} deadline sends refused (deadline passed while retrying through an outage;"
                     " nothing created)")

    idem = inv["one intent per idempotency key"]
    keys = Counter((r["sender"], r["idempotency_key"]) for r in snap.intents.values() if r["idempotency_key"])
    for outcome in outcomes:
        idem.checked += 1
        plan = outcome.plan
        if len(set(outcome.ids)) > 1:
            idem.fail(f"#{plan.index}: key {plan.key} answered {sorted(set(outcome.ids))}")
        if plan.kind == "idem" and len(outcome.ids) == 2 and outcome.created.count(True) > 1:
            idem.fail(f"#{plan.index}: both sends of key {plan.key} say they created the intent")
    for (sender, key), count in keys.items():
        if count > 1:
            idem.fail(f"key {key} of {sender} has {count} intents")

    # ---------------------------------------------------------------- per intent
    terminal = inv["every intent terminal"]
    expected = inv["final state as expected"]
    exact = inv["recorded steps exact (1..n, once, in order)"]
    incomplete = inv["no COMPLETED intent with incomplete steps"]
    rerun = inv["no step run after it was recorded"]
    provenance = inv["recorded steps ran under their lease"]
    attempts = inv["attempts counted right"]
    log = inv["event log gapless, ends in the intent's state"]
    waited = inv["wait_for returned the right terminal state"]
    signaled = inv["no wait returned twice or lost its value"]
    wakes = 0
    released: Counter[str] = Counter()
    extra_deliveries = 0
    step_runs = 0
    reruns = 0
    late_writes = 0
    family_redeliveries = 0  # of family parents and their children: the faults hit them too

    kids_of = snap.children_of()
    for intent_id, row in snap.intents.items():
        state = row["state"]
        found = by_id.get(intent_id)
        parent = snap.intents.get(row["parent_id"]) if row["parent_id"] is not None else None
        # A family parent's child has steps of its own number.
        m = CHILD_STEPS if row["parent_id"] is not None else cfg.steps
        events = snap.events.get(intent_id, [])
        steps = snap.steps.get(intent_id, [])
        ledger = snap.ledger.get(intent_id, [])
        starts = snap.attempts.get(intent_id, [])
        # The records of the handler's steps; a wait's record (a name from
        # "@") takes a position of its own in the sequence, as do a family
        # parent's start and gather.
        user_steps = [s for s in steps if not s["name"].startswith("@")]
        family_records = [s for s in steps if s["name"] in (START_RECORD, GATHER_RECORD)]
        wait_records = [s for s in steps if s["name"].startswith("@") and s not in family_records]

        terminal.checked += 1
        if state not in TERMINAL:
            terminal.fail(f"{intent_id} is {state} (attempt {row['attempt']}, {row['steps_completed']} steps)")

        # Final state.
        if found is not None:
            outcome = found
            expected.checked += 1
            plan = outcome.plan
            want = _expected_states(outcome)
            if state not in want:
                expected.fail(f"#{plan.index} {intent_id} ({plan.kind}) is {state} ({row['error_code']}:"
                              f" {row['error_message']}), expected {'/'.join(sorted(want))}")
            elif state == "COMPLETED":
                result = json.loads(row["result"]) if row["result"] else None
                want_result = expected_result(
                    intent_id, m, signal_value(plan.key) if plan.wait_at else None,
                    [k["id"] for k in kids_of.get(intent_id, [])] if plan.children is not None else None)
                if result != want_result:
                    expected.fail(f"#{plan.index} {intent_id}: result {result}, expected {want_result}")
            if state == "FAILED" and plan.kind == "fail":
                if row["error_code"] != FAIL_CODE:
                    expected.fail(f"#{plan.index} {intent_id}: FAILED with {row['error_code']}, expected {FAIL_CODE}")
                elif row["steps_completed"] != (plan.fail_at or 0) - 1:
                    expected.fail(f"#{plan.index} {intent_id}: failed at step {plan.fail_at} but "
                                  f"{row['steps_completed']} steps are recorded")
            if plan.kind == "deadline" and row["deadline"] is not None and row["finish_time"] is not None:
                if state == "COMPLETED" and row["finish_time"] > row["deadline"] + CLOCK_SLACK:
                    expected.fail(f"#{plan.index} {intent_id}: COMPLETED at {row['finish_time']:%T.%f},"
                                  f" after its deadline {row['deadline']:%T.%f}")
                if state == "TIMED_OUT" and row["finish_time"] < row["deadline"] - CLOCK_SLACK:
                    expected.fail(f"#{plan.index} {intent_id}: TIMED_OUT at {row['finish_time']:%T.%f},"
                                  f" before its deadline {row['deadline']:%T.%f}")

            waited.checked += 1
            if outcome.wait_error is not None:
                waited.fail(f"#{plan.index} {intent_id}: wait_for raised {outcome.wait_error}")
            elif outcome.waited is None:
                waited.fail(f"#{plan.index} {intent_id}: wait_for never returned")
            elif outcome.waited.state.value != state or not outcome.waited.terminal:
                waited.fail(f"#{plan.index} {intent_id}: wait_for returned {outcome.waited.state.value},"
                            f" the intent is {state}")

        elif parent is not None:
            # A child: its own result, unless its parent ended otherwise first
            # (then the cascade may have canceled it: checked below).
            expected.checked += 1
            want = {"COMPLETED"} if parent["state"] == "COMPLETED" else {"COMPLETED", "CANCELED"}
            if state not in want:
                expected.fail(f"child {intent_id} of {row['parent_id']} ({parent['state']}) is {state}"
                              f" ({row['error_code']}: {row['error_message']}), expected {'/'.join(sorted(want))}")
            elif state == "COMPLETED":
                result = json.loads(row["result"]) if row["result"] else None
                if result != expected_result(intent_id, CHILD_STEPS):
                    expected.fail(f"child {intent_id}: result {result}, expected"
                                  f" {expected_result(intent_id, CHILD_STEPS)}")

        # Recorded steps: 1..k, once each, with the names and values the agent makes.
        exact.checked += 1
        indexes = [s["idx"] for s in steps]
        if indexes != list(range(1, len(steps) + 1)):
            exact.fail(f"{intent_id}: recorded step indexes {indexes}")
        elif len(steps) != row["steps_completed"]:
            exact.fail(f"{intent_id}: {len(steps)} step records but steps_completed = {row['steps_completed']}")
        else:
            for number, s in enumerate(user_steps, start=1):
                value = json.loads(s["result"])
                if s["name"] != step_name(number) or value != {"i": number, "v": step_value(intent_id, number)}:
                    exact.fail(f"{intent_id}: step {number} (position {s['idx']}) recorded as {s['name']} = {value}")
                    break
        if len(user_steps) > m or len(wait_records) > 1 or len(family_records) > 2:
            exact.fail(f"{intent_id}: {len(user_steps)} steps, {len(wait_records)} waits and"
                       f" {len(family_records)} starts and gathers recorded, the intent has {m} steps")

        if state == "COMPLETED":
            incomplete.checked += 1
            if len(user_steps) != m or row["steps_completed"] != len(steps):
                incomplete.fail(f"{intent_id}: COMPLETED with {len(user_steps)} step records"
                                f" (steps_completed {row['steps_completed']}) of {m}")

        # The wait for the signal: taken once, its value never lost or changed.
        plan_of = by_id.get(intent_id)
        if plan_of is not None and plan_of.plan.wait_at is not None:
            signaled.checked += 1
            want_signal = signal_value(plan_of.plan.key)
            returns = snap.waits.get(intent_id, [])
            inbox = snap.signals.get(intent_id, [])
            consumed = [x for x in inbox if x["consumed_idx"] is not None]
            if len(inbox) > 1:
                signaled.fail(f"{intent_id}: {len(inbox)} signals kept for one signal id")
            if any(json.loads(x["value"]) != want_signal for x in returns):
                signaled.fail(f"{intent_id}: the wait returned {[x['value'] for x in returns]},"
                              f" expected {want_signal}")
            per_attempt = Counter(x["attempt"] for x in returns)
            if any(c > 1 for c in per_attempt.values()):
                signaled.fail(f"{intent_id}: the wait returned twice in one attempt: {dict(per_attempt)}")
            for wait_record in wait_records:
                value = json.loads(wait_record["result"])
                if value.get("signal", {}).get("payload") != want_signal:
                    signaled.fail(f"{intent_id}: the wait recorded {value}, expected the payload {want_signal}")
            if state == "COMPLETED" and (len(consumed) != 1 or len(wait_records) != 1):
                signaled.fail(f"{intent_id}: COMPLETED with {len(consumed)} signals taken and"
                              f" {len(wait_records)} wait records")
            if any(x.startswith("error") for x in plan_of.signals) and state == "COMPLETED" and not consumed:
                signaled.fail(f"{intent_id}: {plan_of.signals}")
        wakes += row["parked_attempts"]

        # Side effects against step records, by the handler's step number.
        record: dict[int, dict[str, Any]] = dict(enumerate(user_steps, start=1))
        per_step: Counter[int] = Counter()
        for entry in ledger:
            step_runs += 1
            per_step[entry["step"]] += 1
            rec = record.get(entry["step"])
            rerun.checked += 1
            if rec is None:
                continue
            if entry["began"] > rec["record_time"]:
                rerun.fail(
                    f"{intent_id} step {entry['step']}: run by attempt {entry['attempt']} (pid {entry['pid']})"
                    f" began {_ms(entry['began'] - rec['record_time'])} after attempt {rec['attempt']}"
                    f" recorded it")
            elif entry["at"] > rec["record_time"] and entry["lease_token"] != rec["lease_token"]:
                late_writes += 1
        reruns += sum(c - 1 for c in per_step.values() if c > 1)
        for number, s in record.items():
            provenance.checked += 1
            if not any(e["step"] == number and e["lease_token"] == s["lease_token"] for e in ledger):
                provenance.fail(f"{intent_id} step {number}: recorded by attempt {s['attempt']}, whose lease"
                                " never ran it")

        # Attempts.
        attempts.checked += 1
        delivered = [e for e in events if e["type"] == "DELIVERED"]
        if row["attempt"] - row["parked_attempts"] > row["max_attempts"]:
            attempts.fail(f"{intent_id}: attempt {row['attempt']} ({row['parked_attempts']} parked)"
                          f" > max_attempts {row['max_attempts']}")
        parks = sum(1 for e in events if e["type"] == "WAITING")
        if parks != row["parked_attempts"]:
            attempts.fail(f"{intent_id}: {parks} WAITING events but parked_attempts = {row['parked_attempts']}")
        if [e["attempt"] for e in delivered] != list(range(1, len(delivered) + 1)):
            attempts.fail(f"{intent_id}: DELIVERED events carry attempts {[e['attempt'] for e in delivered]}")
        elif len(delivered) != row["attempt"]:
            attempts.fail(f"{intent_id}: {len(delivered)} deliveries but attempt = {row['attempt']}")
        too_new = [x["attempt"] for x in [*ledger, *starts, *steps] if x["attempt"] > row["attempt"]]
        if too_new:
            attempts.fail(f"{intent_id}: work of attempt {max(too_new)} but the intent counts {row['attempt']}")
        # A wake is a delivery of its own, not a redelivery.
        extra_deliveries += max(0, len(delivered) - 1 - row["parked_attempts"])
        if parent is not None or (found is not None and found.plan.children is not None):
            family_redeliveries += max(0, len(delivered) - 1 - row["parked_attempts"])

        # Event log.
        log.checked += 1
        seqs = [e["seq"] for e in events]
        if seqs != list(range(1, len(events) + 1)):
            log.fail(f"{intent_id}: event seqs {_runs(seqs)}")
        elif row["last_seq"] != len(events):
            log.fail(f"{intent_id}: last_seq {row['last_seq']} but {len(events)} events")
        elif not events or events[-1]["state"] != state:
            last = events[-1]["state"] if events else None
            log.fail(f"{intent_id}: last event state {last}, intent state {state}")
        elif events[0]["type"] != "CREATED":
            log.fail(f"{intent_id}: first event is {events[0]['type']}")
        for e in events:
            if e["type"] == "RELEASED":
                released[e["message"] or "retryable failure"] += 1
            elif e["type"] == "FAILED" and e["message"] == "LEASE_EXPIRED":
                released["LEASE_EXPIRED (attempts spent: FAILED)"] += 1

    family = _check_families(snap, by_id, kids_of, inv["no child created twice, recorded children = awaited"],
                             inv["children of a parent that did not complete canceled"])

    # ---------------------------------------------------------------- processes and harness
    procs = inv["no process died on its own"]
    procs.checked = 1
    for message in extra.get("unexpected_exits", []):
        procs.fail(message)
    harness = inv["harness ran cleanly"]
    harness.checked = 1
    for message in extra.get("harness_errors", []):
        harness.fail(message)

    if cfg.hostile:
        _check_hostile(report, inv["hostile tenant attacked, answered only with client errors"])
    report.invariants = list(inv.values())
    # The workload's own intents; the children its family parents started are in ``family``.
    report.intents_in_db = sum(1 for r in snap.intents.values() if r["parent_id"] is None)
    report.states = dict(Counter(r["state"] for r in snap.intents.values()))
    report.kinds = {k: sum(1 for o in outcomes if o.plan.kind == k) for k in INTENT_KINDS}
    report.redeliveries = sum(released.values())
    report.extra_deliveries = extra_deliveries
    report.wakes = wakes
    report.released = dict(released)
    report.step_runs = step_runs
    report.step_reruns = reruns
    report.late_ledger_writes = late_writes
    report.family = {**family, "redeliveries": family_redeliveries} if family else {}
    report.latencies = latencies(snap, faults) + step_write_latencies(snap, by_id, report.hostile_started_at)


def _check_families(snap: Snapshot, by_id: dict[str, Outcome], kids_of: dict[str, list[dict[str, Any]]],
                    once: Invariant, cascade: Invariant) -> dict[str, int]:
    """Each family parent made its K children once, at one position, and
    every record of them (its start, its gather, each gather return its
    handler saw, its result) names those children with their own results;
    when it did not complete, the cascade canceled those still live."""
    counts: Counter[str] = Counter()
    for parent_id, kids in kids_of.items():
        outcome = by_id.get(parent_id)
        if outcome is None or outcome.plan.children is None:
            once.checked += 1
            once.fail(f"{len(kids)} children of {parent_id}, which is no family parent of the workload")
    for parent_id, outcome in by_id.items():
        plan = outcome.plan
        row = snap.intents.get(parent_id)
        if plan.children is None or row is None:
            continue
        once.checked += 1
        counts["parents"] += 1
        state = row["state"]
        counts["parents completed" if state == "COMPLETED" else "parents ended otherwise"] += 1
        kids = kids_of.get(parent_id, [])
        ids = [k["id"] for k in kids]
        counts["children"] += len(kids)
        who = f"#{plan.index} {parent_id} ({state})"
        # One start inserts all K in one statement: all of them or none.
        if len(kids) != plan.children and (state == "COMPLETED" or kids):
            once.fail(f"{who}: {len(kids)} children, it starts {plan.children}: {ids}")
        positions = {k["parent_idx"] for k in kids}
        if positions and positions != {plan.child_at}:
            once.fail(f"{who}: children at positions {sorted(positions)}, it starts them at {plan.child_at}")
        steps = {s["idx"]: s for s in snap.steps.get(parent_id, [])}
        want_results = [expected_result(k, CHILD_STEPS) for k in ids]
        if kids:
            start = steps.get(kids[0]["parent_idx"])
            started = [c.get("id") for c in json.loads(start["result"]).get("children", [])] if start else None
            if start is None or start["name"] != START_RECORD or started != ids:
                once.fail(f"{who}: its start record {start and start['name']} lists {started},"
                          f" its children (in start order) are {ids}")
            gather = steps.get(kids[0]["parent_idx"] + 1)
            if gather is not None:
                value = json.loads(gather["result"])
                got = [(c.get("id"), c.get("state"), c.get("result")) for c in value.get("children", [])]
                if gather["name"] != GATHER_RECORD or got != [(k, "COMPLETED", r) for k, r in zip(ids, want_results,
                                                                                                  strict=True)]:
                    once.fail(f"{who}: its gather record {gather['name']} is {got}, its children {ids}")
            elif state == "COMPLETED":
                once.fail(f"{who}: COMPLETED without a gather record after its start")
        returns = snap.children.get(parent_id, [])
        counts["gather returns"] += len(returns)
        for ret in returns:
            if json.loads(ret["child_ids"]) != ids or json.loads(ret["results"]) != want_results:
                once.fail(f"{who}: attempt {ret['attempt']}'s gather returned {ret['child_ids']} ="
                          f" {ret['results']}, its children are {ids}")
        per_attempt = Counter(ret["attempt"] for ret in returns)
        if any(c > 1 for c in per_attempt.values()):
            once.fail(f"{who}: a gather returned twice in one attempt: {dict(per_attempt)}")
        # An attempt that recorded a step after the gather got past it, and
        # wrote what it returned before that step ran.
        unseen = _leases_past_gather(snap, parent_id) - {ret["lease_token"] for ret in returns}
        if unseen:
            once.fail(f"{who}: steps after its gather recorded under leases {sorted(unseen)},"
                      " whose gather returns are missing")
        if state == "COMPLETED" and not returns:
            once.fail(f"{who}: COMPLETED, but no attempt's gather returned")
        for kid in kids:
            counts[f"children {kid['state']}"] += 1
            if state == "COMPLETED":
                continue
            cascade.checked += 1
            reason = f"parent {parent_id} ended {state}"
            if kid["state"] == "CANCELED":
                counts["children canceled by the cascade"] += 1
                if kid["cancel_reason"] != reason:
                    cascade.fail(f"child {kid['id']} of {who}: CANCELED with reason {kid['cancel_reason']!r},"
                                 f" expected {reason!r}")
            elif kid["state"] != "COMPLETED":
                cascade.fail(f"child {kid['id']} of {who} is {kid['state']}, expected CANCELED ({reason})"
                             " or COMPLETED before it")
    return dict(counts)


def _leases_past_gather(snap: Snapshot, intent_id: str) -> set[str]:
    """The lease tokens that recorded an intent's steps after its children's
    gather."""
    steps = snap.steps.get(intent_id, [])
    gather = [s["idx"] for s in steps if s["name"] == GATHER_RECORD]
    return {s["lease_token"] for s in steps if gather and s["idx"] > gather[0]}


def latencies(snap: Snapshot, faults: list[Fault]) -> list[Latency]:
    """From each death (or freeze) to the next delivery of every intent the
    victim was working on."""
    names = {
        "agent_kill": "agent death -> next DELIVERED",
        "sidecar_kill": "sidecar death -> reassignment (next DELIVERED)",
        "sidecar_stop": "sidecar freeze -> reassignment (next DELIVERED)",
    }
    out = {kind: Latency(name) for kind, name in names.items()}
    for fault in faults:
        if fault.kind not in out:
            continue
        for intent_id, attempt in fault.affected:
            for e in snap.events.get(intent_id, []):
                if e["type"] == "DELIVERED" and e["attempt"] > attempt:
                    out[fault.kind].samples.append(max(0.0, e["time"].timestamp() - fault.at))
                    break
    return list(out.values())


# What a hostile write may be answered with: the caller's fault, said so.
CLIENT_ERRORS = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "PERMISSION_DENIED",
                           "RESOURCE_EXHAUSTED", "ALREADY_EXISTS", "OUT_OF_RANGE"})


def _check_hostile(report: Report, inv: Invariant) -> None:
    """Every actor really attacked (sent writes), and the server answered
    them as the caller's errors (or UNAVAILABLE during a database fault):
    never INTERNAL or UNKNOWN, and no stream of
    theirs ended that way. (Harm to the normal tenant is what every other
    invariant and the step latencies show.)"""
    for actor in report.hostile:
        inv.checked += 1
        mode = actor.get("mode")
        sent = sum(dict(actor.get("sent") or {}).values())
        if actor.get("missing") or sent == 0:
            inv.fail(f"{mode}: sent no writes ({actor.get('notes')})")
            continue
        answers: dict[str, int] = dict(actor.get("answers") or {})
        ends: dict[str, int] = dict(actor.get("stream_ends") or {})
        # UNAVAILABLE is the truth while PostgreSQL is restarted or away (a fault).
        bad = {k: v for k, v in answers.items() if k not in ("OK", "UNAVAILABLE") and k not in CLIENT_ERRORS}
        bad_ends = {k: v for k, v in ends.items() if k in ("INTERNAL", "UNKNOWN")}
        if bad or bad_ends:
            inv.fail(f"{mode}: answers {bad or '-'}, stream ends {bad_ends or '-'} ({actor.get('notes')})")
        if mode == "poison" and answers.get("OK"):
            inv.fail(f"poison: {answers['OK']} malformed or foreign writes answered OK")


def step_write_latencies(snap: Snapshot, by_id: dict[str, Outcome], hostile_at: float | None) -> list[Latency]:
    """The normal tenant's step writes: record_time - (the recorded run's
    start + the step's work), i.e. from the step's end to its commit; split
    at the hostile tenant's start when there was one (before it: this run's
    own baseline)."""
    before = Latency("normal tenant step write (step end -> committed)"
                     + (", before the hostile tenant" if hostile_at else ""))
    during = Latency("normal tenant step write, with the hostile tenant")
    for intent_id, steps in snap.steps.items():
        outcome = by_id.get(intent_id)
        if outcome is None:
            continue
        work = outcome.plan.step_ms / 1000
        runs = {(e["step"], e["lease_token"]): e for e in snap.ledger.get(intent_id, [])}
        for s in steps:
            run = runs.get((s["idx"], s["lease_token"]))
            if run is None:
                continue
            sample = max(0.0, (s["record_time"] - run["began"]).total_seconds() - work)
            (during if hostile_at is not None and run["began"].timestamp() >= hostile_at else before).samples.append(
                sample)
    return [before, during] if hostile_at is not None else [before]


def _ms(delta: timedelta) -> str:
    return f"{delta.total_seconds() * 1000:.0f}ms"


def _runs(seqs: list[int]) -> str:
    if len(seqs) <= 12:
        return str(seqs)
    return f"{seqs[:6]}...{seqs[-6:]}"
