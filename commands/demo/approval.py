"""``intentd demo approval``: a deploy pipeline waits for a human, with no
agent running while it waits.

A control plane on the embedded PostgreSQL, a sidecar supervising the sample
10-step deploy agent, one intent. Before step 6 the handler asks "Deploy to
production?"; the intent parks (WAITING on a human decision). The demo then
SIGKILLs the agent and its sidecar: nothing of the intent lived there. The
intent stays WAITING and its task is listed; a human approves it with
``intentd tasks approve``; a new agent is started, takes the intent, and
resumes at step 6. Everything printed at the end is read back from the
side-effect ledger and from the control plane, and the demo exits non-zero if
the story is not true.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from intentd.client import Event, HumanTaskState, Intent, IntentClient, IntentState, IntentType, Step
from intentd.core.waits import HUMAN, record_name
from intentd.testing.processes import ChildProcess

from ..cli import describe_wait_event
from .common import DemoProcesses, Ledger, default_data_dir, palette
from .deploy_agent import ADDRESS, APPROVAL_BEFORE, APPROVAL_TITLE, INTENT_TYPE, STAGES

TOTAL = len(STAGES)
# The wait takes the next position of the step sequence, as a step does.
WAIT_POSITION = APPROVAL_BEFORE
COMMENT = "staging looks good, ship it"
Say = Callable[[str], None]


class Failed(Exception):
    """The story stopped before its end; the message says where."""


class EventFeed:
    """The intent's events, from one watch in a thread of its own, so the demo
    can wait for the next one with a deadline."""

    def __init__(self, client: IntentClient, intent_id: str) -> None:
        self.events: list[Event] = []
        self._queue: queue.Queue[Event | BaseException | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(client, intent_id), daemon=True)
        self._thread.start()

    def _pump(self, client: IntentClient, intent_id: str) -> None:
        try:
            for event in client.watch(intent_id):
                self._queue.put(event)
        except BaseException as exc:  # handed to the demo's thread, which reports it
            self._queue.put(exc)
            return
        self._queue.put(None)

    def until(self, done: Callable[[Event], bool], deadline: float, what: str,
              show: Callable[[Event], None]) -> Event:
        """Shows events until one ``done`` accepts, which it returns."""
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise Failed(f"timed out waiting for {what}") from None
            if item is None:
                raise Failed(f"the intent's events ended before {what}")
            if isinstance(item, BaseException):
                raise Failed(f"watching the intent failed: {item}")
            self.events.append(item)
            show(item)
            if done(item):
                return item
            if item.state.terminal:
                why = f" ({item.error.code}: {item.error.message})" if item.error is not None else ""
                raise Failed(f"the intent ended {item.state.value}{why} before {what}")


@dataclass
class Story:
    """What the demo saw, for the report."""

    intent_id: str = ""
    parked: Intent | None = None
    task_id: str = ""
    first_agent: int | None = None
    killed: bool = False
    after_kill: Intent | None = None
    listed: bool = False
    approve_rc: int | None = None
    woke: Intent | None = None
    second_agent: int | None = None
    final: Intent | None = None
    steps: list[Step] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    task_decided_by: str = ""
    task_outcome: str = ""


def _zombie(pid: int) -> bool:
    # The killed agent's parent (its sidecar) died with it, and not every
    # container's init reaps orphans: a zombie runs nothing.
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return any(line.startswith("State:") and "Z" in line.split()[1:2] for line in status.splitlines())


def _gone(pid: int, timeout: float = 10) -> bool:
    """True once no process runs with the pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        if _zombie(pid):
            return True
        time.sleep(0.05)
    return False


