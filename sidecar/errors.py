"""The sidecar's own exceptions, under one root (``SidecarError``), itself
under intentd's (``intentd.core.errors.IntentdError``)."""

from __future__ import annotations

from intentd.core.errors import IntentdError


class SidecarError(IntentdError):
    """Root of the exceptions the sidecar raises on purpose."""


class ConnectError(SidecarError):
    """The stream could not be set up (no ``Registered``)."""


class StepsUnavailable(SidecarError):
    """Recorded steps could not be fetched; ``code`` is the google.rpc.Code why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LeaseNotHeld(SidecarError):
    """The lease is not (or no longer) held by this sidecar."""


class RecordedStepMismatch(SidecarError):
    """An agent began a step under another name than the one an earlier
    attempt recorded at that index (the agent SDK raises its public
    ``StepDivergence`` for it)."""

    def __init__(self, index: int, recorded: str, name: str) -> None:
        super().__init__(
            f"step divergence: step {index} was recorded as {recorded!r} by an earlier attempt, "
            f"but this attempt calls it {name!r}"
        )
