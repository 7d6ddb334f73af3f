"""Prometheus metrics of both services, scraped over HTTP on loopback from real processes
(ENCINFER_METRICS_PORT): RPCs by method and code, latency histograms, the key caches of
the server and of each worker process, key-store bytes in and out, backend errors."""
from __future__ import annotations

import re

import grpc
import pytest

pytest.register_assert_rewrite("inference_fixtures")
from conftest import free_port, wait_until
from inference_fixtures import ALICE, CALL_TIMEOUT, MODEL, SERVICE, TOKEN_SPEC
from service_procs import ServiceProcs, metric_samples, metric_value

from encinfer.common.auth import auth_metadata
from encinfer.he.latency import encrypt_latency
from encinfer.v1 import inference_pb2 as pb
from encinfer.v1 import inference_pb2_grpc

pytest_plugins = ["inference_fixtures"]

PREDICT = "/encinfer.v1.Inference/Predict"
N_PREDICT = 3


@pytest.fixture(scope="module")
def services(mnist_model, tmp_path_factory):
    """Key store + inference (2 workers), each with a metrics port, after some traffic."""
    stem, _ = mnist_model
    procs = ServiceProcs(tmp_path_factory.mktemp("metrics"))
    try:
        ks = procs.keystore({"ENCINFER_TOKENS": TOKEN_SPEC, "ENCINFER_METRICS_PORT": str(free_port())})
        inf = procs.inference(stem, ks.address, {
            "ENCINFER_TOKENS": TOKEN_SPEC, "ENCINFER_KEYSTORE_TOKEN": SERVICE, "ENCINFER_WORKERS": "2",
            "ENCINFER_METRICS_PORT": str(free_port())})
        yield ks, inf, traffic(inf.address, ks.address, procs.workdir)
    finally:
        procs.stop_all()


def traffic(inference: str, keystore: str, workdir) -> dict:
    """N_PREDICT good Predicts, one with an unknown key id, one stream with a good and a bad item."""
    from encinfer import datasets
    from encinfer.client.classifier import EncryptedClassifier

    X = datasets.default_test_images()[0][:N_PREDICT]
    with EncryptedClassifier(inference=inference, keystore=keystore, model=MODEL, token=ALICE, layout="latency",
                             key_dir=workdir / "keys", timeout=CALL_TIMEOUT) as clf:
        for x in X:
            clf.predict_one(x)
        secret, key_id = clf.keys("latency")
        ct = encrypt_latency(secret, X[0], clf.layout_info("latency"))
    meta = auth_metadata(ALICE)
    with grpc.insecure_channel(inference) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        with pytest.raises(grpc.RpcError):
            stub.Predict(pb.PredictRequest(model=MODEL, key_id="0" * 64, ciphertext=ct), metadata=meta,
                         timeout=CALL_TIMEOUT)
        stream = [pb.PredictStreamRequest(header=pb.StreamHeader(model=MODEL, key_id=key_id, layout=pb.LAYOUT_LATENCY)),
                  pb.PredictStreamRequest(item=pb.PredictRequest(request_id="good", ciphertext=ct)),
                  pb.PredictStreamRequest(item=pb.PredictRequest(request_id="bad", ciphertext=b"junk"))]
        answers = list(stub.PredictStream(iter(stream), metadata=meta, timeout=CALL_TIMEOUT))
    return {"key_id": key_id, "answers": {a.request_id: a.status.code for a in answers}}


def test_inference_counts_rpcs_by_method_and_status_code(services):
    _, inf, _ = services
    text = inf.metrics()
    assert metric_value(text, f'encinfer_rpcs_total{{code="OK",method="{PREDICT}"}}') == N_PREDICT + 0.0
    assert metric_value(text, f'encinfer_rpcs_total{{code="NOT_FOUND",method="{PREDICT}"}}') == 1.0


def test_inference_has_a_latency_histogram_per_method(services):
    _, inf, _ = services
    text = inf.metrics()
    assert metric_value(text, f'encinfer_rpc_seconds_count{{method="{PREDICT}"}}') == N_PREDICT + 1.0
    assert metric_value(text, f'encinfer_rpc_seconds_bucket{{le="+Inf",method="{PREDICT}"}}') == N_PREDICT + 1.0


def test_stream_answers_are_counted_by_their_own_status(services):
    _, inf, seen = services
    assert seen["answers"] == {"good": 0, "bad": grpc.StatusCode.INVALID_ARGUMENT.value[0]}
    text = inf.metrics()
    assert metric_value(text, 'encinfer_stream_answers_total{code="OK"}') == 1.0
    assert metric_value(text, 'encinfer_stream_answers_total{code="INVALID_ARGUMENT"}') == 1.0


