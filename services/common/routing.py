"""Routing by key id, and the client's retry policy, as gRPC metadata and service config.

Inference replicas keep the keys they deserialized; a proxy (Envoy ring_hash, nginx or
HAProxy consistent hash) or grpcio's own ring_hash policy keeps each key id on one
replica by hashing the `x-encinfer-key-id` metadata that every call carrying a key id
sends. Calls without one (GetModelInfo, ListModels, PutKeys) may go anywhere.

The retry policy makes a replica dying mid-load cost no failed call: the idempotent
calls are retried on UNAVAILABLE (a refused connection, a proxy's 502/503, a replica
gone mid-call), at most 4 attempts within about 2 s.

    channel(target, options=client_options())                    # retries
    channel("ipv4:10.0.0.1:50052,10.0.0.2:50052", options=client_options("ring_hash"))
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

KEY_ID_HEADER = "x-encinfer-key-id"
# grpcio 1.85 ignores requestHashHeader without it (every call: "hash attribute not present").
RING_HASH_ENV = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"
ROUTINGS = ("default", "ring_hash")

# Idempotent calls: the same answer (or the same effect) however often they run.
RETRIED_METHODS = (("encinfer.v1.Inference", "Predict"), ("encinfer.v1.Inference", "GetModelInfo"),
                   ("encinfer.v1.Inference", "ListModels"), ("encinfer.v1.KeyStore", "StatKeys"),
                   ("encinfer.v1.KeyStore", "GetKeys"), ("encinfer.v1.KeyStore", "ListKeys"))
RETRY_POLICY = {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}
# When a dependency is down for long (every call UNAVAILABLE), retries only multiply the
# wait: each failure costs a token, each success gives back 0.1, and below half of
# maxTokens a channel stops retrying -- after about 50 failures in a row, errors come at
# the first attempt again. A replica dying mid-load costs a handful of failures.
RETRY_THROTTLING = {"maxTokens": 100, "tokenRatio": 0.1}


# A key id is 64 hex digits; anything that could not be a metadata value (or is absurdly
# long) is sent without the header, so the server, not gRPC's metadata check, refuses it.
_ROUTABLE = re.compile(r"[\x21-\x7e]{1,128}")


def key_id_metadata(key_id: str | None) -> list[tuple[str, str]]:
    """The routing metadata for a call about key_id (none for an empty or malformed one)."""
    kid = (key_id or "").strip().lower()
    return [(KEY_ID_HEADER, kid)] if _ROUTABLE.fullmatch(kid) else []


def service_config(routing: str = "default") -> dict[str, Any]:
    """The client's gRPC service config: the retry policy, and ring_hash on the key id if asked."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, not {routing!r}")
    config: dict[str, Any] = {"methodConfig": [{
        "name": [{"service": s, "method": m} for s, m in RETRIED_METHODS], "retryPolicy": RETRY_POLICY}],
        "retryThrottling": RETRY_THROTTLING}
    if routing == "ring_hash":
        config["loadBalancingConfig"] = [{"ring_hash_experimental": {"requestHashHeader": KEY_ID_HEADER}}]
    return config


def client_options(routing: str = "default") -> list[tuple[str, Any]]:
    """Channel options for client channels: the service config (retries; ring_hash if asked).

    ring_hash needs RING_HASH_ENV=true in grpcio 1.85; it is set here, before the channel
    exists, unless the environment says otherwise (grpc reads it when it first needs it).
    """
    if routing == "ring_hash":
        os.environ.setdefault(RING_HASH_ENV, "true")
    return [("grpc.service_config", json.dumps(service_config(routing))), ("grpc.enable_retries", 1)]
