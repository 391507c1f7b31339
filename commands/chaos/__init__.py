"""The chaos soak harness: ``python -m intentd.commands.chaos`` or ``run_soak(config)``.

Starts PostgreSQL, control-plane replicas and sidecars supervising a chaos
agent on loopback, sends intents while injecting faults at seeded random
times (agent, sidecar and replica kills, frozen sidecars, PostgreSQL restarts
and outages, dropped connections), then checks every invariant intentd
promises against the database and a side-effect ledger. See docs/chaos.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import FAULT_KINDS, INTENT_KINDS, SoakConfig

if TYPE_CHECKING:
    from .report import Report

__all__ = ["FAULT_KINDS", "INTENT_KINDS", "SoakConfig", "run_soak"]


def run_soak(config: SoakConfig) -> Report:
    """Runs one soak and returns its report (``report.ok``, ``report.format()``)."""
    from .harness import run_soak as run

    return run(config)
