"""API keys, roles and tenants.

A key looks like ``intentd_<id>_<secret>``: the id is a lookup prefix, the
secret 32 random bytes. PostgreSQL keeps only SHA-256(secret); comparison is
constant-time. Keys travel as gRPC metadata ``authorization: Bearer <key>``.

With authentication off (the zero-config embedded default on loopback, or an
explicit INTENTD_AUTH=off) every call acts as an all-roles caller of the
default tenant.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import grpc

from . import errors
from .db import Database, Row
from .queries import Q

log = logging.getLogger("intentd.auth")

ROLES = ("client", "agent", "admin")
KEY_PREFIX = "intentd_"
# How long what was read about a key id (its row, or that there is none) is
# trusted before it is read again. A key change is also announced
# (intentd_keys, migration 0007) and drops the entry at once; this bounds
# the delay when that notification is lost. Open streams re-check their key
# every KEY_RECHECK_SECONDS, so a revocation ends them within the sum, 2 s.
KEY_CACHE_SECONDS = 1.0
KEY_RECHECK_SECONDS = 1.0
TOUCH_EVERY_SECONDS = 60.0
# Key ids remembered (found or not); the oldest is forgotten first.
MAX_CACHED_KEY_IDS = 10_000
_DUMMY_HASH = hashlib.sha256(b"no such key").digest()

# Address patterns of agent keys. A pattern is agent:// and up to three
# segments (org/env/name) separated by "/". In a segment, "*" matches any
# characters of that segment and never a "/"; a last segment that is only
# "*" (or "**") matches the rest of the address, one or more segments, so
# agent://acme/* serves every address of org acme. Anything else (?, [...],
# ** inside a pattern, empty segments) is refused when the key is created.
_SEGMENT_RE = re.compile(r"^[a-z0-9_*-]{1,63}$")
_ADDRESS_DEPTH = 3


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression of an address pattern; ValueError says what is
    wrong with a pattern outside the grammar."""
    if not pattern.startswith("agent://"):
        raise ValueError("must start with agent://")
    if len(pattern) > 300:
        raise ValueError("is longer than 300 characters")
    segments = pattern[len("agent://"):].split("/")
    if len(segments) > _ADDRESS_DEPTH:
        raise ValueError(f"has {len(segments)} segments; an address has {_ADDRESS_DEPTH} (org/env/name)")
    parts: list[str] = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if last and segment in ("*", "**"):
            parts.append(r"[^/]+(?:/[^/]+)*")
            break
        if not _SEGMENT_RE.match(segment):
            raise ValueError(f"segment {segment!r} may hold only a-z, 0-9, '-', '_' and '*' (1-63 characters)")
        if "**" in segment:
            raise ValueError(f"segment {segment!r}: ** is only allowed as the whole last segment")
        parts.append("[^/]*".join(re.escape(piece) for piece in segment.split("*")))
    else:
        if len(segments) < _ADDRESS_DEPTH:
            raise ValueError(
                f"names {len(segments)} of the {_ADDRESS_DEPTH} segments of an address and does not end in /*; "
                "a * matches within one segment only (agent://acme/prod* never serves agent://acme/prod/x: "
                "use agent://acme/prod/* or agent://acme/prod-*/*)")
    return re.compile("agent://" + "/".join(parts))


@functools.lru_cache(maxsize=4096)
def _matcher(pattern: str) -> re.Pattern[str] | None:
    """None for a stored pattern outside the grammar (made before it was
    defined): it serves nothing, so an old wide pattern fails closed."""
    try:
        return compile_pattern(pattern)
    except ValueError:
        log.warning("address pattern %r is not valid (%s); it serves no address. Create a new key.",
                    pattern, "see the pattern grammar")
        return None


def invalid_patterns(patterns: Sequence[str]) -> list[str]:
    return [p for p in patterns if _matcher(p) is None]


def _matches(patterns: Sequence[str], address: str) -> bool:
    for pattern in patterns:
        matcher = _matcher(pattern)
        if matcher is not None and matcher.fullmatch(address):
            return True
    return False


@dataclass(frozen=True)
class Caller:
    tenant: str
    name: str
    roles: frozenset[str]
    address_patterns: tuple[str, ...] = ()
    key_id: str | None = None
    max_sends_per_second: float | None = None
    expire_time: datetime | None = None
    # Agent keys: the addresses the agents behind it may start child intents
    # at (docs/children.md), in the grammar of address_patterns. Empty: none.
    send_patterns: tuple[str, ...] = ()

    def may_serve(self, address: str) -> bool:
        return _matches(self.address_patterns, address)

    def may_send(self, address: str) -> bool:
        """May the agents behind this key start a child intent at ``address``?
        Same tenant only: the caller's tenant is the child's, so a pattern
        never reaches another tenant's intents whatever it names."""
        return _matches(self.send_patterns, address)

    @property
    def identity(self) -> str:
        """What per-key limits count by: the key, or the one anonymous caller."""
        return self.key_id or f"anonymous:{self.tenant}"


CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("intentd_caller")


def current_caller() -> Caller:
    return CALLER.get()


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=").lower()


def new_key() -> tuple[str, str, bytes]:
    """Returns (key id, the full key to show once, SHA-256 of its secret)."""
    key_id = _b32(os.urandom(10))[:12]
    secret = _b32(os.urandom(32))
    return key_id, f"{KEY_PREFIX}{key_id}_{secret}", hashlib.sha256(secret.encode()).digest()


def parse_key(key: str) -> tuple[str, str] | None:
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX):].partition("_")
    if not sep or len(key_id) != 12 or len(secret) < 40:
        return None
    return key_id, secret


def check_patterns(patterns: Sequence[str], what: str = "address pattern") -> None:
    for pattern in patterns:
        try:
            compile_pattern(pattern)
        except ValueError as exc:
            raise errors.InvalidArgument(
                f"{what} {pattern!r} {exc}. Patterns are agent://org/env/name where * matches "
                "within one segment and a last segment of * or ** matches the rest "
                "(agent://acme/prod/*, agent://acme/*/billing, agent://acme/**)") from None


@dataclass
class _Cached:
    row: Row | None  # None: no such key id
    fetched: float
    touched: float = field(default=0.0)

    def expired(self) -> bool:
        """Judged by the database's clock (when the row was read, plus the
        time since), so an expiry takes effect at its time, cached or not."""
        if self.row is None or self.row["expire_time"] is None:
            return False
        now = self.row["checked_at"] + timedelta(seconds=time.monotonic() - self.fetched)
        return bool(self.row["expire_time"] <= now)


class Authenticator:
    def __init__(self, db: Database, *, enabled: bool, default_tenant: str) -> None:
        self.db = db
        self.enabled = enabled
        self.default_tenant = default_tenant
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        # Authentication off: any address may be served and sent to.
        self._anonymous = Caller(default_tenant, "anonymous", frozenset(ROLES), ("agent://**",),
                                 send_patterns=("agent://**",))
        self._listeners: list[Callable[[str], None]] = []
        self._reading: dict[str, asyncio.Future[_Cached]] = {}
        self._generation = 0
        # Database look-ups of key ids, for tests and the curious: a known
        # and an unknown id cost the same, one per KEY_CACHE_SECONDS.
        self.lookups = 0

    def on_change(self, callback: Callable[[str], None]) -> None:
        """Calls ``callback(key_id)`` after a change to the key was announced."""
        self._listeners.append(callback)

    def key_changed(self, key_id: str) -> None:
        """A key changed in the database (or changes may have been missed:
        ``key_id`` empty): forget what was read and tell the listeners."""
        self._generation += 1
        if key_id:
            self._cache.pop(key_id, None)
            self._reading.pop(key_id, None)
        else:
            self._cache.clear()
            self._reading.clear()
        for callback in list(self._listeners):
            callback(key_id)

    def anonymous(self) -> Caller:
        return self._anonymous

    async def authenticate(self, context: grpc.aio.ServicerContext, role: str) -> Caller:
        if not self.enabled:
            return self.anonymous()
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode(errors="replace")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.Unauthenticated("missing credentials: send metadata 'authorization: Bearer <API key>'")
        return await self.verify(token.strip(), role)

    async def verify(self, key: str, role: str) -> Caller:
        parsed = parse_key(key)
        key_id, secret = parsed if parsed is not None else ("", "")
        # A known and an unknown id take the same path: one cache look-up
        # (a database read only when the cache has nothing fresh about the
        # id, found or not), one hash, one constant-time comparison. So
        # neither timing nor load tells which ids are real.
        cached = await self._lookup(key_id) if key_id else None
        row = cached.row if cached is not None else None
        presented = hashlib.sha256(secret.encode()).digest()
        stored = bytes(row["secret_sha256"]) if row is not None else _DUMMY_HASH
        if not hmac.compare_digest(presented, stored) or row is None or cached is None:
            raise errors.Unauthenticated("invalid API key")
        if row["revoke_time"] is not None:
            raise errors.Unauthenticated(f"API key {row['name']!r} was revoked")
        if cached.expired():
            raise errors.Unauthenticated(f"API key {row['name']!r} expired")
        roles = frozenset(row["roles"])
        allowed = role in roles or (role == "client" and "admin" in roles)
        if not allowed:
            raise errors.PermissionDenied(
                f"API key {row['name']!r} has roles {sorted(roles)}; this call needs {role!r}")
        now = time.monotonic()
        if now - cached.touched > TOUCH_EVERY_SECONDS:
            cached.touched = now
            async with self.db.connection() as conn:
                await conn.execute(Q.touch_api_key, key_id)
        return Caller(
            tenant=row["tenant"], name=row["name"], roles=roles,
            address_patterns=tuple(row["address_patterns"]), key_id=key_id,
            max_sends_per_second=row["max_sends_per_second"], expire_time=row["expire_time"],
            send_patterns=tuple(row["send_patterns"]),
        )

    async def still_valid(self, caller: Caller) -> bool:
        """For long streams: is the key behind ``caller`` still good?"""
        if not self.enabled or caller.key_id is None:
            return True
        cached = await self._lookup(caller.key_id)
        row = cached.row
        return row is not None and row["revoke_time"] is None and not cached.expired()

    async def _lookup(self, key_id: str) -> _Cached:
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached.fetched < KEY_CACHE_SECONDS:
            self._cache.move_to_end(key_id)
            return cached
        # Many streams of one key re-check it at once (after a change was
        # announced): one read answers them all.
        reading = self._reading.get(key_id)
        if reading is None:
            reading = asyncio.ensure_future(self._read(key_id, cached, now))
            self._reading[key_id] = reading

            def done(future: asyncio.Future[_Cached]) -> None:
                if self._reading.get(key_id) is future:
                    del self._reading[key_id]

            reading.add_done_callback(done)
        return await asyncio.shield(reading)

    async def _read(self, key_id: str, cached: _Cached | None, now: float) -> _Cached:
        generation = self._generation
        self.lookups += 1
        async with self.db.connection() as conn:
            row = await conn.fetchrow(Q.find_api_key, key_id, None)
        fresh = _Cached(row, now, cached.touched if cached is not None else 0.0)
        if generation != self._generation:
            return fresh  # a change was announced while reading: this row may predate it
        self._cache[key_id] = fresh
        self._cache.move_to_end(key_id)
        while len(self._cache) > MAX_CACHED_KEY_IDS:
            self._cache.popitem(last=False)
        return fresh


