"""Assembles and runs one control-plane replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from intentd.core.background import BackgroundService
from intentd.core.observability import metrics
from intentd.generated.v1 import (
    admin_service_pb2,
    agent_service_pb2,
    human_task_pb2,
    intent_service_pb2,
)

from .admin_service import AdminService
from .agent_service import AgentService
from .auth import Authenticator
from .batcher import WriteBatcher
from .children import ChildStore
from .chunks import ChunkStore
from .db import Database
from .embedded import EmbeddedPostgres
from .history import page_bytes
from .hub import NotificationHub
from .human_task_service import HumanTaskService
from .intent_service import IntentService
from .leases import LeaseStore
from .quotas import Quotas
from .rpc import add_service
from .settings import ServerSettings
from .store import IntentStore
from .sweepers import (
    ChildSweeper,
    DeadlineSweeper,
    IntentCounter,
    LeaseSweeper,
    RetentionSweeper,
    StreamPruner,
    WaitSweeper,
)
from .waits import WaitStore

log = logging.getLogger("intentd.server")

SERVICE_NAMES = (
    intent_service_pb2.DESCRIPTOR.services_by_name["IntentService"].full_name,
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    human_task_pb2.DESCRIPTOR.services_by_name["HumanTaskService"].full_name,
)


class ControlPlane:
    """One replica: database pool, notification hub, gRPC services and sweepers.

    Replicas share nothing but PostgreSQL; any number can run on one database.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.embedded: EmbeddedPostgres | None = None
        self.database_url = settings.database_url
        self.db: Database | None = None
        self.hub: NotificationHub | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.services: list[BackgroundService] = []
        self.agents: AgentService | None = None
        self.batcher: WriteBatcher | None = None
        self.metrics_server: metrics.MetricsServer | None = None
        self.health_server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    @property
    def address(self) -> str:
        host = self.settings.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        if self.database_url is None:
            self.embedded = EmbeddedPostgres(self.settings.data_dir)
            self.database_url = await asyncio.to_thread(self.embedded.start)
            log.info("no INTENTD_DATABASE_URL: using the embedded PostgreSQL in %s", self.settings.data_dir)
        self.db = Database(
            self.database_url, min_size=self.settings.pool_min_size, max_size=self.settings.pool_max_size,
            application_name=f"intentd:{self.settings.instance_name}"[:63],
        )
        await self.db.open(migrate_mode=self.settings.migrate, migration_url=self.settings.migration_database_url)
        self.hub = NotificationHub(self.database_url, application_name=self.db.application_name)
        await self.hub.start()
        self.batcher = WriteBatcher(self.db, workers=max(1, self.settings.pool_max_size // 2))
        self.batcher.start()
        store = IntentStore(self.db, default_heartbeat_timeout_ms=self.settings.heartbeat_timeout_ms,
                            batcher=self.batcher)
        self.auth = Authenticator(self.db, enabled=self.settings.auth_enabled, default_tenant=self.settings.tenant)
        # A key's change is announced by the database: dropped from the cache
        # before the calls and streams using it are woken to re-check it.
        self.hub.on_key(self.auth.key_changed)
        quotas = Quotas(self.db, default_max_payload_bytes=self.settings.max_payload_bytes)
        leases = LeaseStore(self.db, max_payload_bytes=self.settings.max_payload_bytes, batcher=self.batcher,
                            max_history_bytes=self.settings.max_history_bytes,
                            max_history_steps=self.settings.max_history_steps,
                            page_bytes=page_bytes(self.settings.max_message_bytes))

        self.waits = waits = WaitStore(self.db, max_record_bytes=self.settings.max_payload_bytes)
        self.children = ChildStore(
            self.db, waits, quotas, auth_enabled=self.auth.enabled,
            default_heartbeat_timeout_ms=self.settings.heartbeat_timeout_ms,
            max_history_bytes=self.settings.max_history_bytes, max_history_steps=self.settings.max_history_steps)

        self.chunks = ChunkStore(self.db, self.batcher, max_bytes=self.settings.stream_max_bytes,
                                 max_chunks_per_s=self.settings.stream_max_chunks_per_s,
                                 max_history_steps=self.settings.max_history_steps)

        options = [
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
            # Clients behind proxies ping; accept it instead of answering GOAWAY.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.so_reuseport", 0),
            # One connection cannot open streams without bound (watch floods).
            ("grpc.max_concurrent_streams", self.settings.max_concurrent_streams),
        ]
        self.server = grpc.aio.server(options=options)
        add_service(IntentService(store, self.hub, self.settings, self.auth, quotas, waits), self.server,
                    intent_service_pb2.DESCRIPTOR.services_by_name["IntentService"])
        self.agents = AgentService(leases, self.hub, self.settings, self.auth, quotas, waits=self.waits,
                                   children=self.children, chunks=self.chunks)
        add_service(self.agents, self.server, agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"])
        add_service(AdminService(store, self.settings, self.auth), self.server,
                    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"])
        add_service(HumanTaskService(waits, store, self.settings, self.auth, quotas), self.server,
                    human_task_pb2.DESCRIPTOR.services_by_name["HumanTaskService"])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        if self.settings.tls:
            assert self.settings.tls_cert_file is not None and self.settings.tls_key_file is not None
            client_ca = self.settings.tls_client_ca_file
            credentials = grpc.ssl_server_credentials(
                [(self.settings.tls_key_file.read_bytes(), self.settings.tls_cert_file.read_bytes())],
                root_certificates=client_ca.read_bytes() if client_ca else None,
                require_client_auth=client_ca is not None,
            )
            self.port = self.server.add_secure_port(self.settings.listen, credentials)
        else:
            if not self.settings.loopback_only:
                log.warning("SERVING PLAINTEXT gRPC ON %s (INTENTD_ALLOW_INSECURE): credentials and intents "
                            "cross the network unencrypted", self.settings.listen)
            self.port = self.server.add_insecure_port(self.settings.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.listen}")
        if not self.auth.enabled:
            log.warning("authentication is OFF: every caller acts as an admin of tenant %r (%s)",
                        self.settings.tenant,
                        "INTENTD_AUTH=off" if self.settings.auth == "off" else
                        "zero-config default: embedded database on loopback; set INTENTD_AUTH=on to require keys")

        metrics.bind_pool(self.db.pool)
        agents = self.agents
        metrics.CONNECTED_SIDECARS.set_function(lambda: len(agents.streams))
        metrics.ASSIGNMENTS_IN_FLIGHT.set_function(lambda: sum(len(s.leases) for s in agents.streams))
        if self.settings.metrics_listen:
            token_file = self.settings.metrics_token_file
            token = token_file.read_text().strip() if token_file is not None else None
            if token is None and self.auth.enabled:
                log.warning("/metrics refuses every scrape: API keys are on and INTENTD_METRICS_TOKEN_FILE is not "
                            "set (the series span every tenant)")
            self.metrics_server = metrics.start_metrics_server(
                self.settings.metrics_listen, metrics.SERVER_REGISTRY, token=token, require_token=self.auth.enabled)
            log.info("metrics on %s", self.metrics_server.url)
        self.services = [
            IntentCounter(self.db, interval=max(0.5, 5 * self.settings.sweep_interval_s)),
            DeadlineSweeper(store, self.settings.sweep_interval_s),
            LeaseSweeper(leases, self.settings.sweep_interval_s,
                         hold_after_outage=self.settings.heartbeat_timeout_ms / 1000),
            WaitSweeper(self.waits, self.settings.wait_sweep_interval_s),
            ChildSweeper(self.children, self.hub, self.settings.child_sweep_interval_s),
            StreamPruner(self.chunks, self.settings.stream_prune_interval_s),
        ]
        if self.settings.retention_days > 0:
            self.services.append(RetentionSweeper(store, self.settings.retention_days * 86400))
        for service in self.services:
            service.start()
        await self.server.start()
        if self.settings.health_listen:
            # Health only, plaintext: it says SERVING or not, nothing else.
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            if self.health_server.add_insecure_port(self.settings.health_listen) == 0:
                raise OSError(f"cannot listen on {self.settings.health_listen}")
            await self.health_server.start()
        await self._set_serving(True)
        log.info("intentd control plane serving on %s", self.address)

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: stop advertising health, end streams (clients resume on
        another replica), let in-flight calls finish up to ``grace``, then
        stop background work and close the pool."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_s if grace is None else grace
        log.info("shutting down (grace %.1fs)", grace)
        with contextlib.suppress(Exception):
            await self._set_serving(False)
        if self.agents is not None:
            await self.agents.close_all()
        if self.hub is not None:
            # Wakes watchers and waiters so they end now and their clients reconnect.
            await self.hub.close()
        if self.server is not None:
            await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        for service in self.services:
            await service.stop(deadline=max(grace, 1.0))
        if self.batcher is not None:
            await self.batcher.close()
        if self.db is not None:
            await self.db.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
        self._stopped.set()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


async def serve(settings: ServerSettings, ready: asyncio.Event | None = None) -> None:
    """Runs a replica until SIGTERM or SIGINT, then shuts down gracefully."""
    plane = ControlPlane(settings)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        await plane.start()
        if ready is not None:
            ready.set()
        await stop_requested.wait()
    finally:
        await plane.stop()
