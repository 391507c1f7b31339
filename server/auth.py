"""API keys, roles and tenants.

A key looks like ``intentd_<id>_<secret>``: the id is a lookup prefix, the
secret 32 random bytes. PostgreSQL keeps only SHA-256(secret); comparison is
constant-time. Keys travel as gRPC metadata ``authorization: Bearer <key>``.

With authentication off (the zero-config embedded default on loopback, or an
explicit INTENTD_AUTH=off) every call acts as an all-roles caller of the
default tenant.
"""

from __future__ import annotations

import base64
import contextvars
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import grpc

from intentd.server import errors
from intentd.server.db import Database, Row
from intentd.server.queries import Q

log = logging.getLogger("intentd.auth")

ROLES = ("client", "agent", "admin")
KEY_PREFIX = "intentd_"
# How long a verified key is trusted before it is read again: revocation and
# expiry reach open streams within this.
KEY_CACHE_SECONDS = 2.0
TOUCH_EVERY_SECONDS = 60.0
_DUMMY_HASH = hashlib.sha256(b"no such key").digest()


@dataclass(frozen=True)
class Caller:
    tenant: str
    name: str
    roles: frozenset[str]
    address_patterns: tuple[str, ...] = ()
    key_id: str | None = None
    max_sends_per_second: float | None = None

    def may_serve(self, address: str) -> bool:
        return any(fnmatch.fnmatchcase(address, pattern) for pattern in self.address_patterns)


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


def check_patterns(patterns: Sequence[str]) -> None:
    for pattern in patterns:
        if not pattern.startswith("agent://") or "*" in pattern[:-1]:
            raise errors.InvalidArgument(
                f"address pattern {pattern!r}: expected agent://org/env/name with at most a trailing *")


@dataclass
class _Cached:
    row: Row
    fetched: float
    touched: float = field(default=0.0)


class Authenticator:
    def __init__(self, db: Database, *, enabled: bool, default_tenant: str) -> None:
        self.db = db
        self.enabled = enabled
        self.default_tenant = default_tenant
        self._cache: dict[str, _Cached] = {}
        self._anonymous = Caller(default_tenant, "anonymous", frozenset(ROLES), ("*",))

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
        cached = await self._lookup(key_id) if key_id else None
        presented = hashlib.sha256(secret.encode()).digest()
        stored = bytes(cached.row["secret_sha256"]) if cached is not None else _DUMMY_HASH
        # Compared in constant time whether or not the id exists, so timing
        # tells nothing about which ids are real.
        if not hmac.compare_digest(presented, stored) or cached is None or parsed is None:
            raise errors.Unauthenticated("invalid API key")
        row = cached.row
        if row["revoke_time"] is not None:
            raise errors.Unauthenticated(f"API key {row['name']!r} was revoked")
        if row["expire_time"] is not None and row["expire_time"] <= row["checked_at"]:
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
            max_sends_per_second=row["max_sends_per_second"],
        )

    async def still_valid(self, caller: Caller) -> bool:
        """For long streams: is the key behind ``caller`` still good?"""
        if not self.enabled or caller.key_id is None:
            return True
        cached = await self._lookup(caller.key_id)
        if cached is None:
            return False
        row = cached.row
        return row["revoke_time"] is None and (row["expire_time"] is None or row["expire_time"] > row["checked_at"])

    async def _lookup(self, key_id: str) -> _Cached | None:
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached.fetched < KEY_CACHE_SECONDS:
            return cached
        async with self.db.connection() as conn:
            row = await conn.fetchrow(Q.find_api_key, key_id, None)
        if row is None:
            self._cache.pop(key_id, None)
            return None
        fresh = _Cached(row, now, cached.touched if cached else 0.0)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key_id] = fresh
        return fresh


class KeyStore:
    """Key administration (the `intentd keys` command)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self, tenant: str, name: str, roles: Sequence[str], patterns: Sequence[str] = (),
        expire_time: datetime | None = None, max_sends_per_second: float | None = None,
    ) -> tuple[Row, str]:
        if not roles or not set(roles) <= set(ROLES):
            raise errors.InvalidArgument(f"roles must be some of {', '.join(ROLES)}")
        if "agent" in roles and not patterns:
            raise errors.InvalidArgument("an agent key needs --address patterns it may serve")
        check_patterns(patterns)
        key_id, key, digest = new_key()
        async with self.db.transaction() as conn:
            if await conn.fetchrow(Q.get_tenant, tenant) is None:
                await conn.fetchrow(Q.put_tenant, tenant, None, None, None)
            row = await conn.fetchrow(Q.create_api_key, key_id, tenant, name, digest, list(roles), list(patterns),
                                      expire_time, max_sends_per_second)
            await conn.execute(Q.audit, tenant, "intentd keys", "key.create", name,
                               json.dumps({"roles": list(roles), "address_patterns": list(patterns)}))
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
