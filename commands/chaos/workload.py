"""The client side of a soak: a seeded plan of intents, sent by client
threads at paced times, each then waited for (and some cancelled) through
the client SDK, with what every call answered kept for the checker."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from queue import Empty, Queue
from typing import Any

from intentd.client import FailedPrecondition, IntentClient, IntentdError
from intentd.client.models import Intent

from .config import INTENT_KINDS, SoakConfig
from .model import INTENT_TYPE, SIGNAL_NAME, signal_value


@dataclass
class Plan:
    index: int
    kind: str
    address: str
    key: str
    steps: int
    step_ms: int
    send_at: float  # seconds after the workload starts
    fail_at: int | None = None
    deadline_s: float | None = None
    cancel_after: int | None = None  # cancel once this many steps are recorded
    wait_at: int | None = None  # wait for the signal before this step
    # When the signal is sent: "early" (right after the send, before the
    # wait), else this many seconds after the handler reached the wait (held
    # within the hold window, parked after it); twice with one signal id when
    # ``signal_twice``.
    signal_delay_s: float | None = None
    signal_twice: bool = False
    # A "family" parent starts this many children before step ``child_at``.
    children: int | None = None
    child_at: int | None = None

    def payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"steps": self.steps, "step_ms": self.step_ms, "fail_at": self.fail_at,
                                   "wait_at": self.wait_at}
        if self.children is not None:
            payload.update(children=self.children, child_at=self.child_at)
        return payload


@dataclass
class Outcome:
    plan: Plan
    ids: list[str] = field(default_factory=list)  # one per send (two for "idem")
    created: list[bool] = field(default_factory=list)
    send_errors: list[str] = field(default_factory=list)
    sent_at: float | None = None  # wall clock
    deadline: datetime | None = None
    cancel: str | None = None  # "canceled", "too_late", or an error
    cancel_at: float | None = None
    waited: Intent | None = None
    wait_error: str | None = None
    signals: list[str] = field(default_factory=list)  # "created", "matched" or an error, per send

    @property
    def intent_id(self) -> str | None:
        return self.ids[0] if self.ids else None


def make_plans(cfg: SoakConfig, addresses: list[str], run_tag: str) -> list[Plan]:
    rng = random.Random(f"{cfg.seed}:workload")
    kinds = [k for k in INTENT_KINDS if cfg.mix.get(k, 0) > 0]
    weights = [cfg.mix[k] for k in kinds]
    # Every kind at least once when there is room, then drawn by weight.
    chosen = list(kinds) if cfg.intents >= len(kinds) else []
    chosen += rng.choices(kinds, weights, k=cfg.intents - len(chosen))
    rng.shuffle(chosen)
    spacing = cfg.window / max(1, cfg.intents)
    plans = []
    for i, kind in enumerate(chosen):
        step_ms = rng.randint(*cfg.step_ms)
        plan = Plan(index=i, kind=kind, address=addresses[i % len(addresses)], key=f"chaos-{run_tag}-{i}",
                    steps=cfg.steps, step_ms=step_ms, send_at=i * spacing + rng.uniform(0, spacing))
        work = cfg.steps * step_ms / 1000
        if kind == "fail":
            plan.fail_at = rng.randint(1, cfg.steps)
        elif kind == "deadline":
            # Usually shorter than the work, so most time out; a few finish first.
            plan.deadline_s = max(0.3, rng.uniform(0.2, 1.1) * work)
        elif kind == "cancel":
            plan.step_ms = max(step_ms, 200)
            plan.cancel_after = rng.randint(1, max(1, cfg.steps - 1))
        elif kind == "wait":
            plan.wait_at = rng.randint(1, cfg.steps)
            plan.signal_delay_s = None if rng.random() < 0.25 else rng.uniform(0.0, 4.0)
            plan.signal_twice = rng.random() < 0.3
        elif kind == "family":
            plan.children = rng.randint(2, 4)
            plan.child_at = rng.randint(1, cfg.steps)
            if rng.random() < 0.3:
                # Cancelled once its start is recorded (position child_at,
                # after child_at - 1 steps): while its children run, so the
                # cascade has live children to cancel.
                plan.cancel_after = plan.child_at
        plans.append(plan)
    return plans


class Workload:
    def __init__(self, cfg: SoakConfig, target: str, plans: list[Plan], sender: str, wait_deadline: float,
                 metadata: list[tuple[str, str]] | None = None) -> None:
        self.cfg = cfg
        self.metadata = metadata or []
        self.target = target
        self.plans = plans
        self.sender = sender
        # Monotonic time after which waits give up (the harness's drain deadline).
        self.wait_deadline = wait_deadline
        self.outcomes = [Outcome(p) for p in plans]
        self._queue: Queue[Outcome] = Queue()
        for outcome in self.outcomes:
            self._queue.put(outcome)
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.started = 0.0
        self.finished = 0
        self._lock = threading.Lock()
        self.errors: list[str] = []

    def client(self) -> IntentClient:
        return IntentClient(
            self.target, sender=self.sender, max_retries=60, initial_backoff=0.05, max_backoff=1.0, timeout=30.0,
            channel_options=[("grpc.lb_policy_name", "round_robin")], metadata=self.metadata,
        )

    def start(self) -> None:
        self.started = time.monotonic()
        for n in range(min(self.cfg.client_threads, len(self.plans))):
            thread = threading.Thread(target=self._worker, name=f"chaos-client-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def done(self) -> bool:
        return self.finished >= len(self.outcomes)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _worker(self) -> None:
        with self.client() as client, self.client() as other:
            while not self._stop.is_set():
                try:
                    outcome = self._queue.get_nowait()
                except Empty:
                    return
                delay = self.started + outcome.plan.send_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                try:
                    self._run(client, other, outcome)
                except Exception as exc:  # recorded: the checker reports it
                    with self._lock:
                        self.errors.append(f"intent #{outcome.plan.index}: {type(exc).__name__}: {exc}")
                finally:
                    with self._lock:
                        self.finished += 1

    def _send(self, client: IntentClient, outcome: Outcome) -> None:
        plan = outcome.plan
        deadline = timedelta(seconds=plan.deadline_s) if plan.deadline_s is not None else None
        try:
            intent, created = client.send(
                intent_type=INTENT_TYPE, to_agent=plan.address, payload=plan.payload(),
                idempotency_key=plan.key, deadline=deadline, max_attempts=self.cfg.max_attempts,
                labels={"chaos_kind": plan.kind, "chaos_index": str(plan.index)},
            )
        except IntentdError as exc:
            with self._lock:
                outcome.send_errors.append(f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            outcome.ids.append(intent.id)
            outcome.created.append(created)
            if intent.deadline is not None:
                outcome.deadline = intent.deadline

    def _run(self, client: IntentClient, other: IntentClient, outcome: Outcome) -> None:
        plan = outcome.plan
        outcome.sent_at = time.time()
        if plan.kind == "idem":
            # The same key twice at once, on two channels (often two replicas).
            twin = threading.Thread(target=self._send, args=(other, outcome), daemon=True)
            twin.start()
            self._send(client, outcome)
            twin.join(120)
        else:
            self._send(client, outcome)
        intent_id = outcome.intent_id
        if intent_id is None:
            return
        if plan.cancel_after is not None:
            self._cancel_mid_run(client, outcome, intent_id, plan.cancel_after)
        if plan.wait_at is not None:
            self._signal(client, outcome, intent_id)
        remaining = self.wait_deadline - time.monotonic()
        try:
            outcome.waited = client.wait_for(intent_id, timeout=max(1.0, remaining))
        except IntentdError as exc:
            outcome.wait_error = f"{type(exc).__name__}: {exc}"

    def _signal(self, client: IntentClient, outcome: Outcome, intent_id: str) -> None:
        plan = outcome.plan
        if plan.signal_delay_s is not None:
            # Until the handler reached its wait, then a while (held or parked).
            self._until(client, intent_id, lambda current: current.terminal or current.waiting is not None)
            if self._stop.wait(plan.signal_delay_s):
                return
        for _ in range(2 if plan.signal_twice else 1):
            try:
                sent = client.signal(intent_id, SIGNAL_NAME, signal_value(plan.key), signal_id=f"{plan.key}:go")
                outcome.signals.append("created" if sent.created else "matched")
            except IntentdError as exc:
                outcome.signals.append(f"error: {type(exc).__name__}: {exc}")

    def _until(self, client: IntentClient, intent_id: str, reached: Callable[[Intent], bool]) -> Intent | None:
        """Polls the intent until ``reached`` says so (through outages), the
        workload stops or its deadline passes; the last intent read."""
        current: Intent | None = None
        while not self._stop.is_set() and time.monotonic() < self.wait_deadline:
            try:
                current = client.get(intent_id)
            except IntentdError:
                time.sleep(0.1)
                continue
            if reached(current):
                break
            time.sleep(0.05)
        return current

    def _cancel_mid_run(self, client: IntentClient, outcome: Outcome, intent_id: str, after: int) -> None:
        current = self._until(client, intent_id, lambda now: now.terminal or now.steps_completed >= after)
        if current is not None and current.terminal:
            return  # finished before we got to cancel it
        outcome.cancel_at = time.time()
        try:
            final = client.cancel(intent_id, reason=f"chaos: cancel after {after} steps")
            outcome.cancel = "canceled" if final.state.value == "CANCELED" else f"answered {final.state.value}"
        except FailedPrecondition:
            # Terminal already: it finished first, or our first try committed
            # and only its answer was lost (the retry then finds it CANCELED).
            try:
                state = client.get(intent_id).state.value
            except IntentdError as exc:
                outcome.cancel = f"error: {type(exc).__name__}: {exc}"
                return
            outcome.cancel = "canceled" if state == "CANCELED" else "too_late"
        except IntentdError as exc:
            outcome.cancel = f"error: {type(exc).__name__}: {exc}"


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
