"""The one root of every exception intentd raises on purpose.

Each package has its own root under it (``intentd.client.errors.ClientError``,
``intentd.agent.errors.AgentError``, ``intentd.sidecar.errors.SidecarError``,
``intentd.server.errors.ServerError``), so ``except IntentdError`` catches all of
intentd's own failures and ``except ClientError`` only the client's. Two kinds
are deliberately outside it: ``intentd.agent.LeaseLost`` derives from
``BaseException`` so that ``except Exception`` in a handler cannot swallow
fencing, and the settings and validation errors also derive from ``ValueError``
because that is what they are.
"""

from __future__ import annotations


class IntentdError(Exception):
    """Root of intentd's own exceptions."""


class SettingsError(IntentdError, ValueError):
    """A setting has a bad value; the message names the variable."""


class ValidationError(IntentdError, ValueError):
    """A field failed a check; ``field`` names it as the API spells it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
