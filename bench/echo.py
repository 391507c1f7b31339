"""A tiny grpc.aio service for the physical-limits baseline, run as its own
process (``python -m bench.echo PORT``) on uvloop like the intentd server.

It has no generated code: generic handlers carry ``intentd.v1.Ping``.
``/bench.Echo/Unary`` answers a Ping with a Pong of the same nonce;
``/bench.Echo/Stream`` answers one Ping with an endless stream of Pings until
the client cancels.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from intentd.generated.v1 import agent_service_pb2 as pb

SERVICE = "bench.Echo"


async def _unary(request: pb.Ping, context: Any) -> pb.Pong:
    return pb.Pong(nonce=request.nonce)


async def _stream(request: pb.Ping, context: Any) -> AsyncIterator[pb.Ping]:
    message = pb.Ping(nonce=request.nonce)
    while True:
        yield message


async def serve(port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(
            _unary, request_deserializer=pb.Ping.FromString, response_serializer=pb.Pong.SerializeToString),
        "Stream": grpc.unary_stream_rpc_method_handler(
            _stream, request_deserializer=pb.Ping.FromString, response_serializer=pb.Ping.SerializeToString),
    }),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("echo serving", flush=True)
    await server.wait_for_termination()


def main() -> None:
    import uvloop

    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
