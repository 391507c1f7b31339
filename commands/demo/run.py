"""``intentd demo``: the step-47 story, told with real processes.

A control plane on the embedded PostgreSQL, a sidecar supervising the sample
50-step ETL agent, one intent. During step 47 the agent is SIGKILLed; the
sidecar notices, the intent is redelivered, the supervisor restarts the
agent, and the agent resumes at step 47. Everything printed at the end is
read back from the side-effect ledger and from the control plane, and the
demo exits non-zero if the story is not true.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from intentd.client import IntentClient, IntentState
from intentd.core.aio import serving

from .common import Ledger, default_data_dir, free_port, palette
from .etl_agent import ADDRESS, INTENT_TYPE, STAGES

BATCHES = 10
TOTAL_STEPS = BATCHES * len(STAGES)
def run_demo(args: argparse.Namespace) -> int:
    c = palette(sys.stdout.isatty() and not args.no_color)
    work = Path(tempfile.mkdtemp(prefix="intentd-demo-"))
    ledger = Ledger(work / "ledger.jsonl")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "INTENTD_LOG_LEVEL": "WARNING"}
    if args.database_url:
        env["INTENTD_DATABASE_URL"] = args.database_url
    if args.data_dir:
        env["INTENTD_DATA_DIR"] = args.data_dir
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str], log_name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (work / log_name).open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "intentd.commands", *argv], env={**env, **(extra_env or {})},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        procs.append(proc)
        return proc

    def say(text: str) -> None:
        print(text, flush=True)

    try:
        say(f"{c['bold']}intentd demo{c['reset']}: a 50-step ETL agent is SIGKILLed during step {args.kill_at}.")
        say(f"{c['dim']}logs and the side-effect ledger: {work}{c['reset']}")
        # Loopback only, so no keys: with a database URL, auth "auto" would ask for them.
        server = spawn(["server"], "server.log", {"INTENTD_LISTEN": address, "INTENTD_AUTH": "off"})
        deadline = time.monotonic() + 120
        while not serving(address):
            if server.poll() is not None or time.monotonic() > deadline:
                say(f"{c['red']}the control plane did not start:{c['reset']}\n" + (work / "server.log").read_text())
                return 1
            time.sleep(0.1)
        where = args.database_url or f"embedded PostgreSQL in {args.data_dir or default_data_dir()}"
        say(f"control plane   {address}  ({where})")
        agent_cmd = f"{shlex.quote(sys.executable)} -m intentd.commands.demo.etl_agent"
        sidecar = spawn(
            ["sidecar", "--server", address, "--address", ADDRESS, "--capacity", "1", "--exec", agent_cmd],
            "sidecar.log",
            {"INTENTD_DEMO_LEDGER": str(ledger.path), "INTENTD_LOG_LEVEL": "INFO"},
        )
        say(f"sidecar         pid {sidecar.pid}, supervising: python -m intentd.commands.demo.etl_agent  ({ADDRESS})")
        with IntentClient(address) as client:
            intent_id = client.send_intent(
                intent_type=INTENT_TYPE, to_agent=ADDRESS,
                payload={"batches": BATCHES, "step_seconds": args.step_seconds},
                idempotency_key=f"demo-{uuid.uuid4().hex}",
            )
            say(f"intent          {intent_id}  {INTENT_TYPE} -> {ADDRESS}\n")
            killed = _follow(client, intent_id, ledger, args, c, say)
            final = client.wait_for(intent_id, timeout=args.timeout)
            recorded = client.steps(intent_id)
        ledger.poll()
        return _report(final, recorded, ledger, killed, args, c, say)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _follow(client: IntentClient, intent_id: str, ledger: Ledger, args: argparse.Namespace,
            c: dict[str, str], say: Any) -> dict[str, Any] | None:
    """Prints the intent's events live and kills the agent during the chosen step."""
    killed: dict[str, Any] = {}
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            for entry in ledger.poll():
                if entry["event"] == "begin" and entry["step"] == args.kill_at and not killed:
                    # Let the step get going, then kill it before its result is recorded.
                    time.sleep(args.step_seconds / 2)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(entry["pid"], signal.SIGKILL)
                    killed.update(entry, killed_at=time.monotonic())
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    announced_kill = False
    try:
        for event in client.watch(intent_id):
            if killed and not announced_kill:
                announced_kill = True
                say(f"  {c['red']}✗ SIGKILL{c['reset']} agent pid {killed['pid']} during step {args.kill_at} "
                    f"({killed['name']}), before its result was recorded")
            if event.type == "STEP_COMPLETED":
                mark = f"{c['green']}✓{c['reset']}"
                say(f"  {mark} step {event.step_index:>2}/{TOTAL_STEPS}  {event.step_name:<26} "
                    f"{c['dim']}attempt {event.attempt}{c['reset']}")
            elif event.type == "DELIVERED":
                since = ""
                if killed and event.attempt > 1:
                    since = f" ({(time.monotonic() - killed['killed_at']) * 1000:.0f} ms after the kill)"
                say(f"  {c['yellow']}→ delivered{c['reset']}, attempt {event.attempt}{since}")
            elif event.type == "ACKNOWLEDGED" and event.attempt > 1:
                say(f"  {c['yellow']}↻ agent restarted by the sidecar; attempt {event.attempt} replays the recorded "
                    f"steps without running them{c['reset']}")
            elif event.type == "RELEASED":
                say(f"  {c['yellow']}↺ released{c['reset']} for redelivery ({event.message or 'lease ended'})")
            elif event.type in ("COMPLETED", "FAILED", "CANCELED", "TIMED_OUT"):
                color = c["green"] if event.type == "COMPLETED" else c["red"]
                say(f"  {color}■ {event.type}{c['reset']} (attempt {event.attempt})")
    finally:
        stop.set()
        thread.join(2)
    return killed or None


