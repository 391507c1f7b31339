"""Prometheus metrics of the control plane and the sidecar.

Each process kind has its own registry, ``SERVER_REGISTRY`` and
``SIDECAR_REGISTRY`` (not prometheus_client's default one): a process exports
exactly its own series (a sidecar does not export two dozen zero-valued
server series, and a test process that imports both keeps them apart), plus
the standard ``process_*``, ``python_gc_*`` and ``python_info`` series and
``intentd_build_info{version}``. A process serves its registry with
``start_metrics_server(listen, registry)`` at start; metrics are plain
module-level objects, updated from anywhere (they are thread-safe).

Control plane (``SERVER_REGISTRY``) -- where each one is updated
================================================================

The server code is wired by hand; this is the contract. "Commit" means after
the guarded statement returned its row (a refused write counts nothing but
its ``intentd_writes_total`` code).

``INTENTS`` -- ``intentd_intents{state, intent_type}`` (gauge)
    An ``IntentCountsCollector``. A sweeper (a ``BackgroundService``, so its
    lag is visible too) counts the live intents (PENDING, DELIVERED,
    IN_PROGRESS, WAITING) by state and type every few seconds and calls ``INTENTS.update(rows)`` with
    ``(state, intent_type, count)`` tuples; or ``INTENTS.set_source(fn)`` with
    a cheap, non-blocking callable returning the cached rows. Scrapes never
    touch the database. Every replica exports the same database-wide numbers:
    aggregate with ``max by (state, intent_type)``, never ``sum``.
``SENDS`` -- ``intentd_sends_total{result="created"|"duplicate"}``
    ``IntentService.SendIntent``/``SendIntents``: once per intent after
    ``store.send`` returned, ``record_send(sent.created)``.
``DELIVERIES`` -- ``intentd_deliveries_total``
    ``ClaimLoop.run`` (``intentd.server.stream.claims``): once per assignment
    put on a stream.
``REDELIVERIES`` -- ``intentd_redeliveries_total{cause}``
    Every time an attempt ends and the intent goes back to PENDING for
    another one, with ``record_redelivery(cause)``:

    - ``agent_died`` / ``sidecar_stopped`` / ``drained``: a ``release`` write
      that committed with state PENDING (``WriteRouter.write``, op
      ``release``; the cause is ``release_cause(write.release.reason)``);
    - ``lease_expired``: ``LeaseSweeper.run_once``, each expired row whose
      state is PENDING;
    - ``failed_retryable``: a ``fail`` write that committed with state PENDING.
``ATTEMPTS_EXHAUSTED`` -- ``intentd_attempts_exhausted_total``
    The same three places when the state is FAILED with error code
    ``ATTEMPTS_EXHAUSTED`` (a release of the last attempt, an expiry of the
    last attempt, a retryable fail of the last attempt): the dead letter.
``STEPS_RECORDED`` -- ``intentd_steps_recorded_total``
    ``WriteRouter.write``, op ``step``, after ``leases.record_step`` returned
    (a repeated write of a committed step returns the stored record and also
    counts; that is rare: a lost answer).
``CHUNKS_APPENDED`` -- ``intentd_stream_chunks_appended_total``
    ``WriteRouter.write``, op ``emit``, by ``EmitOutcome.appended`` once the
    emit committed (a repeat adds 0).
``WRITES`` -- ``intentd_writes_total{op, code}``
    ``WriteRouter.write`` (``intentd.server.stream.writes``), once per write, after ``result.code`` is final:
    ``record_write(op, result.code)``; op is step, checkpoint, progress,
    complete, fail, release (or "none"), code the ``google.rpc.Code`` name
    (OK, FAILED_PRECONDITION, ...).
``DISPATCH_LATENCY`` -- ``intentd_dispatch_latency_seconds`` (histogram)
    ``ClaimLoop.run``, per claimed row:
    ``observe_dispatch_latency((row["update_time"] - row["available_at"]).total_seconds())``
    (both from the database clock: the claim stamps ``update_time``;
    ``available_at`` is when the intent became claimable, after any backoff).
``END_TO_END_LATENCY`` -- ``intentd_end_to_end_latency_seconds{state}`` (histogram)
    Whenever an intent becomes terminal, with
    ``observe_end_to_end(state, seconds from create_time to finish_time)``
    (add ``extract(epoch FROM finish_time - create_time) AS age_s`` to the
    RETURNING of complete_intent, fail_intent, release_intent, expire_leases,
    cancel_intent and expire_deadlines). COMPLETED: ``complete`` committed
    (not the repeat path); FAILED: ``fail``/``release``/expiry ending in
    FAILED; CANCELED: ``CancelIntent``; TIMED_OUT: ``DeadlineSweeper``.
``CONNECTED_SIDECARS`` -- ``intentd_connected_sidecars`` (gauge)
    ``ControlPlane.start``: ``CONNECTED_SIDECARS.set_function(lambda: len(agents.sessions))``.
``ASSIGNMENTS_IN_FLIGHT`` -- ``intentd_assignments_in_flight`` (gauge)
    ``ControlPlane.start``: ``ASSIGNMENTS_IN_FLIGHT.set_function(lambda:
    sum(len(s.held) for s in agents.sessions))`` (leases held by this
    replica's streams, DELIVERED or IN_PROGRESS).
``DB_POOL_*`` -- ``intentd_db_pool_size``, ``intentd_db_pool_in_use``, ``intentd_db_pool_max_size``
    ``ControlPlane.start`` after ``db.open()``: ``bind_pool(db.pool)``.
``SWEEPER_LAG`` -- ``intentd_sweeper_lag_seconds{sweeper}`` (gauge)
    Seconds since the sweeper's last successful round:
    ``sweeper_started(self.name)`` in ``BackgroundService.start`` (or in each
    sweeper's ``__init__``), ``sweeper_succeeded(self.name)`` after a round
    returns (``self.rounds += 1`` in ``BackgroundService._loop``). Only the
    control plane's sweepers should call these (the sidecar's pinger is a
    BackgroundService too): pass the server's sweepers' names.
``NOTIFICATIONS`` -- ``intentd_notifications_total{channel="events"|"pending"|"keys"|"children"|"streams"}``
    ``NotificationHub._on_event`` / ``_on_pending`` / ``_on_key`` / ``_on_children`` / ``_on_streams`` (next to
    ``self.notifications += 1``).

Sidecar (``SIDECAR_REGISTRY``), wired in ``intentd.sidecar``
============================================================

``intentd_sidecar_held_intents``, ``intentd_sidecar_agents_attached``,
``intentd_sidecar_upstream_up`` (1 while a registered stream is up),
``intentd_sidecar_pending_writes`` (gauges read at scrape time);
``intentd_sidecar_agent_restarts_total``, ``intentd_sidecar_reconnects_total``,
``intentd_sidecar_writes_total{op, code}`` (every write handed to the control
plane connection, by its final answer), ``intentd_sidecar_releases_total{reason}``.
"""

