"""A child process in a process group of its own, its output appended to a
log file: the one base of the harness's sidecars, our own tests' server and
sidecar processes, the bench's and the chaos soak's."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


class ChildProcess:
    """Started by ``launch``; its own session, so signalling the group reaches
    whatever it started (a sidecar's agent) and never the parent."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        """Starts ``argv`` with this process's environment plus ``env``."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(list(argv), env={**os.environ, **(env or {})}, cwd=cwd, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        """The exit status once it ended, else None (also before it started)."""
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        """Signals the process alone (not what it started)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def signal_group(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def kill_group(self) -> None:
        """SIGKILLs the group and reaps the process."""
        self.signal_group(signal.SIGKILL)
        # A stopped member would keep the group alive until continued.
        self.signal_group(signal.SIGCONT)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the group, then SIGKILL for whatever outlived ``grace``."""
        if self.alive():
            self.signal_group(signal.SIGTERM)
            assert self.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        self.kill_group()

    def log(self) -> str:
        """Its output so far ("" before it wrote any)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]
