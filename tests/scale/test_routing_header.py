"""The client library puts the key id in `x-encinfer-key-id` on every call that carries one.

A recording gRPC server (it answers every call with an empty message) stands for the key
store: what matters here is the metadata each call arrives with. The inference calls
(Predict, PredictStream) are checked end to end by test_replicas.py's affinity tests.
"""
from __future__ import annotations

import json

import grpc
import pytest
from raw_grpc import generic_server, raw_server

from encinfer.client.keystore import KeyStoreClient
from encinfer.common import errors
from encinfer.common.routing import KEY_ID_HEADER, RETRIED_METHODS, client_options, key_id_metadata, service_config

KID = "ab" * 32


@pytest.fixture
def recorder():
    seen: dict[str, dict[str, str]] = {}

    def handlers(method: str):
        def unary(request: bytes, context) -> bytes:
            seen[method] = dict(context.invocation_metadata())
            return b""

        def streaming_in(requests, context) -> bytes:
            for _ in requests:
                pass
            return unary(b"", context)

        def streaming_out(request: bytes, context):
            unary(request, context)
            return iter(())

        if method.endswith("/PutKeys"):
            return grpc.stream_unary_rpc_method_handler(streaming_in)
        if method.endswith("/GetKeys"):
            return grpc.unary_stream_rpc_method_handler(streaming_out)
        return grpc.unary_unary_rpc_method_handler(unary)

    server, address = generic_server(handlers)
    yield address, seen
    server.stop(None)


def test_key_store_calls_with_a_key_id_carry_it_as_metadata(recorder):
    address, seen = recorder
    with KeyStoreClient(address, token="t", timeout=10, transfer_timeout=10) as ks:
        ks.stat(KID)
        ks.delete(KID)
        with pytest.raises(errors.DataLoss):  # the recorder sends no record
            ks.get(KID)
    for method in ("StatKeys", "DeleteKeys", "GetKeys"):
        assert seen[f"/encinfer.v1.KeyStore/{method}"].get(KEY_ID_HEADER) == KID, method


def test_an_upload_carries_no_key_id(recorder):
    address, seen = recorder
    with KeyStoreClient(address, token="t", timeout=10, transfer_timeout=10) as ks:
        with pytest.raises(errors.DataLoss):  # the recorder's empty answer has another key id
            ks.put(b"key bytes")
    assert KEY_ID_HEADER not in seen["/encinfer.v1.KeyStore/PutKeys"]


def test_the_retry_policy_covers_exactly_the_idempotent_calls():
    names = {(n["service"], n["method"]) for n in service_config()["methodConfig"][0]["name"]}
    assert names == set(RETRIED_METHODS)
    assert {m for _, m in names} == {"Predict", "GetModelInfo", "ListModels", "StatKeys", "GetKeys", "ListKeys"}
    policy = service_config()["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"] and policy["maxAttempts"] == 4
    assert service_config()["retryThrottling"]["maxTokens"] >= 20  # a replica's death must not exhaust it


def test_client_channels_carry_the_service_config():
    options = dict(client_options())
    assert json.loads(options["grpc.service_config"]) == service_config()
    ring = json.loads(dict(client_options("ring_hash"))["grpc.service_config"])
    assert ring["loadBalancingConfig"] == [{"ring_hash_experimental": {"requestHashHeader": KEY_ID_HEADER}}]


@pytest.mark.parametrize("bad", ["", "   ", "a\nb", "clé", "x" * 129])
def test_a_key_id_that_cannot_be_metadata_is_sent_without_the_header(bad):
    assert key_id_metadata(bad) == []


def test_the_header_carries_the_key_id_as_the_server_reads_it():
    assert key_id_metadata(" AB" + "0" * 62 + " ") == [(KEY_ID_HEADER, "ab" + "0" * 62)]


def test_an_unknown_routing_is_refused():
    with pytest.raises(ValueError, match="ring_hash"):
        client_options("round_robin")


@pytest.fixture
def flaky():
    """A server whose every method fails UNAVAILABLE twice, then answers; counts the attempts."""
    attempts: dict[str, int] = {}

    def answer(request: bytes, context) -> bytes:
        method = dict(context.invocation_metadata()).get("x-method", "?")
        attempts[method] = attempts.get(method, 0) + 1
        if attempts[method] <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return b"ok"

    server, address = raw_server(answer)
    yield address, attempts
    server.stop(None)


@pytest.mark.parametrize("method, retried", [("/encinfer.v1.Inference/Predict", True),
                                             ("/encinfer.v1.KeyStore/StatKeys", True),
                                             ("/encinfer.v1.KeyStore/DeleteKeys", False)])
def test_grpc_retries_the_idempotent_calls_on_unavailable_and_no_other(flaky, method, retried):
    address, attempts = flaky
    with grpc.insecure_channel(address, options=client_options()) as ch:
        call = ch.unary_unary(method)
        if retried:
            assert call(b"", metadata=[("x-method", method)], timeout=10) == b"ok"
            assert attempts[method] == 3
        else:
            with pytest.raises(grpc.RpcError) as err:
                call(b"", metadata=[("x-method", method)], timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and attempts[method] == 1
