"""grpcio's ring_hash_experimental with requestHashHeader (gRFC A76) over three backends; prints JSON.

Run by tests/scale/test_ring_hash.py in a fresh interpreter (grpc reads its experimental
switches from the environment of the process). Each backend answers with its name.
"""
from __future__ import annotations

import json
import time
from concurrent import futures

import grpc

from encinfer.common.routing import KEY_ID_HEADER, client_options

N_KEYS = 24


def backend(name: str) -> tuple[grpc.Server, int]:
    def answer(request: bytes, context) -> bytes:
        return name.encode()

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            return grpc.unary_unary_rpc_method_handler(answer)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[Handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def owners(call, rounds: int = 3) -> dict[str, list[str]]:
    return {f"{i:064x}": sorted({call(b"", metadata=[(KEY_ID_HEADER, f"{i:064x}")], timeout=10,
                                      wait_for_ready=True).decode() for _ in range(rounds)})
            for i in range(N_KEYS)}


def main() -> dict:
    servers = [backend(f"b{i}") for i in range(3)]
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for _, port in servers)
    out: dict = {}
    with grpc.insecure_channel(target, options=client_options("ring_hash")) as channel:
        call = channel.unary_unary("/encinfer.v1.Inference/Predict")
        try:
            t0 = time.monotonic()
            out["before"] = owners(call)
            out["first_calls_s"] = round(time.monotonic() - t0, 3)
            out["no_header"] = call(b"", timeout=10, wait_for_ready=True).decode()
            victim = out["before"][f"{0:064x}"][0]
            servers[int(victim[1:])][0].stop(None)
            out["victim"] = victim
            out["after"] = owners(call)
        except grpc.RpcError as e:
            out["error"] = f"{e.code().name}: {e.details()}"
    for server, _ in servers:
        server.stop(None)
    return out


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