from __future__ import annotations

import hmac
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from .. import __version__
from ..config import parse_host_port

log = logging.getLogger("intentd.metrics")

# ---------------------------------------------------------------- registries


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    Info("intentd_build", "The intentd version of this process.", registry=registry).info({"version": __version__})
    return registry


SERVER_REGISTRY = _registry()
SIDECAR_REGISTRY = _registry()

# google.rpc.Code numbers, as WriteResult.code carries them, by name.
RPC_CODE_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
    10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
    15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}
WRITE_OPS = ("step", "checkpoint", "progress", "complete", "fail", "release", "wait", "start_children")
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELED", "TIMED_OUT")

# Causes of intentd_redeliveries_total.
AGENT_DIED = "agent_died"
SIDECAR_STOPPED = "sidecar_stopped"
DRAINED = "drained"
LEASE_EXPIRED = "lease_expired"
FAILED_RETRYABLE = "failed_retryable"
REDELIVERY_CAUSES = (AGENT_DIED, SIDECAR_STOPPED, DRAINED, LEASE_EXPIRED, FAILED_RETRYABLE)
_RELEASE_CAUSES = {"AGENT_DIED": AGENT_DIED, "SIDECAR_STOPPED": SIDECAR_STOPPED, "DRAINED": DRAINED}

DISPATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0)
END_TO_END_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                      3600.0, 7200.0, 21600.0, 86400.0)


def rpc_code_name(code: int) -> str:
    return RPC_CODE_NAMES.get(code, f"CODE_{code}")


