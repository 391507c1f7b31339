"""Settings of the sidecar (``intentd sidecar``), one ``INTENTD_<FIELD>`` each."""

from __future__ import annotations

import ipaddress
import os
import shlex
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from intentd.core.config import env_name, parse_host_port, require, resolve_api_key
from intentd.core.errors import ValidationError
from intentd.core.limits import MAX_SIDECAR_ID_LEN
from intentd.core.validation import check_agent_address, check_intent_type

UNIX_PREFIX = "unix://"
# What the supervised agent does not inherit from the sidecar's environment:
# the sidecar's credentials (the agent talks only to the sidecar, which holds
# them) and a database URL, which may carry a password and neither needs.
WITHHELD_FROM_AGENT = frozenset(env_name(name) for name in (
    "api_key", "api_key_file", "tls_cert_file", "tls_key_file", "database_url"))


def default_listen() -> str:
    # Per process, so two sidecars on one host never fight over a socket.
    return f"{UNIX_PREFIX}{Path(tempfile.gettempdir()) / f'intentd-sidecar-{os.getpid()}.sock'}"


def unix_socket_path(listen: str) -> Path | None:
    """The socket path of a ``unix://`` (or ``unix:``) listen address, else None."""
    if listen.startswith(UNIX_PREFIX):
        return Path(listen[len(UNIX_PREFIX):])
    if listen.startswith("unix:"):
        return Path(listen[len("unix:"):])
    return None


def split_servers(server: str) -> list[str]:
    return [part.strip() for part in server.split(",") if part.strip()]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SidecarSettings:
    # Agent addresses served, agent://<org>/<env>/<name>; at least one.
    addresses: list[str] = field(default_factory=list)
    # Control plane HOST:PORT; a comma-separated list names replicas, tried in
    # turn on each reconnect.
    server: str = "127.0.0.1:7300"
    # Intent types taken; empty means every type.
    intent_types: list[str] = field(default_factory=list)
    # Most intents run at once over all attached agents.
    capacity: int = 10
    # Where agents reach the sidecar: unix:///path.sock (default) or a
    # loopback HOST:PORT (port 0 picks a free one).
    agent_listen: str = field(default_factory=default_listen)
    # Command line of an agent to supervise (restarted when it exits).
    exec: str | None = None
    # On SIGTERM, how long held intents may run on before they are released.
    drain_grace_s: float = 30.0
    reconnect_max_backoff_s: float = 5.0
    # Stable for the process so a reconnect keeps its leases.
    sidecar_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    # How long a supervised agent has between SIGTERM and SIGKILL.
    agent_stop_grace_s: float = 10.0
    log_level: str = "INFO"
    # "text" or "json" (one JSON object per line, with intent_id/attempt/sidecar_id).
    log_format: str = "text"
    # Payloads and results appear in logs only when true (they may hold personal data).
    log_payloads: bool = False
    # Prometheus /metrics on HOST:PORT (port 0 picks one); empty (the default)
    # serves none. Off by default because a host often runs several sidecars
    # (one per agent) and a fixed port would collide; a container sets
    # 0.0.0.0:9464, which is only the pod's own address.
    metrics_listen: str | None = None
    # The sidecar's API key (role agent, scoped to its addresses), sent as
    # "authorization: Bearer ..." on its stream.
    api_key: str | None = None
    # Or the file holding that key, so it is neither in the environment (which
    # a supervised agent would otherwise inherit) nor on the command line.
    api_key_file: Path | None = None
    # TLS to the control plane: the CA that signed the server's certificate,
    # and for mutual TLS this sidecar's certificate and key.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @property
    def servers(self) -> list[str]:
        return split_servers(self.server)

    def bearer_key(self) -> str | None:
        """The API key to send, read from api_key_file when that is set."""
        return resolve_api_key(self.api_key, self.api_key_file)

    @property
    def exec_argv(self) -> list[str]:
        return shlex.split(self.exec) if self.exec else []

    def validate(self) -> None:
        servers = self.servers
        require(bool(servers), "server", "names no control plane (expected HOST:PORT[,HOST:PORT...])")
        for server in servers:
            parse_host_port(server, "server")
        require(bool(self.addresses), "addresses",
                "is required: the agent addresses served (agent://<org>/<env>/<name>, comma-separated)")
        for address in self.addresses:
            _check(check_agent_address, address, "addresses")
        for intent_type in self.intent_types:
            _check(check_intent_type, intent_type, "intent_types")
        require(1 <= self.capacity <= 10_000, "capacity", f"must be 1..10000, got {self.capacity}")
        self.bearer_key()
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            require(path is None or Path(path).is_file(), name, f"{path} is not a readable file")
        require((self.tls_cert_file is None) == (self.tls_key_file is None), "tls_cert_file",
                "INTENTD_TLS_CERT_FILE and INTENTD_TLS_KEY_FILE go together")
        require(self.tls_cert_file is None or self.tls_ca_file is not None, "tls_ca_file",
                "mutual TLS needs INTENTD_TLS_CA_FILE too")
        self._validate_listen()
        if self.exec is not None:
            try:
                argv = shlex.split(self.exec)
            except ValueError as exc:
                require(False, "exec", f"is not a valid command line ({exc})")
            else:
                require(bool(argv), "exec", "is an empty command line")
        require(0 <= self.drain_grace_s <= 3600, "drain_grace_s", "must be 0..3600 seconds")
        require(0.05 <= self.reconnect_max_backoff_s <= 300, "reconnect_max_backoff_s",
                "must be 0.05..300 seconds")
        require(0 <= self.agent_stop_grace_s <= 3600, "agent_stop_grace_s", "must be 0..3600 seconds")
        require(bool(self.sidecar_id.strip()) and len(self.sidecar_id) <= MAX_SIDECAR_ID_LEN, "sidecar_id",
                f"must be 1..{MAX_SIDECAR_ID_LEN} characters")
        require(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
                "must be DEBUG, INFO, WARNING or ERROR")
        require(self.log_format in ("text", "json"), "log_format", f"must be text or json, got {self.log_format!r}")
        if self.metrics_listen is not None:
            parse_host_port(self.metrics_listen, "metrics_listen")

    def _validate_listen(self) -> None:
        path = unix_socket_path(self.agent_listen)
        if path is not None:
            require(path.is_absolute(), "agent_listen", f"unix socket path must be absolute, got {self.agent_listen!r}")
            require(path.parent.is_dir(), "agent_listen", f"directory {path.parent} does not exist")
            # sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
            require(len(str(path).encode()) <= 107, "agent_listen",
                    f"unix socket path is longer than 107 bytes: {path}")
            return
        host, _ = parse_host_port(self.agent_listen, "agent_listen")
        # The runtime API has no authentication: only the same host may reach it.
        require(_is_loopback(host), "agent_listen",
                f"must be a unix:///path socket or a loopback HOST:PORT, got {self.agent_listen!r}")


def _check(check: Callable[[str, str], str], value: str, setting: str) -> None:
    try:
        check(value, setting)
    except ValidationError as exc:
        require(False, setting, str(exc).removeprefix(f"{setting}: "))
