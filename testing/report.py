"""What the runner tells the environment: the steps that really ran and the kill
plans, through files in one folder the two processes share.

Each executed step is one JSON line appended with a single ``write`` to
``steps.jsonl`` (O_APPEND), so lines from agent processes that follow each
other, or run at once, never interleave, and a line is in the file before the
process can be SIGKILLed after it. A kill plan is the file ``kill-<run>``
holding the step number; the environment writes it before it sends the intent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# The folder shared by the environment and the runners it starts.
DIR_ENV = "INTENTD_TESTING_DIR"
# The intent label naming the run, so the runner finds that run's kill plan.
RUN_LABEL = "intentd.testing/run"
_STEPS = "steps.jsonl"


@dataclass(frozen=True)
class StepRun:
    """One execution of a step function: ``index`` is the step's number in
    the handler (1-based), ``attempt`` the delivery it ran in."""

    intent_id: str
    name: str
    index: int
    attempt: int
    pid: int


def record_step(folder: Path, step: StepRun) -> None:
    line = json.dumps(step.__dict__, separators=(",", ":")) + "\n"
    fd = os.open(folder / _STEPS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_steps(folder: Path, intent_id: str) -> list[StepRun]:
    path = folder / _STEPS
    if not path.exists():
        return []
    runs = (StepRun(**json.loads(line)) for line in path.read_text().splitlines() if line)
    return [run for run in runs if run.intent_id == intent_id]


def write_kill_plan(folder: Path, run: str, step: int) -> None:
    (folder / f"kill-{run}").write_text(str(step))


def read_kill_plan(folder: Path, run: str | None) -> int | None:
    if run is None:
        return None
    path = folder / f"kill-{run}"
    return int(path.read_text()) if path.exists() else None