def _safe(fn: Callable[[], float]) -> Callable[[], float]:
    """A scrape-time callback that cannot fail the whole scrape."""

    def read() -> float:
        try:
            return float(fn())
        except Exception:
            log.debug("metric callback failed", exc_info=True)
            return math.nan

    return read


# ---------------------------------------------------------------- control plane


class IntentCountsCollector:
    """``intentd_intents{state, intent_type}``: the number of intents in each
    state, from a snapshot the server refreshes off the scrape path.

    Either push with ``update(rows)`` or pull with ``set_source(fn)``; rows
    are ``(state, intent_type, count)``. A source must be cheap and must not
    block (it runs on the scrape thread): return rows a sweeper cached.
    """

    NAME = "intentd_intents"
    HELP = "Intents by state and intent type, database-wide (every replica reports the same: use max, not sum)."

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: tuple[tuple[str, str, float], ...] = ()
        self._source: Callable[[], Iterable[tuple[str, str, float]]] | None = None

    def update(self, rows: Iterable[tuple[str, str, float]]) -> None:
        snapshot = tuple((str(state), str(intent_type), float(count)) for state, intent_type, count in rows)
        with self._lock:
            self._rows = snapshot

    def set_source(self, source: Callable[[], Iterable[tuple[str, str, float]]] | None) -> None:
        with self._lock:
            self._source = source

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.NAME, self.HELP, labels=["state", "intent_type"])

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        with self._lock:
            source, rows = self._source, self._rows
        if source is not None:
            try:
                rows = tuple(source())
            except Exception:
                log.warning("the intent counts source failed; exporting none", exc_info=True)
                rows = ()
        for state, intent_type, count in rows:
            family.add_metric([str(state), str(intent_type)], float(count))
        yield family


INTENTS = IntentCountsCollector()
SERVER_REGISTRY.register(INTENTS)

SENDS = Counter(
    "intentd_sends", "Intents sent, by whether the send created the intent or matched an earlier one "
    "by idempotency key.", ["result"], registry=SERVER_REGISTRY)
DELIVERIES = Counter(
    "intentd_deliveries", "Assignments (attempts) sent to sidecars by this replica.", registry=SERVER_REGISTRY)
REDELIVERIES = Counter(
    "intentd_redeliveries", "Attempts that ended with the intent back in PENDING for another attempt, by cause.",
    ["cause"], registry=SERVER_REGISTRY)
ATTEMPTS_EXHAUSTED = Counter(
    "intentd_attempts_exhausted", "Intents failed with ATTEMPTS_EXHAUSTED (dead-lettered).",
    registry=SERVER_REGISTRY)
STEPS_RECORDED = Counter(
    "intentd_steps_recorded", "Step results recorded (RecordStep writes committed).", registry=SERVER_REGISTRY)
CHUNKS_APPENDED = Counter(
    "intentd_stream_chunks_appended", "Stream chunks appended by emits (not counting dropped or repeated ones).",
    registry=SERVER_REGISTRY)
WRITES = Counter(
    "intentd_writes", "Fenced writes from sidecars, by op and google.rpc code of the answer.", ["op", "code"],
    registry=SERVER_REGISTRY)
DISPATCH_LATENCY = Histogram(
    "intentd_dispatch_latency_seconds", "From an intent becoming claimable to its claim for a sidecar stream.",
    buckets=DISPATCH_BUCKETS, registry=SERVER_REGISTRY)
END_TO_END_LATENCY = Histogram(
    "intentd_end_to_end_latency_seconds", "From an intent's creation to its terminal state, by that state.",
    ["state"], buckets=END_TO_END_BUCKETS, registry=SERVER_REGISTRY)
CONNECTED_SIDECARS = Gauge(
    "intentd_connected_sidecars", "Sidecar Connect streams open on this replica.", registry=SERVER_REGISTRY)
ASSIGNMENTS_IN_FLIGHT = Gauge(
    "intentd_assignments_in_flight", "Leases held by this replica's sidecar streams (DELIVERED or IN_PROGRESS).",
    registry=SERVER_REGISTRY)
DB_POOL_SIZE = Gauge(
    "intentd_db_pool_size", "Open connections in this replica's PostgreSQL pool.", registry=SERVER_REGISTRY)
