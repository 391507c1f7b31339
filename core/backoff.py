"""The one backoff rule: jittered exponential, for every retry loop in intentd.

Retry ``n`` (0-based) waits a random time in ``[cap/2, cap]`` with
``cap = min(maximum, initial * 2**n)``: the delay doubles, never passes the
ceiling, and the jitter spreads many clients that failed at the same moment
(an outage) so they do not come back in step. :meth:`Backoff.ceiling` is the
same rule without jitter, for the control plane's retry of a failed attempt,
whose due time must be reproducible from the database alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# 2**30 is far past every ceiling we use; the bound keeps the float finite.
_MAX_DOUBLINGS = 30


@dataclass(frozen=True)
class Backoff:
    """Delays in seconds (or any unit: the rule does not care)."""

    initial: float = 0.05
    maximum: float = 2.0

    def ceiling(self, retry: int) -> float:
        """``min(maximum, initial * 2**retry)``: the longest wait of retry ``retry``."""
        return min(self.maximum, self.initial * 2.0 ** min(max(retry, 0), _MAX_DOUBLINGS))

    def delay(self, retry: int) -> float:
        """A jittered wait for retry ``retry`` (0-based), in ``[ceiling/2, ceiling]``."""
        cap = self.ceiling(retry)
        return cap / 2 + random.random() * cap / 2
