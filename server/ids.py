"""Intent ids: 26 lowercase base32 characters, URL-safe, time ordered.

48 bits of milliseconds then 80 random bits (the ULID layout), so ids sort by
creation time across replicas (within clock skew) and list pagination can
use the primary key alone.
"""

from __future__ import annotations

import base64
import os
import threading
import time

from intentd.core.errors import ValidationError

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lowercase


_last = 0
_lock = threading.Lock()


def new_id(now_ms: int | None = None) -> str:
    """Strictly increasing within this process (the ULID monotonic rule: in
    the same millisecond the previous id plus one), so intents sent in one
    batch list in the order they were sent."""
    global _last
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    with _lock:
        if value >> 80 <= _last >> 80:
            value = _last + 1
        _last = value
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def looks_like_id(value: str) -> bool:
    return len(value) == 26 and all(c in _ALPHABET for c in value)


def page_token(last_id: str) -> str:
    """The keyset token of a page of a list ordered by id (intents, human
    tasks): the next page starts below ``last_id``."""
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def parse_page_token(token: str) -> str | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise ValidationError("page_token", "is not a token this server issued") from None
    version, _, last_id = raw.partition(":")
    if version != "v1" or not looks_like_id(last_id):
        raise ValidationError("page_token", "is not a token this server issued")
    return last_id