DB_POOL_IN_USE = Gauge(
    "intentd_db_pool_in_use", "Pool connections checked out right now.", registry=SERVER_REGISTRY)
DB_POOL_MAX_SIZE = Gauge(
    "intentd_db_pool_max_size", "The pool's maximum size (INTENTD_POOL_MAX_SIZE).", registry=SERVER_REGISTRY)
SWEEPER_LAG = Gauge(
    "intentd_sweeper_lag_seconds", "Seconds since the sweeper's last successful round (since its start before "
    "the first).", ["sweeper"], registry=SERVER_REGISTRY)
NOTIFICATIONS = Counter(
    "intentd_notifications", "PostgreSQL notifications received by this replica's listener, by channel.",
    ["channel"], registry=SERVER_REGISTRY)

for _result in ("created", "duplicate"):
    SENDS.labels(result=_result)
for _cause in REDELIVERY_CAUSES:
    REDELIVERIES.labels(cause=_cause)
for _op in WRITE_OPS:
    WRITES.labels(op=_op, code="OK")
for _state in TERMINAL_STATES:
    END_TO_END_LATENCY.labels(state=_state)
for _channel in ("events", "pending", "keys"):
    NOTIFICATIONS.labels(channel=_channel)


_SENT = {created: SENDS.labels(result="created" if created else "duplicate") for created in (True, False)}
# Label children by (op, code): ``labels()`` takes a lock and builds a key on
# every call, and these are counted for every write of every intent.
_WRITE_CHILDREN: dict[tuple[str | None, int], Any] = {}
_SIDECAR_WRITE_CHILDREN: dict[tuple[str | None, int], Any] = {}


def record_send(created: bool) -> None:
    _SENT[created].inc()


def _write_child(counter: Counter, children: dict[tuple[str | None, int], Any], op: str | None, code: int) -> Any:
    child = children.get((op, code))
    if child is None:
        child = children[(op, code)] = counter.labels(op=op or "none", code=rpc_code_name(code))
    return child


def record_write(op: str | None, code: int) -> None:
    _write_child(WRITES, _WRITE_CHILDREN, op, code).inc()


def release_cause(reason: str) -> str:
    """The redelivery cause of a release write's reason (AGENT_DIED, DRAINED, SIDECAR_STOPPED)."""
    return _RELEASE_CAUSES.get(reason, reason.lower() or "unknown")


def record_redelivery(cause: str) -> None:
    REDELIVERIES.labels(cause=cause).inc()


def observe_dispatch_latency(seconds: float) -> None:
    # Clocks can disagree by a little; a negative wait is no wait.
    DISPATCH_LATENCY.observe(max(0.0, seconds))


def observe_end_to_end(state: str, seconds: float) -> None:
    END_TO_END_LATENCY.labels(state=state.upper().removeprefix("INTENT_STATE_")).observe(max(0.0, seconds))


class Pool(Protocol):
    """What ``bind_pool`` reads of an asyncpg pool."""

    def get_size(self) -> int: ...

    def get_idle_size(self) -> int: ...

    def get_max_size(self) -> int: ...


def bind_pool(pool: Pool) -> None:
    """Makes the DB pool gauges read ``pool`` at scrape time."""
    DB_POOL_SIZE.set_function(_safe(pool.get_size))
    DB_POOL_IN_USE.set_function(_safe(lambda: pool.get_size() - pool.get_idle_size()))
    DB_POOL_MAX_SIZE.set_function(_safe(pool.get_max_size))


_sweeps: dict[str, float] = {}


def sweeper_started(name: str) -> None:
    """Starts the lag clock of a sweeper: until its first success the lag is
    the time since it started."""
    _sweeps[name] = time.monotonic()
    SWEEPER_LAG.labels(sweeper=name).set_function(lambda: time.monotonic() - _sweeps[name])


def sweeper_succeeded(name: str) -> None:
    if name not in _sweeps:
        sweeper_started(name)
    _sweeps[name] = time.monotonic()


# ---------------------------------------------------------------- sidecar

SIDECAR_HELD_INTENTS = Gauge(
    "intentd_sidecar_held_intents", "Intents this sidecar holds a lease on (placed with an agent or waiting).",
    registry=SIDECAR_REGISTRY)
