"""intentd.testing: test your own agents against a real control plane and real
sidecar processes, and kill the agent at a chosen step (README, "Testing your
agents"). Needs ``pip install 'intentd[server]'``.

The names are loaded on first use, so the runner (``python -m
intentd.testing.runner``, in the agent's process) does not import the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .environment import IntentdEnvironment, Run
    from .report import StepRun

__all__ = ["IntentdEnvironment", "Run", "StepRun"]

_HOMES = {"IntentdEnvironment": ".environment", "Run": ".environment", "StepRun": ".report"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
