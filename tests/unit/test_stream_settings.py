"""The server's stream settings (docs/streams.md): their defaults are the
limits' and bad values are refused naming the variable."""

from __future__ import annotations

import dataclasses

import pytest

from intentd.core.config import SettingsError
from intentd.core.limits import DEFAULT_STREAM_MAX_BYTES, DEFAULT_STREAM_MAX_CHUNKS_PER_S
from intentd.server.settings import ServerSettings


def test_the_defaults_are_the_limits() -> None:
    settings = ServerSettings()
    assert settings.stream_max_bytes == DEFAULT_STREAM_MAX_BYTES
    assert settings.stream_max_chunks_per_s == DEFAULT_STREAM_MAX_CHUNKS_PER_S
    assert settings.stream_prune_interval_s == 5.0
    settings.validate()


@pytest.mark.parametrize(("field", "value", "ok"), [
    ("stream_max_bytes", 1024, True), ("stream_max_bytes", 1023, False), ("stream_max_bytes", 1024**4, True),
    ("stream_max_bytes", 1024**4 + 1, False), ("stream_max_chunks_per_s", 1, True),
    ("stream_max_chunks_per_s", 0, False), ("stream_max_chunks_per_s", 10_000_001, False),
    ("stream_prune_interval_s", 0.01, True), ("stream_prune_interval_s", 0.0, False),
    ("stream_prune_interval_s", 3601.0, False),
])
def test_bounds_name_the_variable(field: str, value: float, ok: bool) -> None:
    settings = dataclasses.replace(ServerSettings(), **{field: value})
    if ok:
        settings.validate()
        return
    with pytest.raises(SettingsError, match=f"INTENTD_{field.upper()}"):
        settings.validate()