def _report(final: Any, recorded: list[Any], ledger: Ledger, killed: dict[str, Any] | None,
            args: argparse.Namespace, c: dict[str, str], say: Any) -> int:
    began = Counter(e["step"] for e in ledger.entries if e["event"] == "begin")
    done = Counter(e["step"] for e in ledger.entries if e["event"] == "done")
    k = args.kill_at
    before = range(1, k)
    after = range(k + 1, TOTAL_STEPS + 1)
    checks = [
        (f"the agent was SIGKILLed during step {k}", killed is not None),
        ("the intent COMPLETED", final.state is IntentState.COMPLETED),
        ("it took 2 attempts (one redelivery)", final.attempt == 2),
        (f"steps 1-{k - 1} ran exactly once each", all(began[i] == 1 and done[i] == 1 for i in before)),
        (f"step {k} began twice and finished once (killed before its result was recorded)",
         began[k] == 2 and done[k] == 1),
        (f"steps {k + 1}-{TOTAL_STEPS} ran exactly once each", all(began[i] == 1 for i in after)),
        (f"{TOTAL_STEPS} step results recorded, each once, in order",
         [s.index for s in recorded] == list(range(1, TOTAL_STEPS + 1))),
        (f"steps 1-{k - 1} recorded by attempt 1, steps {k}-{TOTAL_STEPS} by attempt 2",
         all(s.attempt == (1 if s.index < k else 2) for s in recorded)),
    ]
    say("")
    say(f"{c['bold']}What happened{c['reset']} (read back from the ledger and the control plane):")
    for text, ok in checks:
        say(f"  {c['green'] + '✓' if ok else c['red'] + '✗'}{c['reset']} {text}")
    runs = sum(began.values())
    say(f"\n  step executions: {runs} for {TOTAL_STEPS} steps (a restart-from-scratch framework: "
        f"{TOTAL_STEPS + k})")
    say(f"  result: {json.dumps(final.result)}")
    if all(ok for _, ok in checks):
        say(f"\n{c['green']}{c['bold']}Resumed at step {k}: steps 1-{k - 1} were never run again.{c['reset']}")
        return 0
    say(f"\n{c['red']}The story did not hold; see the logs above.{c['reset']}")
    return 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("story", nargs="?", choices=("etl", "approval", "stream"), default="etl",
                        help="etl (the default): the agent is SIGKILLed at step 47 of 50 and resumes there; "
                        "approval: a deploy waits for a human with no agent running, and resumes at step 6; "
                        "stream: an agent's answer streams live through a SIGKILL mid-sentence")
    parser.add_argument("--kill-at", type=int, default=47, help="etl: step during which the agent is killed (2-50)")
    parser.add_argument("--step-seconds", type=float, default=0.06, help="how long each step works")
    parser.add_argument("--hold-ms", type=int, default=0,
                        help="approval: the deploy type's wait_hold_ms (0: park at once)")
    parser.add_argument("--timeout", type=float, default=120, help="give up after this many seconds")
    parser.add_argument("--database-url", help="use this PostgreSQL instead of the embedded one")
    parser.add_argument("--data-dir", help="embedded PostgreSQL data directory")
    parser.add_argument("--no-color", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="intentd demo")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not 2 <= args.kill_at <= TOTAL_STEPS:
        parser.error(f"--kill-at must be 2..{TOTAL_STEPS}")
    return dispatch(args)


def dispatch(args: argparse.Namespace) -> int:
    """Runs the demo the arguments name."""
    if getattr(args, "story", "etl") == "approval":
        from .approval import run_approval_demo

        return run_approval_demo(args)
    if getattr(args, "story", "etl") == "stream":
        from .stream import run_stream_demo

        return run_stream_demo(args)
    return run_demo(args)
