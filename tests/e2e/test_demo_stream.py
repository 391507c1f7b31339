"""`intentd demo stream` as a user runs it: real control plane, sidecar and
writer agent, a real SIGKILL mid-step, one live reader. The demo checks its
own story (stream, ledger, control plane) and exits non-zero when it does not
hold; this test holds it to its report."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_stream_streams_live_through_a_sigkill(databases) -> None:
    url = databases.create()
    done = subprocess.run(
        [sys.executable, "-m", "intentd.commands", "demo", "stream", "--no-color", "--database-url", url,
         "--timeout", "90"],
        capture_output=True, text=True, timeout=180, env={**os.environ},
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "Outline: durable agents" in out and "✗ SIGKILL agent pid" in out
    assert "↻ attempt 2 took over: the tokens of step(s) 2" in out
    report = out.partition("What happened")[2]
    assert report and "✗" not in report, out
    assert "Streamed live through a SIGKILL" in out
