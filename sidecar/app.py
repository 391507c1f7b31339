"""Assembles the sidecar: control-plane stream, agent-facing server, dispatcher
and (optionally) the supervised agent; and the ``intentd sidecar`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from intentd.core.aio import run
from intentd.core.config import SettingsError, load_settings
from intentd.core.logs import setup_logging
from intentd.core.observability import metrics, set_process_fields
from intentd.generated.v1 import delivery_pb2

from .dispatch import DRAINED, Dispatcher
from .leases import HeldLease, SidecarLeases
from .runtime import RuntimeServer
from .settings import SidecarSettings
from .supervisor import AgentSupervisor
from .upstream import Upstream

log = logging.getLogger("intentd.sidecar")

# How long final releases may take to be answered before leases are left to lapse.
RELEASE_DEADLINE_S = 5.0
RUNTIME_STOP_GRACE_S = 1.0


def channel_credentials(settings: SidecarSettings) -> grpc.ChannelCredentials | None:
    if settings.tls_ca_file is None:
        return None
    return grpc.ssl_channel_credentials(
        settings.tls_ca_file.read_bytes(),
        settings.tls_key_file.read_bytes() if settings.tls_key_file else None,
        settings.tls_cert_file.read_bytes() if settings.tls_cert_file else None,
    )


class Sidecar:
    """One sidecar process: ``await start()``, later ``await stop()`` (drains)."""

    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        # Shared: the upstream and the dispatcher keep no lease state of their own.
        self.leases = SidecarLeases()
        self.upstream = Upstream(
            servers=settings.servers,
            sidecar_id=settings.sidecar_id,
            addresses=settings.addresses,
            intent_types=settings.intent_types,
            on_assignment=self._on_assignment,
            on_revocation=self._on_revocation,
            reconnect_max_backoff_s=settings.reconnect_max_backoff_s,
            credentials=channel_credentials(settings),
            metadata=[("authorization", f"Bearer {key}")] if (key := settings.bearer_key()) else (),
            leases=self.leases,
        )
        self.dispatcher = Dispatcher(self.upstream, capacity=settings.capacity, intent_types=settings.intent_types,
                                     leases=self.leases)
        self.runtime = RuntimeServer(self.dispatcher, settings.agent_listen)
        self.supervisor: AgentSupervisor | None = None
        self.metrics_server: metrics.MetricsServer | None = None
        self._force = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        """Where agents reach this sidecar (known after ``start()``)."""
        address = self.runtime.address
        if address is None:
            raise RuntimeError("the sidecar is not started")
        return address

    def health(self) -> dict[str, Any]:
        return {
            "upstream": self.upstream.health(),
            "local": self.dispatcher.health(),
            "agent": self.supervisor.health() if self.supervisor else None,
        }

    def _bind_metrics(self) -> None:
        """Points the sidecar's gauges at this instance (read at scrape time)."""
        dispatcher, upstream = self.dispatcher, self.upstream
        metrics.SIDECAR_HELD_INTENTS.set_function(lambda: dispatcher.held_count)
        metrics.SIDECAR_AGENTS_ATTACHED.set_function(lambda: len(dispatcher.agents))
        metrics.SIDECAR_UPSTREAM_UP.set_function(lambda: 1.0 if upstream.connected.is_set() else 0.0)
        metrics.SIDECAR_PENDING_WRITES.set_function(lambda: upstream.pending_writes)

    async def start(self) -> None:
        self._bind_metrics()
        if self.settings.metrics_listen:
            # First: a port that cannot be bound fails the start before anything runs.
            self.metrics_server = metrics.start_metrics_server(self.settings.metrics_listen,
                                                               metrics.SIDECAR_REGISTRY)
        # Listen first: the supervised agent and the log line need the address.
        address = await self.runtime.start()
        self.upstream.start()
        argv = self.settings.exec_argv
        if argv:
            self.supervisor = AgentSupervisor(argv, address, stop_grace_s=self.settings.agent_stop_grace_s)
            self.supervisor.start()
        log.info(
            "intentd sidecar %s listening on %s; serving %s; control plane %s",
            self.settings.sidecar_id, address, ", ".join(self.settings.addresses), self.settings.server,
        )

    def force_stop(self) -> None:
        """Cuts a drain short: held intents are released now."""
        self._force.set()

    async def stop(self, grace: float | None = None) -> None:
        """Drains, then shuts down: take nothing new (SetCapacity 0; the stream
        keeps pinging so held leases stay renewed), let held intents finish
        for up to ``grace`` (default drain_grace_s), release the rest as
        DRAINED, stop the agent, close everything."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.drain_grace_s if grace is None else grace
        try:
            self.dispatcher.drain()
            held = self.dispatcher.held_count
            if held:
                log.info("draining: %d intents held; waiting up to %.1fs for them to finish", held, grace)
            if not await self.dispatcher.wait_idle(grace, interrupt=self._force):
                log.warning("releasing %d intents still held (%s)", self.dispatcher.held_count, DRAINED)
                await self.dispatcher.release_all(DRAINED, deadline=RELEASE_DEADLINE_S)
            if self.supervisor is not None:
                await self.supervisor.stop()
            # Lets releases in flight land (agents that vanished meanwhile were
            # released AGENT_DIED), then ends the agents' Attach streams...
            await self.dispatcher.close(deadline=RELEASE_DEADLINE_S)
            # ...so the server stops at once instead of waiting out its grace.
            await self.runtime.stop(RUNTIME_STOP_GRACE_S)
            await self.upstream.close()
            log.info("sidecar stopped")
        finally:
            if self.metrics_server is not None:
                self.metrics_server.close()
                self.metrics_server = None
            self._stopped.set()

    def _on_assignment(self, held: HeldLease) -> None:
        self.dispatcher.on_assignment(held)

    def _on_revocation(self, revocation: delivery_pb2.Revocation) -> None:
        self.dispatcher.on_revocation(revocation)


async def run_sidecar(settings: SidecarSettings, ready: asyncio.Event | None = None) -> None:
    """Runs until SIGTERM or SIGINT, then drains; a second signal cuts the drain short."""
    sidecar = Sidecar(settings)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_signal(name: str) -> None:
        if stop_requested.is_set():
            log.warning("%s again: releasing held intents now", name)
            sidecar.force_stop()
        else:
            log.info("%s: draining (up to %.1fs)", name, settings.drain_grace_s)
            stop_requested.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        await sidecar.start()
        # On stdout, for scripts that start a sidecar on a picked port.
        print(f"intentd sidecar listening on {sidecar.address}", flush=True)
        if ready is not None:
            ready.set()
        await stop_requested.wait()
    finally:
        await sidecar.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intentd sidecar",
        description="Serve an agent: hold its stream to the control plane and its local runtime API. "
        "Every flag has an INTENTD_<NAME> variable; flags win.",
    )
    parser.add_argument("--server", help="control plane HOST:PORT[,HOST:PORT...] (INTENTD_SERVER)")
    parser.add_argument("--address", action="append",
                        help="agent address agent://org/env/name, repeatable (INTENTD_ADDRESSES)")
    parser.add_argument("--intent-type", action="append",
                        help="intent type taken, repeatable; none means all (INTENTD_INTENT_TYPES)")
    parser.add_argument("--capacity", type=int, help="intents run at once (INTENTD_CAPACITY, default 10)")
    parser.add_argument("--listen", help="unix:///path.sock or 127.0.0.1:PORT for agents (INTENTD_AGENT_LISTEN)")
    parser.add_argument("--exec", help="agent command line to run and restart (INTENTD_EXEC)")
    parser.add_argument("--drain-grace", type=float,
                        help="seconds held intents may run on at shutdown (INTENTD_DRAIN_GRACE_S, default 30)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (INTENTD_LOG_LEVEL)")
    parser.add_argument("--log-format", help="text or json (INTENTD_LOG_FORMAT, default text)")
    parser.add_argument("--metrics-listen",
                        help="serve Prometheus /metrics on HOST:PORT; empty: none (INTENTD_METRICS_LISTEN)")
    parser.add_argument("--api-key", help="agent-role API key for the control plane (INTENTD_API_KEY); "
                        "on the command line it shows in the process list: prefer --api-key-file")
    parser.add_argument("--api-key-file", help="file holding that key, one line (INTENTD_API_KEY_FILE)")
    parser.add_argument("--tls-ca-file", help="CA of the control plane's certificate (INTENTD_TLS_CA_FILE)")
    parser.add_argument("--tls-cert-file", help="this sidecar's certificate, for mutual TLS (INTENTD_TLS_CERT_FILE)")
    parser.add_argument("--tls-key-file", help="this sidecar's key, for mutual TLS (INTENTD_TLS_KEY_FILE)")
    return parser


def _split(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


_run = run


def cli_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(
            SidecarSettings,
            server=args.server,
            addresses=_split(args.address),
            intent_types=_split(args.intent_type),
            capacity=args.capacity,
            agent_listen=args.listen,
            exec=args.exec,
            drain_grace_s=args.drain_grace,
            log_level=args.log_level,
            log_format=args.log_format,
            metrics_listen=args.metrics_listen,
            api_key=args.api_key,
            api_key_file=args.api_key_file,
            tls_ca_file=args.tls_ca_file,
            tls_cert_file=args.tls_cert_file,
            tls_key_file=args.tls_key_file,
        )
    except SettingsError as exc:
        print(f"intentd sidecar: bad setting: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, json=settings.log_format == "json", log_payloads=settings.log_payloads)
    set_process_fields(sidecar_id=settings.sidecar_id)
    if args.api_key:
        log.warning("--api-key shows the key in the process list, to every user of this host; "
                    "use --api-key-file or INTENTD_API_KEY_FILE instead")
    try:
        _run(run_sidecar(settings))
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        # Typically the listen address: in use, or a path we refuse to replace.
        print(f"intentd sidecar: {exc}", file=sys.stderr)
        return 1
    return 0
