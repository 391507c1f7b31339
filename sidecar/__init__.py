"""The intentd sidecar: one stream to the control plane, a local runtime API
for the agent beside it, and (optionally) the agent process itself."""

from .app import Sidecar, cli_main, run_sidecar
from .settings import SidecarSettings

__all__ = ["Sidecar", "SidecarSettings", "cli_main", "run_sidecar"]
