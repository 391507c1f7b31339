"""What both demos share: the side-effect ledger (written by the agents, read
by the demo), the colors, and the processes of a demo (a control plane on the
embedded PostgreSQL, sidecars supervising the sample agents)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from intentd.core.aio import serving
from intentd.testing.processes import ChildProcess

LEDGER_ENV = "INTENTD_DEMO_LEDGER"
GREEN, RED, YELLOW, DIM, BOLD, RESET = "\033[32m", "\033[31m", "\033[33m", "\033[2m", "\033[1m", "\033[0m"


def palette(enabled: bool) -> dict[str, str]:
    names = ("green", "red", "yellow", "dim", "bold", "reset")
    values = (GREEN, RED, YELLOW, DIM, BOLD, RESET) if enabled else ("",) * 6
    return dict(zip(names, values, strict=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_ledger(entry: dict[str, Any]) -> None:
    """Appends one line to the ledger named by INTENTD_DEMO_LEDGER (nothing
    without it), with the writing process's pid."""
    path = os.environ.get(LEDGER_ENV)
    if not path:
        return
    line = json.dumps({**entry, "pid": os.getpid(), "time": time.time()}) + "\n"
    # One write of one line, flushed before the step goes on: the ledger is the
    # evidence, so it must not lose the line of a step about to be killed.
    with Path(path).open("a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


class Ledger:
    """Reads the agent's side-effect ledger as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        self._offset = 0

    def poll(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open() as f:
            f.seek(self._offset)
            chunk = f.read()
        complete, _, _ = chunk.rpartition("\n")
        if not complete:
            return []
        self._offset += len(complete) + 1
        new = [json.loads(line) for line in complete.splitlines() if line.strip()]
        self.entries.extend(new)
        return new


class DemoProcesses:
    """A demo's work folder (logs, ledger, sockets) and its child processes,
    each in a session of its own, all stopped by ``close``."""

    def __init__(self, prefix: str, database_url: str | None, data_dir: str | None) -> None:
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        self.env = {"INTENTD_LOG_LEVEL": "WARNING"}
        if database_url:
            self.env["INTENTD_DATABASE_URL"] = database_url
        if data_dir:
            self.env["INTENTD_DATA_DIR"] = data_dir
        self.children: list[ChildProcess] = []
        self.address = ""

    def spawn(self, argv: list[str], log_name: str, extra_env: dict[str, str] | None = None) -> ChildProcess:
        """``python -m intentd.commands ARGV``, its output in ``log_name``."""
        child = ChildProcess(self.work / log_name)
        child.launch([sys.executable, "-m", "intentd.commands", *argv], {**self.env, **(extra_env or {})})
        self.children.append(child)
        return child

    def start_server(self, say: Callable[[str], None], timeout: float = 120) -> bool:
        """Starts the control plane on a free port; False (its log said) when it
        did not come up."""
        self.address = f"127.0.0.1:{free_port()}"
        # Loopback only, so no keys: with a database URL, auth "auto" would ask for them.
        server = self.spawn(["server"], "server.log", {"INTENTD_LISTEN": self.address, "INTENTD_AUTH": "off"})
        deadline = time.monotonic() + timeout
        while not serving(self.address):
            if not server.alive() or time.monotonic() > deadline:
                say("the control plane did not start:\n" + server.log())
                return False
            time.sleep(0.1)
        return True

    def close(self) -> None:
        for child in reversed(self.children):
            if child.alive():
                child.signal_group(15)
        for child in reversed(self.children):
            if child.proc is not None:
                try:
                    child.proc.wait(20)
                except subprocess.TimeoutExpired:
                    child.kill_group()


def default_data_dir() -> str:
    from intentd.server.settings import default_data_dir as data_dir

    return str(data_dir())
