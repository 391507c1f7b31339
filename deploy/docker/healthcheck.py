#!/usr/bin/env python3
"""Container health check for the intentd images (Docker HEALTHCHECK and
Kubernetes exec probes). Exit 0 when healthy, 1 when not.

  intentd-healthcheck server [HOST:PORT]
      grpc.health.v1.Health/Check on the control plane: SERVING. The port comes
      from INTENTD_LISTEN (default 7300), always asked on 127.0.0.1.
  intentd-healthcheck sidecar
      the sidecar accepts connections where its agents reach it
      (INTENTD_AGENT_LISTEN: unix:///path.sock or 127.0.0.1:PORT).
"""

from __future__ import annotations

import os
import socket
import sys

TIMEOUT_S = 2.0


def check_server(target: str | None) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if target is None:
        port = os.environ.get("INTENTD_LISTEN", "0.0.0.0:7300").rpartition(":")[2] or "7300"
        target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        print(f"intentd-healthcheck: {target}: {exc.code().name}", file=sys.stderr)
        return False
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"intentd-healthcheck: {target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
        return False
    return True


def check_sidecar(listen: str | None) -> bool:
    listen = listen or os.environ.get("INTENTD_AGENT_LISTEN", "unix:///var/run/intentd/agent.sock")
    if listen.startswith("unix:"):
        path = listen[len("unix://"):] if listen.startswith("unix://") else listen[len("unix:"):]
        family, address = socket.AF_UNIX, path
    else:
        host, _, port = listen.rpartition(":")
        family, address = socket.AF_INET, (host.strip("[]") or "127.0.0.1", int(port))
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT_S)
            sock.connect(address)
    except OSError as exc:
        print(f"intentd-healthcheck: sidecar at {listen}: {exc}", file=sys.stderr)
        return False
    return True


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("server", "sidecar"):
        print(__doc__, file=sys.stderr)
        return 2
    target = argv[1] if len(argv) > 1 else None
    ok = check_server(target) if argv[0] == "server" else check_sidecar(target)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