SIDECAR_AGENTS_ATTACHED = Gauge(
    "intentd_sidecar_agents_attached", "Agents with an open Attach stream.", registry=SIDECAR_REGISTRY)
SIDECAR_UPSTREAM_UP = Gauge(
    "intentd_sidecar_upstream_up", "1 while a registered stream to the control plane is up, else 0.",
    registry=SIDECAR_REGISTRY)
SIDECAR_PENDING_WRITES = Gauge(
    "intentd_sidecar_pending_writes", "Writes waiting for the control plane's answer (they wait out outages).",
    registry=SIDECAR_REGISTRY)
SIDECAR_AGENT_RESTARTS = Counter(
    "intentd_sidecar_agent_restarts", "Restarts of the supervised agent (--exec) after it exited.",
    registry=SIDECAR_REGISTRY)
SIDECAR_RECONNECTS = Counter(
    "intentd_sidecar_reconnects", "Attempts to open a new control-plane stream after one ended or failed.",
    registry=SIDECAR_REGISTRY)
SIDECAR_WRITES = Counter(
    "intentd_sidecar_writes", "Writes forwarded to the control plane, by op and google.rpc code of the final "
    "answer (also answers made locally: a lease known lost, shutdown).", ["op", "code"], registry=SIDECAR_REGISTRY)
SIDECAR_RELEASES = Counter(
    "intentd_sidecar_releases", "Intents given back for redelivery by this sidecar, by reason.", ["reason"],
    registry=SIDECAR_REGISTRY)

for _op in WRITE_OPS:
    SIDECAR_WRITES.labels(op=_op, code="OK")
for _reason in ("AGENT_DIED", "DRAINED"):
    SIDECAR_RELEASES.labels(reason=_reason)


def record_sidecar_write(op: str | None, code: int) -> None:
    _write_child(SIDECAR_WRITES, _SIDECAR_WRITE_CHILDREN, op, code).inc()


# ---------------------------------------------------------------- HTTP


@dataclass
class MetricsServer:
    """A running metrics endpoint (a daemon thread); ``close()`` stops it."""

    host: str
    port: int
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _guarded(app: Any, token: str | None, require_token: bool) -> Any:
    """``app`` behind ``Authorization: Bearer <token>``: with ``token`` every
    request must carry it; without one, ``require_token`` refuses them all
    (the server's series span every tenant: with API keys on, nobody may
    read them without the operator's token)."""
    expected = f"Bearer {token}".encode() if token else None

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        if expected is not None or require_token:
            presented = str(environ.get("HTTP_AUTHORIZATION", "")).encode()
            if expected is None or not hmac.compare_digest(presented, expected):
                body = (b"/metrics needs 'Authorization: Bearer <token>' (INTENTD_METRICS_TOKEN_FILE)\n"
                        if expected is not None else
                        b"/metrics is off while API keys are on and INTENTD_METRICS_TOKEN_FILE is not set\n")
                start_response("401 Unauthorized" if expected is not None else "403 Forbidden",
                               [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
                return [body]
        return app(environ, start_response)

    return guarded


def start_metrics_server(listen: str, registry: CollectorRegistry, *, token: str | None = None,
                         require_token: bool = False) -> MetricsServer:
    """Serves ``registry`` over HTTP on ``listen`` (HOST:PORT; port 0 picks a
    free one) at ``/metrics``, in a daemon thread. Raises OSError naming the
    address when it cannot bind, so a misconfigured port fails the start.
    Also turns off the ``*_created`` series for the whole process.

    With ``token``, requests must carry ``Authorization: Bearer <token>``;
    with ``require_token`` and no token, every request is refused. Not TLS:
    bind it to a pod/loopback address, or restrict who reaches it
    (NetworkPolicy ``metricsFrom``)."""
    host, port = parse_host_port(listen, "metrics_listen")
    # The text format's ``*_created`` series double the series count and no
    # dashboard uses them; this is process-wide, hence here and not at import.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call,unused-ignore]

    class Server(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]

    app = _guarded(prometheus_client.make_wsgi_app(registry), token, require_token)
    try:
        server = make_server(host, port, app, Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {listen}: {exc.strerror or exc}") from exc
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="metrics")
    thread.start()
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(host, bound, server, thread)
