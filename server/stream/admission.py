"""What one replica lets in across its streams: the caps on streams per API
key and per tenant, and the write budgets that pace what the streams read."""

from __future__ import annotations

import asyncio
import time

from .. import errors
from ..auth import Caller
from ..quotas import Bucket, Quotas
from ..settings import ServerSettings


class Admission:
    def __init__(self, settings: ServerSettings, quotas: Quotas, *, enforced: bool) -> None:
        self.settings = settings
        self.quotas = quotas
        # With API keys off there is one caller, and no one else to protect.
        self.enforced = enforced
        self._streams_by_key: dict[str, int] = {}
        self._streams_by_tenant: dict[str, int] = {}
        # Each tenant's write budget, shared by its streams on this replica.
        self._tenant_buckets: dict[str, Bucket] = {}

    def admit(self, caller: Caller) -> None:
        """Counts a new stream against its key's and tenant's caps."""
        by_key = self._streams_by_key.get(caller.identity, 0)
        if self.enforced and by_key >= self.settings.max_streams_per_key:
            raise errors.ResourceExhausted(
                f"API key {caller.name!r} has {by_key} sidecar streams open on this replica; "
                f"the limit is {self.settings.max_streams_per_key}", retry_after_ms=1000)
        by_tenant = self._streams_by_tenant.get(caller.tenant, 0)
        if self.enforced and by_tenant >= self.settings.max_streams_per_tenant:
            raise errors.ResourceExhausted(
                f"tenant {caller.tenant!r} has {by_tenant} sidecar streams open on this replica; "
                f"the limit is {self.settings.max_streams_per_tenant}", retry_after_ms=1000)
        self._streams_by_key[caller.identity] = by_key + 1
        self._streams_by_tenant[caller.tenant] = by_tenant + 1

    def leave(self, caller: Caller) -> None:
        for counts, name in ((self._streams_by_key, caller.identity), (self._streams_by_tenant, caller.tenant)):
            left = counts.get(name, 1) - 1
            if left > 0:
                counts[name] = left
            else:
                counts.pop(name, None)
        if caller.tenant not in self._streams_by_tenant:
            self._tenant_buckets.pop(caller.tenant, None)

    def stream_bucket(self) -> Bucket | None:
        """A new stream's own write budget (None: unlimited)."""
        rate = self.settings.stream_writes_per_second
        return Bucket(rate, max(rate, 1.0), time.monotonic()) if rate > 0 else None

    async def pace(self, tenant_name: str, stream: Bucket | None) -> None:
        """Waits for a stream's and its tenant's write budgets: a flood is
        read only as fast as its budget, and HTTP/2 pushes back on it."""
        rate = await self.quotas.writes_per_second(tenant_name, self.settings.tenant_writes_per_second)
        tenant = None
        if rate > 0:
            tenant = self._tenant_buckets.get(tenant_name)
            if tenant is None or tenant.rate != rate:
                tenant = self._tenant_buckets[tenant_name] = Bucket(rate, max(rate, 1.0), time.monotonic())
        for bucket in (stream, tenant):
            if bucket is not None:
                while True:
                    wait = bucket.take(1, time.monotonic())
                    if wait <= 0:
                        break
                    # Not refused: the reader waits, so the sidecar is slowed.
                    await asyncio.sleep(wait)
