"""grpcio's ring_hash_experimental with requestHashHeader (gRFC A76) over three backends; prints JSON.

Run by tests/scale/test_ring_hash.py in a fresh interpreter (grpc reads its experimental
switches from the environment of the process). Each backend answers with its name.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import grpc

from encinfer.common.routing import KEY_ID_HEADER, client_options

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for its helpers
from raw_grpc import named_server

N_KEYS = 24


def owners(call, rounds: int = 3) -> dict[str, list[str]]:
    return {f"{i:064x}": sorted({call(b"", metadata=[(KEY_ID_HEADER, f"{i:064x}")], timeout=10,
                                      wait_for_ready=True).decode() for _ in range(rounds)})
            for i in range(N_KEYS)}


def main() -> dict:
    servers = [named_server(f"b{i}") for i in range(3)]
    target = "ipv4:" + ",".join(address for _, address in servers)
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
