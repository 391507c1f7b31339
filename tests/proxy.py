"""A loopback TCP proxy that can cut every connection through it, to play a
network partition between a sidecar and its server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit


class TcpProxy:
    def __init__(self, upstream: str) -> None:
        """``upstream`` is HOST:PORT or unix:/path/to/socket."""
        self._unix = upstream.removeprefix("unix:") if upstream.startswith("unix:") else None
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port)) if self._unix is None else ("", 0)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._closed = False
        self.cuts = 0

    def __enter__(self) -> TcpProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._closed = True
        self._listener.close()
        self._drop_all()

    def cut(self, seconds: float) -> None:
        """Drops every connection and refuses new ones for ``seconds``."""
        self._down_until = time.monotonic() + seconds
        self.cuts += 1
        self._drop_all()

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._down_until:
                client.close()
                continue
            try:
                if self._unix is not None:
                    upstream = socket.socket(socket.AF_UNIX)
                    upstream.connect(self._unix)
                else:
                    upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def postgres_upstream(url: str) -> str:
    """Where PostgreSQL listens: loopback TCP, or the embedded server's unix socket."""
    parts = urlsplit(url)
    socket_dir = parse_qs(parts.query).get("host", [""])[0]
    if socket_dir.startswith("/"):
        return f"unix:{socket_dir}/.s.PGSQL.{parts.port or 5432}"
    return f"{parts.hostname}:{parts.port or 5432}"


def postgres_through(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{proxy.address}" if user else proxy.address, query=""))
