"""Stand-in gRPC backends for the proxy, routing and retry tests: a real grpcio server on a
free loopback port whose every unary method runs one function on the raw request bytes
(no protobuf), so a test sees which backend answered and how often it was asked."""
from __future__ import annotations

from collections.abc import Callable
from concurrent import futures

import grpc


def generic_server(handler_for: Callable[[str], grpc.RpcMethodHandler]) -> tuple[grpc.Server, str]:
    """A started server serving method M with `handler_for(M)`; (server, address)."""
    class Handler(grpc.GenericRpcHandler):
        def service(self, handler_call_details):
            return handler_for(handler_call_details.method)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[Handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def raw_server(answer: Callable[[bytes, grpc.ServicerContext], bytes]) -> tuple[grpc.Server, str]:
    """A started server answering every unary method with `answer(request, context)`."""
    return generic_server(lambda method: grpc.unary_unary_rpc_method_handler(answer))


def named_server(name: str) -> tuple[grpc.Server, str]:
    """A started server whose every unary method answers with its own name."""
    return raw_server(lambda request, context: name.encode())
