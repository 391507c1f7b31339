"""One settings mechanism for every intentd process.

A settings class is a frozen dataclass whose fields map to environment
variables ``INTENTD_<FIELD>`` (and to Helm values of the same names). Values
come from defaults, then the environment, then command-line flags, and are
checked at start with messages that name the bad setting.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

# Re-exported: settings classes raise it from here.
from .errors import SettingsError as SettingsError

ENV_PREFIX = "INTENTD_"

T = TypeVar("T")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _parse(name: str, raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw == "":
            return None
        return _parse(name, raw, args[0])
    if origin in (list, tuple):
        (item,) = typing.get_args(kind)[:1]
        values = [_parse(name, part.strip(), item) for part in raw.split(",") if part.strip()]
        return tuple(values) if origin is tuple else values
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}: expected true or false, got {raw!r}")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{name}: expected a whole number, got {raw!r}") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(f"{name}: expected a number, got {raw!r}") from None
    if kind is Path:
        return Path(raw).expanduser()
    return raw


def load_settings(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Builds ``cls`` from its defaults, ``environ`` (os.environ by default) and
    ``overrides`` (flags; None means not given), then calls its ``validate()``."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = env_name(field.name)
        if overrides.get(field.name) is not None:
            value = overrides[field.name]
            # Flags arrive as text; give them the same parsing as the environment.
            values[field.name] = _parse(f"--{field.name.replace('_', '-')}", value, hints[field.name]) \
                if isinstance(value, str) else value
        elif name in env:
            values[field.name] = _parse(name, env[name], hints[field.name])
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
    settings = cls(**values)
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate()
    return settings


def require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise SettingsError(f"{env_name(field)}: {message}")


def parse_host_port(value: str, field: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    require(bool(sep) and port.isdigit(), field, f"expected HOST:PORT, got {value!r}")
    require(0 <= int(port) <= 65535, field, f"port {port} is out of range")
    return host.strip("[]") or "127.0.0.1", int(port)


def resolve_api_key(api_key: str | None, api_key_file: Path | None) -> str | None:
    """The API key from INTENTD_API_KEY or, kept out of the environment and
    the process list, from the file INTENTD_API_KEY_FILE names (one line)."""
    require(not (api_key and api_key_file), "api_key", "give INTENTD_API_KEY or INTENTD_API_KEY_FILE, not both")
    if api_key_file is None:
        return api_key or None
    try:
        text = Path(api_key_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{env_name('api_key_file')}: cannot read {api_key_file}: {exc}") from None
    require(bool(text), "api_key_file", f"{api_key_file} is empty")
    require(len(text.splitlines()) == 1, "api_key_file", f"{api_key_file} must hold the key alone on one line")
    return text
