"""Per-tenant and per-key quotas: sends per second, live intents, payload
size. Rates are token buckets in each replica (a limit of R per second with
N replicas admits up to N x R). Live intents are admitted by the database,
in the statement that inserts them (``insert_intents``, under a lock of the
tenant), exactly under concurrency and with any number of replicas."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from intentd.core.validation import parse_json

from . import errors
from .auth import Caller
from .db import Database, Row
from .queries import Q

TENANT_CACHE_SECONDS = 5.0


@dataclass
class Bucket:
    rate: float
    tokens: float
    stamp: float

    def take(self, n: int, now: float) -> float:
        """Takes n tokens; returns 0, or the seconds until they would be there."""
        burst = max(self.rate, 1.0)
        self.tokens = min(burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


def payload_json(raw: bytes, field: str, max_bytes: int) -> str:
    """The JSON text of a payload a client sends (an intent's, a signal's, a
    decision's form data): past the tenant's payload limit it is
    RESOURCE_EXHAUSTED (a quota), not valid JSON INVALID_ARGUMENT."""
    if len(raw) > max_bytes:
        raise errors.ResourceExhausted(f"{field}: is {len(raw)} bytes; the limit is {max_bytes}")
    return parse_json(raw, field)


class Quotas:
    def __init__(self, db: Database, *, default_max_payload_bytes: int) -> None:
        self.db = db
        self.default_max_payload_bytes = default_max_payload_bytes
        self._tenants: dict[str, tuple[Row | None, float]] = {}
        self._buckets: dict[tuple[str, str], Bucket] = {}

    async def _tenant(self, name: str) -> Row | None:
        now = time.monotonic()
        hit = self._tenants.get(name)
        if hit is not None and now - hit[1] < TENANT_CACHE_SECONDS:
            return hit[0]
        async with self.db.connection() as conn:
            row = await conn.fetchrow(Q.get_tenant, name)
        self._tenants[name] = (row, now)
        return row

    async def max_payload_bytes(self, caller: Caller) -> int:
        tenant = await self._tenant(caller.tenant)
        if tenant is not None and tenant["max_payload_bytes"] is not None:
            return min(int(tenant["max_payload_bytes"]), self.default_max_payload_bytes)
        return self.default_max_payload_bytes

    async def writes_per_second(self, tenant_name: str, default: float) -> float:
        """The tenant's budget of sidecar writes per second on this replica:
        its own ``max_writes_per_second``, else ``default`` (0: unlimited).
        Asked before every write a stream reads, so it never fails: with the
        database away it answers from what it last read."""
        try:
            tenant = await self._tenant(tenant_name)
        except errors.ServerError:
            hit = self._tenants.get(tenant_name)
            tenant = hit[0] if hit is not None else None
        if tenant is not None and tenant["max_writes_per_second"] is not None:
            return float(tenant["max_writes_per_second"])
        return default

    async def admit_sends(self, caller: Caller, count: int) -> None:
        """Raises ResourceExhausted (with a retry-after) when ``count`` more
        sends would break a rate limit (live intents: see the module doc)."""
        now = time.monotonic()
        tenant = await self._tenant(caller.tenant)
        limits = [("key", caller.key_id or "", caller.max_sends_per_second)]
        if tenant is not None:
            limits.append(("tenant", caller.tenant, tenant["max_sends_per_second"]))
        for kind, name, rate in limits:
            if rate is None:
                continue
            bucket = self._buckets.get((kind, name))
            if bucket is None or bucket.rate != rate:
                bucket = self._buckets[(kind, name)] = Bucket(rate, max(rate, 1.0), now)
            wait = bucket.take(count, now)
            if wait > 0:
                raise errors.ResourceExhausted(
                    f"{kind} {name or caller.name!r} is limited to {rate:g} sends per second",
                    retry_after_ms=math.ceil(wait * 1000))