def _intentd(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``intentd`` command, as a human at a terminal runs it."""
    return subprocess.run([sys.executable, "-m", "intentd.commands", *args, "--target", address],
                          capture_output=True, text=True, timeout=60)


def _show_command(say: Say, c: dict[str, str], args: list[str], done: subprocess.CompletedProcess[str]) -> None:
    say(f"  {c['bold']}$ intentd {shlex.join(args)}{c['reset']}")
    for line in (done.stdout + done.stderr).rstrip().splitlines():
        say(f"    {c['dim']}{line}{c['reset']}")


def run_approval_demo(args: argparse.Namespace) -> int:
    c = palette(sys.stdout.isatty() and not args.no_color)
    procs = DemoProcesses("intentd-demo-approval-", args.database_url, args.data_dir)
    ledger = Ledger(procs.work / "ledger.jsonl")
    story = Story()

    def say(text: str) -> None:
        print(text, flush=True)

    try:
        say(f"{c['bold']}intentd demo approval{c['reset']}: a {TOTAL}-step deploy asks a human before step "
            f"{APPROVAL_BEFORE}; no agent runs while it waits.")
        say(f"{c['dim']}logs and the side-effect ledger: {procs.work}{c['reset']}")
        if not procs.start_server(say):
            return 1
        where = args.database_url or f"embedded PostgreSQL in {args.data_dir or default_data_dir()}"
        say(f"control plane   {procs.address}  ({where})")
        with IntentClient(procs.address) as client:
            # Park as soon as the wait is unsatisfied, so the demo's agent is
            # free (and killable) at once.
            client.put_intent_type(IntentType(intent_type=INTENT_TYPE, wait_hold_ms=args.hold_ms))
            try:
                _tell(client, procs, ledger, story, args, c, say)
            except Failed as exc:
                say(f"\n{c['red']}✗ {exc}{c['reset']}")
                say(f"{c['dim']}logs: {procs.work}{c['reset']}")
                return 1
        ledger.poll()
        return _report(story, ledger, c, say)
    finally:
        procs.close()


def _start_agent(procs: DemoProcesses, ledger: Ledger, number: int) -> ChildProcess:
    agent_cmd = f"{shlex.quote(sys.executable)} -m intentd.commands.demo.deploy_agent"
    return procs.spawn(
        ["sidecar", "--server", procs.address, "--address", ADDRESS, "--capacity", "1", "--drain-grace", "1",
         "--listen", f"unix://{procs.work}/sidecar-{number}.sock", "--exec", agent_cmd],
        f"sidecar-{number}.log",
        {"INTENTD_DEMO_LEDGER": str(ledger.path), "INTENTD_LOG_LEVEL": "INFO"},
    )


def _tell(client: IntentClient, procs: DemoProcesses, ledger: Ledger, story: Story, args: argparse.Namespace,
          c: dict[str, str], say: Say) -> None:
    deadline = time.monotonic() + args.timeout
    sidecar = _start_agent(procs, ledger, 1)
    say(f"sidecar 1       pid {sidecar.pid}, supervising: python -m intentd.commands.demo.deploy_agent  ({ADDRESS})")
    story.intent_id = client.send_intent(
        intent_type=INTENT_TYPE, to_agent=ADDRESS,
        payload={"release": "v2.4.0", "step_seconds": args.step_seconds},
        idempotency_key=f"demo-approval-{uuid.uuid4().hex}",
    )
    say(f"intent          {story.intent_id}  {INTENT_TYPE} -> {ADDRESS}\n")
    feed = EventFeed(client, story.intent_id)
    show = _shower(c, say)

    # 1. Steps 1-5 run; the handler asks; the attempt parks.
    feed.until(lambda e: e.type == "WAITING" and e.wait_kind == HUMAN, deadline,
               "the intent to park on the human decision", show)
    story.parked = client.get(story.intent_id)
    waiting = story.parked.waiting
    story.task_id = waiting.task_id if waiting is not None else ""
    if story.parked.state is not IntentState.WAITING or not story.task_id:
        raise Failed(f"the intent is {story.parked.state.value}, waiting: {waiting}")
    ledger.poll()
    pids = {e["pid"] for e in ledger.entries}
    story.first_agent = min(pids) if len(pids) == 1 else None
    position = waiting.step_index if waiting is not None else "?"
    say(f"\n  {c['yellow']}⏸ WAITING{c['reset']} for a human: {APPROVAL_TITLE!r} at step {position}, "
        f"task {story.task_id}; the attempt ended, its lease and agent slot are free")

    # 2. Nothing of the intent lives in the agent: kill it, and its sidecar.
    sidecar.signal_group(signal.SIGKILL)
    assert sidecar.proc is not None
    sidecar.proc.wait(10)
    story.killed = story.first_agent is not None and _gone(story.first_agent)
    say(f"  {c['red']}✗ SIGKILL{c['reset']} agent pid {story.first_agent} and its sidecar pid {sidecar.pid}: "
        f"no agent runs for {ADDRESS} now")
    story.after_kill = client.get(story.intent_id)
    open_tasks = client.list_tasks(intent_id=story.intent_id).tasks
    story.listed = any(t.id == story.task_id and t.state is HumanTaskState.OPEN for t in open_tasks)
    say(f"  the intent is still {story.after_kill.state.value}; the task waits for a human:")
    listing = ["tasks", "list", "--intent", story.intent_id]
    _show_command(say, c, listing, _intentd(procs.address, *listing))

    # 3. A human approves, from the CLI; the decision wakes the intent.
    approving = ["tasks", "approve", story.task_id, "--comment", COMMENT]
    approved = _intentd(procs.address, *approving)
    story.approve_rc = approved.returncode
    _show_command(say, c, approving, approved)
    if approved.returncode != 0:
        raise Failed(f"`intentd tasks approve` exited {approved.returncode}")
    decided = feed.until(lambda e: e.type == "TASK_DECIDED", deadline, "the TASK_DECIDED event", show)
    story.task_outcome, story.task_decided_by = decided.message, decided.actor
    story.woke = client.get(story.intent_id)
    say(f"  the decision woke it: {story.woke.state.value}, for the next agent that attaches")

    # 4. A new agent takes it: steps 1-5 replay from their records, the wait
    # returns the decision, steps 6-10 run.
    sidecar = _start_agent(procs, ledger, 2)
    say(f"\nsidecar 2       pid {sidecar.pid}, a new agent process")
    feed.until(lambda e: e.state.terminal, deadline, "the intent to finish", show)
    story.final = client.wait_for(story.intent_id, timeout=max(1.0, deadline - time.monotonic()))
    story.steps = client.steps(story.intent_id)
    story.events = feed.events
    ledger.poll()
    later = {e["pid"] for e in ledger.entries if e["step"] >= APPROVAL_BEFORE}
    story.second_agent = min(later) if len(later) == 1 else None


def _shower(c: dict[str, str], say: Say) -> Callable[[Event], None]:
    def show(event: Event) -> None:
        waited = describe_wait_event(event)
        if waited is not None:
            say(f"  {c['yellow']}◆ {waited}{c['reset']}")
        elif event.type == "STEP_COMPLETED":
            if event.step_name.startswith("@"):
                say(f"  {c['green']}✓{c['reset']} position {event.step_index:>2}  the decision, recorded "
                    f"{c['dim']}{event.step_name}{c['reset']}")
            else:
                number = STAGES.index(event.step_name) + 1 if event.step_name in STAGES else "?"
                say(f"  {c['green']}✓{c['reset']} step {number:>2}/{TOTAL}  {event.step_name:<22} "
                    f"{c['dim']}attempt {event.attempt}{c['reset']}")
        elif event.type == "DELIVERED":
            say(f"  {c['yellow']}→ delivered{c['reset']}, attempt {event.attempt}")
        elif event.type == "RELEASED":
            say(f"  {c['yellow']}↺ released{c['reset']} ({event.message or 'lease ended'})")
        elif event.state.terminal:
            color = c["green"] if event.type == "COMPLETED" else c["red"]
            say(f"  {color}■ {event.type}{c['reset']} (attempt {event.attempt})")

    return show


def _report(story: Story, ledger: Ledger, c: dict[str, str], say: Say) -> int:
    began = Counter(e["step"] for e in ledger.entries if e["event"] == "begin")
    done = Counter(e["step"] for e in ledger.entries if e["event"] == "done")
    pid_of = {e["step"]: e["pid"] for e in ledger.entries}
    final = story.final
    k = APPROVAL_BEFORE
    before, after = range(1, k), range(k, TOTAL + 1)
    result = final.result if final is not None and isinstance(final.result, dict) else {}
    decision = result.get("decision") or {}
    decided = [e for e in story.events if e.type == "TASK_DECIDED"]
    created = [e for e in story.events if e.type == "TASK_CREATED"]
    waiting = story.parked.waiting if story.parked is not None else None
    names = [s.name for s in story.steps]
    expected_names = [*STAGES[:k - 1], record_name(HUMAN, APPROVAL_TITLE), *STAGES[k - 1:]]
    checks = [
        (f"the intent parked WAITING on a human decision at step {WAIT_POSITION} (task {story.task_id or '?'})",
         waiting is not None and waiting.kind == HUMAN and waiting.step_index == WAIT_POSITION
         and waiting.name == APPROVAL_TITLE),
        ("the agent and its sidecar were SIGKILLed while it waited", story.killed),
        ("with no agent running, the intent stayed WAITING and its task was listed OPEN",
         story.after_kill is not None and story.after_kill.state is IntentState.WAITING and story.listed),
        ("`intentd tasks approve` decided it (exit 0), and the decision woke the intent (PENDING)",
         story.approve_rc == 0 and story.woke is not None and story.woke.state is IntentState.PENDING),
        ("a new agent took it and the intent COMPLETED",
         final is not None and final.state is IntentState.COMPLETED),
        (f"steps 1-{k - 1} ran exactly once each, all in the first agent (pid {story.first_agent})",
         story.first_agent is not None
         and all(began[i] == 1 and done[i] == 1 and pid_of[i] == story.first_agent for i in before)),
        (f"resumed at step {k}: steps {k}-{TOTAL} ran exactly once each, all in the new agent "
         f"(pid {story.second_agent})",
         story.second_agent is not None and story.second_agent != story.first_agent
         and all(began[i] == 1 and done[i] == 1 and pid_of[i] == story.second_agent for i in after)),
        (f"the decision is in the result: {decision.get('outcome')} by {decision.get('decided_by')}",
         decision.get("outcome") == "approve" and bool(decision.get("decided_by"))
         and decision.get("task_id") == story.task_id and decision.get("comment") == COMMENT),
        (f"and in the events: TASK_CREATED, then TASK_DECIDED {story.task_outcome} by {story.task_decided_by}",
         len(created) == 1 and len(decided) == 1 and decided[0].message == "approve"
         and decided[0].actor == decision.get("decided_by") and decided[0].task_id == story.task_id),
        ("2 deliveries, 1 of them parked: attempt 2, parked_attempts 1 (1 attempt used of "
         f"{final.max_attempts if final else '?'})",
         final is not None and final.attempt == 2 and final.parked_attempts == 1),
        (f"{TOTAL + 1} records in order: steps 1-{k - 1} by attempt 1, the decision at {WAIT_POSITION}, "
         f"steps {k}-{TOTAL} by attempt 2",
         names == expected_names and [s.index for s in story.steps] == list(range(1, TOTAL + 2))
         and all(s.attempt == (1 if s.index < WAIT_POSITION else 2) for s in story.steps
                 if s.index != WAIT_POSITION)),
    ]
    say("")
    say(f"{c['bold']}What happened{c['reset']} (read back from the ledger and the control plane):")
    for text, ok in checks:
        say(f"  {c['green'] + '✓' if ok else c['red'] + '✗'}{c['reset']} {text}")
    say(f"\n  step executions: {sum(began.values())} for {TOTAL} steps")
    say(f"  result: {json.dumps(result)}")
    if all(ok for _, ok in checks):
        say(f"\n{c['green']}{c['bold']}Approved while no agent ran; resumed at step {k}: steps 1-{k - 1} "
            f"were never run again.{c['reset']}")
        return 0
    say(f"\n{c['red']}The story did not hold; see the logs above.{c['reset']}")
    return 1

