"""``intentd demo stream``: an agent's answer streams live to the terminal,
and survives the agent being SIGKILLed mid-sentence.

A control plane on the embedded PostgreSQL, a sidecar supervising the sample
writer agent (three steps, each streaming its words), one intent, one reader
(``client.stream``) printing the tokens as they come. During step 2 the demo
SIGKILLs the agent; the sidecar restarts it, the intent is redelivered, and
the reader, which never reconnects, sees a marker saying that attempt 1's
step 2 tokens are superseded, then step 2 again and step 3. Step 1 is not
re-run (it was recorded). At the end the demo reads the stream again and
checks the story against the ledger and the control plane.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import time
import uuid
from collections import Counter
from typing import Any

from intentd.client import IntentClient, IntentState

from .common import DemoProcesses, Ledger, default_data_dir, palette
from .writer_agent import ADDRESS, INTENT_TYPE, SECTIONS, words

KILL_STEP = 2
KILL_AFTER_TOKENS = 12


def run_stream_demo(args: argparse.Namespace) -> int:
    c = palette(sys.stdout.isatty() and not args.no_color)
    procs = DemoProcesses("intentd-demo-stream-", args.database_url, args.data_dir)
    ledger = Ledger(procs.work / "ledger.jsonl")

    def say(text: str = "") -> None:
        print(text, flush=True)

    try:
        say(f"{c['bold']}intentd demo stream{c['reset']}: a writer agent streams its answer; it is SIGKILLed "
            f"mid-sentence in step {KILL_STEP}.")
        say(f"{c['dim']}logs and the side-effect ledger: {procs.work}{c['reset']}")
        if not procs.start_server(say):
            return 1
        where = args.database_url or f"embedded PostgreSQL in {args.data_dir or default_data_dir()}"
        say(f"control plane   {procs.address}  ({where})")
        agent_cmd = f"{shlex.quote(sys.executable)} -m intentd.commands.demo.writer_agent"
        procs.spawn(["sidecar", "--server", procs.address, "--address", ADDRESS, "--capacity", "1",
                     "--exec", agent_cmd], "sidecar.log",
                    {"INTENTD_DEMO_LEDGER": str(ledger.path), "INTENTD_LOG_LEVEL": "INFO"})
        with IntentClient(procs.address) as client:
            intent_id = client.send_intent(intent_type=INTENT_TYPE, to_agent=ADDRESS,
                                           payload={"token_seconds": args.step_seconds / 3},
                                           idempotency_key=f"demo-{uuid.uuid4().hex}")
            say(f"intent          {intent_id}  {INTENT_TYPE} -> {ADDRESS}")
            say(f"{c['dim']}$ intentd watch {intent_id} --stream{c['reset']}\n")
            seen, killed = _follow(client, intent_id, ledger, c, say)
            final = client.wait_for(intent_id, timeout=args.timeout)
            again = list(client.stream(intent_id))
            standing = list(client.stream(intent_id, skip_superseded=True))
        ledger.poll()
        return _report(final, seen, again, standing, ledger, killed, c, say)
    finally:
        procs.close()


def _follow(client: IntentClient, intent_id: str, ledger: Ledger, c: dict[str, str],
            say: Any) -> tuple[list[Any], dict[str, Any] | None]:
    """Prints the stream live; kills the agent after KILL_AFTER_TOKENS tokens of step KILL_STEP."""
    seen: list[Any] = []
    killed: dict[str, Any] = {}
    at_kill_step = 0
    for entry in client.stream(intent_id):
        seen.append(entry)
        if entry.superseded is not None:
            say(f"\n  {c['yellow']}↻ attempt {entry.attempt} took over: the tokens of step(s) "
                f"{', '.join(map(str, entry.superseded.positions))} from the attempt before are superseded "
                f"(marker at offset {entry.offset}); recorded steps are not re-run{c['reset']}")
            continue
        print(entry.data, end="", flush=True)
        if entry.position == KILL_STEP and entry.attempt == 1:
            at_kill_step += 1
            if at_kill_step == KILL_AFTER_TOKENS and not killed:
                pid = _agent_pid(ledger)
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    killed.update(pid=pid, after=entry.offset, at=time.monotonic())
                    say(f"\n\n  {c['red']}✗ SIGKILL{c['reset']} agent pid {pid} after {KILL_AFTER_TOKENS} tokens of "
                        f"step {KILL_STEP} (offset {entry.offset}), before its result was recorded")
    say("\n")
    return seen, killed or None


def _agent_pid(ledger: Ledger) -> int | None:
    ledger.poll()
    attempts = [e for e in ledger.entries if e["event"] == "attempt"]
    return int(attempts[-1]["pid"]) if attempts else None


def _report(final: Any, seen: list[Any], again: list[Any], standing: list[Any], ledger: Ledger,
            killed: dict[str, Any] | None, c: dict[str, str], say: Any) -> int:
    began = Counter(e["step"] for e in ledger.entries if e["event"] == "begin")
    answer = "".join(word for _, text in SECTIONS for word in words(text))
    markers = [e for e in seen if e.is_marker]
    first_run = [e for e in seen if not e.is_marker and e.position == KILL_STEP and e.attempt == 1]
    checks = [
        (f"the agent was SIGKILLed during step {KILL_STEP}", killed is not None),
        ("the intent COMPLETED in 2 attempts", final.state is IntentState.COMPLETED and final.attempt == 2),
        ("the live reader got every offset once, in order, without reconnecting",
         [e.offset for e in seen] == list(range(len(seen)))),
        (f"it saw {KILL_AFTER_TOKENS}+ tokens of step {KILL_STEP} from attempt 1, then one marker superseding "
         f"position {KILL_STEP}",
         len(first_run) >= KILL_AFTER_TOKENS and len(markers) == 1 and markers[0].superseded is not None
         and markers[0].superseded.positions == (KILL_STEP,)
         and markers[0].attempt == 2),
        ("nothing it saw was lost: the stream read again is the same",
         [(e.offset, e.raw) for e in again] == [(e.offset, e.raw) for e in seen]),
        ("step 1 ran once and its tokens are in the stream once", began[1] == 1
         and sum(1 for e in seen if not e.is_marker and e.position == 1) == len(words(SECTIONS[0][1]))),
        (f"step {KILL_STEP} ran twice (killed before its result was recorded), step 3 once",
         began[KILL_STEP] == 2 and began[3] == 1),
        ("read with skip_superseded, the stream spells the answer exactly",
         "".join(e.data for e in standing if not e.is_marker) == answer == (final.result or {}).get("answer")),
    ]
    say(f"{c['bold']}What happened{c['reset']} (read back from the stream, the ledger and the control plane):")
    for text, ok in checks:
        say(f"  {c['green'] + '✓' if ok else c['red'] + '✗'}{c['reset']} {text}")
    say(f"\n  stream: {len(seen)} entries, {len(first_run)} superseded by the marker; "
        f"result: {json.dumps(final.result)[:80]}...")
    if all(ok for _, ok in checks):
        say(f"\n{c['green']}{c['bold']}Streamed live through a SIGKILL: nothing lost, nothing repeated without a "
            f"marker.{c['reset']}")
        return 0
    say(f"\n{c['red']}The story did not hold; see the logs above.{c['reset']}")
    return 1
