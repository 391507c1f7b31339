"""What the orchestrator example's agents share: addresses, intent types,
and the ledger a run (or a test) reads to see which step functions really ran."""

from __future__ import annotations

import json
import os
from typing import Any

# Addresses: one org, one environment, one name per agent. The runner (run.py)
# may move them to another org so that runs do not share agents.
ORG = os.environ.get("ORCHESTRATOR_ORG", "example")
ORCHESTRATOR = f"agent://{ORG}/local/orchestrator"
RESEARCH = f"agent://{ORG}/local/research"
CODER = f"agent://{ORG}/local/coder"
REVIEWER = f"agent://{ORG}/local/reviewer"

ORCHESTRATE_TYPE = "intent.example.orchestrate.v1"
RESEARCH_TYPE = "intent.example.research.v1"
CODE_TYPE = "intent.example.code.v1"
REVIEW_TYPE = "intent.example.review.v1"  # handled in Node.js: reviewer.js


def ledger(payload: dict[str, Any], **entry: Any) -> None:
    """One line per step function call, on disk before the step goes on, in
    the file the payload names (none: nothing)."""
    path = payload.get("ledger")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({**entry, "pid": os.getpid()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
