"""`intentd demo` (the crash at step 47) as a user runs it, on a database URL:
the demo checks its own story and exits non-zero when it does not hold."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_resumes_at_the_killed_step(databases) -> None:
    url = databases.create()
    done = subprocess.run(
        [sys.executable, "-m", "intentd.commands", "demo", "--no-color", "--database-url", url, "--kill-at", "7",
         "--step-seconds", "0.02", "--timeout", "90"],
        capture_output=True, text=True, timeout=180, env={**os.environ},
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "✓ the agent was SIGKILLed during step 7" in out
    assert "✓ steps 1-6 ran exactly once each" in out, out
    report = out.partition("What happened")[2]
    assert report and "✗" not in report, out
    assert "Resumed at step 7: steps 1-6 were never run again." in out