def test_worker_key_caches_are_exported_by_the_server(services):
    _, inf, _ = services
    events = metric_samples(inf.metrics(), "encinfer_key_cache_events_total")
    worker = {k: v for k, v in events.items() if re.search(r'cache="worker-\d+-\d+"', k)}
    # A worker's first computation misses (and gets the key bytes); later ones hit.
    assert sum(v for k, v in worker.items() if 'event="miss"' in k) >= 1, events
    assert sum(v for k, v in worker.items() if 'event="hit"' in k) >= 1, events


def test_worker_key_cache_bytes_are_exported(services):
    _, inf, _ = services
    sizes = metric_samples(inf.metrics(), "encinfer_key_cache_bytes")
    assert any("worker-" in k and v > 0 for k, v in sizes.items()), sizes


def test_server_key_bytes_cache_holds_the_fetched_key(services):
    _, inf, _ = services
    text = inf.metrics()
    assert metric_value(text, 'encinfer_key_cache_bytes{cache="server-bytes"}') > 0
    assert metric_value(text, 'encinfer_key_cache_events_total{cache="server-bytes",event="miss"}') >= 1


def test_inference_counts_its_calls_to_the_key_store(services):
    _, inf, _ = services
    text = inf.metrics()
    # A first request reads the record and the bytes with one GetKeys; StatKeys only re-checks
    # a cached key's record (every 60 s by default, later than this test).
    assert metric_value(text, 'encinfer_client_rpcs_total{code="OK",method="/encinfer.v1.KeyStore/GetKeys"}') >= 1
    assert metric_value(text, 'encinfer_client_rpcs_total{code="OK",method="/encinfer.v1.KeyStore/StatKeys"}') is None


def test_key_store_counts_key_bytes_in_and_out(services):
    ks, _, seen = services
    text = ks.metrics()
    size = metric_value(text, 'encinfer_keystore_bytes_total{direction="in"}')
    assert size and size > 100_000  # one real latency key bundle
    # The inference service fetched it once (its byte cache serves both workers).
    assert metric_value(text, 'encinfer_keystore_bytes_total{direction="out"}') == size


def test_key_store_counts_rpcs_by_method_and_code(services):
    ks, _, _ = services
    text = ks.metrics()
    assert metric_value(text, 'encinfer_rpcs_total{code="OK",method="/encinfer.v1.KeyStore/PutKeys"}') == 1.0
    assert metric_value(text, 'encinfer_rpcs_total{code="OK",method="/encinfer.v1.KeyStore/GetKeys"}') == 1.0


def test_unreachable_key_store_counts_as_a_failed_key_store_call(mnist_model, tmp_path):
    stem, _ = mnist_model
    procs = ServiceProcs(tmp_path)
    try:
        inf = procs.inference(stem, f"127.0.0.1:{free_port()}", {
            "ENCINFER_WORKERS": "0", "ENCINFER_KEYSTORE_TIMEOUT": "2", "ENCINFER_METRICS_PORT": str(free_port())})
        with grpc.insecure_channel(inf.address) as ch, pytest.raises(grpc.RpcError) as err:
            inference_pb2_grpc.InferenceStub(ch).Predict(
                pb.PredictRequest(model=MODEL, key_id="a" * 64, ciphertext=b"x"), timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        sample = 'encinfer_client_rpcs_total{code="UNAVAILABLE",method="/encinfer.v1.KeyStore/GetKeys"}'
        assert wait_until(lambda: metric_value(inf.metrics(), sample) == 1.0, timeout=10)
    finally:
        procs.stop_all()


def test_storage_failures_count_as_key_store_backend_errors(tmp_path):
    # An S3 endpoint where nothing listens: MinIO is down.
    procs = ServiceProcs(tmp_path)
    try:
        ks = procs.keystore({"ENCINFER_KEYSTORE_BACKEND": "s3", "ENCINFER_S3_ENDPOINT": f"127.0.0.1:{free_port()}",
                             "ENCINFER_S3_ACCESS_KEY": "nobody", "ENCINFER_S3_SECRET_KEY": "nobody-secret",
                             "ENCINFER_KEYSTORE_BACKEND_TIMEOUT": "1", "ENCINFER_KEYSTORE_HEALTH_INTERVAL": "0.2",
                             "ENCINFER_METRICS_PORT": str(free_port())})

        def counted() -> bool:
            errors = metric_samples(ks.metrics(), "encinfer_keystore_backend_errors_total")
            return any('code="UNAVAILABLE"' in k and v >= 1 for k, v in errors.items())
        assert wait_until(counted, timeout=15)
        assert metric_value(ks.metrics(), "encinfer_keystore_backend_up") == 0.0
    finally:
        procs.stop_all()


def test_metrics_are_prometheus_text(services):
    from prometheus_client.parser import text_string_to_metric_families

    _, inf, _ = services
    names = {f.name for f in text_string_to_metric_families(inf.metrics())}
    assert {"encinfer_rpcs", "encinfer_rpc_seconds", "encinfer_key_cache_events", "encinfer_key_cache_bytes",
            "encinfer_stream_answers", "encinfer_client_rpcs"} <= names
