"""Where the client finds its server and credentials: constructor arguments,
or the environment (``IntentClient.from_env()``), under the same
``INTENTD_<NAME>`` variables the sidecar and the CLI read."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from intentd.core.config import env_name, require, resolve_api_key
from intentd.core.errors import SettingsError

DEFAULT_TARGET = "127.0.0.1:7300"

StrPath = str | os.PathLike[str]


@dataclass(frozen=True)
class ClientSettings:
    """What ``from_env`` reads, one ``INTENTD_<FIELD>`` each."""

    # The control plane, HOST:PORT (any gRPC target).
    target: str = DEFAULT_TARGET
    # Sent as "authorization: Bearer ..." on every call.
    api_key: str | None = None
    # Or the file holding it, one line: kept out of the environment and the
    # process list.
    api_key_file: Path | None = None
    # TLS: the CA that signed the server's certificate (the system's roots
    # without it), and for mutual TLS the client's certificate and key.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    def validate(self) -> None:
        require(bool(self.target.strip()), "target", "is empty (expected HOST:PORT)")
        # Read now, so a bad file is reported at start and by its variable.
        self.bearer_key()
        self.credentials()

    def bearer_key(self) -> str | None:
        return resolve_api_key(self.api_key, self.api_key_file)

    def credentials(self) -> grpc.ChannelCredentials | None:
        return tls_credentials(self.tls_ca_file, self.tls_cert_file, self.tls_key_file, name=env_name)


def tls_credentials(
    ca_file: StrPath | None,
    cert_file: StrPath | None,
    key_file: StrPath | None,
    *,
    name: Callable[[str], str] = str,
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials from PEM files, or None (plaintext) when neither
    a CA nor a certificate is given. ``name`` turns a parameter's name into
    the one an error message uses (an argument, or its environment variable)."""
    if (cert_file is None) != (key_file is None):
        raise SettingsError(f"{name('tls_cert_file')} and {name('tls_key_file')} go together")
    if ca_file is None and cert_file is None:
        return None

    def read(path: StrPath | None, field: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise SettingsError(f"{name(field)}: cannot read {path}: {exc.strerror or exc}") from None

    return grpc.ssl_channel_credentials(
        read(ca_file, "tls_ca_file"), read(key_file, "tls_key_file"), read(cert_file, "tls_cert_file")
    )


def bearer_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries an API key (none for an empty key, as
    for an unset variable)."""
    if not api_key:
        return ()
    # grpc would refuse the header only at the first call, and less clearly.
    if any(c in api_key for c in "\r\n"):
        raise SettingsError("api_key: must be a single line")
    return (("authorization", f"Bearer {api_key}"),)


__all__ = ["DEFAULT_TARGET", "ClientSettings", "bearer_metadata", "tls_credentials"]