class KeyStore:
    """Key administration (the `intentd keys` command)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self, tenant: str, name: str, roles: Sequence[str], patterns: Sequence[str] = (),
        expire_time: datetime | None = None, max_sends_per_second: float | None = None,
        *, send_patterns: Sequence[str] = (),
    ) -> tuple[Row, str]:
        """``patterns``: the addresses an agent key may serve;
        ``send_patterns``: those its agents may start child intents at (agent
        keys only, same grammar)."""
        if not roles or not set(roles) <= set(ROLES):
            raise errors.InvalidArgument(f"roles must be some of {', '.join(ROLES)}")
        if "agent" in roles and not patterns:
            raise errors.InvalidArgument("an agent key needs --address patterns it may serve")
        if send_patterns and "agent" not in roles:
            # Only a sidecar's stream starts children; on another key the
            # patterns would read as a permission that grants nothing.
            raise errors.InvalidArgument(
                "--send patterns are for agent keys (the addresses its agents may start child intents at); "
                "add --role agent or leave --send out")
        check_patterns(patterns)
        check_patterns(send_patterns, "send pattern")
        key_id, key, digest = new_key()
        async with self.db.transaction() as conn:
            if await conn.fetchrow(Q.get_tenant, tenant) is None:
                await conn.fetchrow(Q.put_tenant, tenant, None, None, None, None)
            row = await conn.fetchrow(Q.create_api_key, key_id, tenant, name, digest, list(roles), list(patterns),
                                      expire_time, max_sends_per_second, list(send_patterns))
            await conn.execute(Q.audit, tenant, "intentd keys", "key.create", name,
                               json.dumps({"roles": list(roles), "address_patterns": list(patterns),
                                           "send_patterns": list(send_patterns)}))
        return row, key

    async def list(self, tenant: str | None) -> list[Row]:
        async with self.db.connection() as conn:
            return list(await conn.fetch(Q.list_api_keys, tenant))

    async def revoke(self, tenant: str, name: str) -> Row:
        async with self.db.transaction() as conn:
            row = await conn.fetchrow(Q.revoke_api_key, tenant, name)
            if row is None:
                raise errors.NotFound(f"no live key {name!r} in tenant {tenant!r}")
            await conn.execute(Q.audit, tenant, "intentd keys", "key.revoke", row["name"], "{}")
        return row
