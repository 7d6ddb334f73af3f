"""The key store as a real process: storage going away and coming back, shutdown on SIGTERM.

These tests take MinIO away, so they run their own MinIO (not the session's).
"""
from __future__ import annotations

import shutil
import signal
import sys
import threading
from pathlib import Path

import grpc
import pytest
from conftest import MINIO_BIN, MinioServer, fake_key, unique_bucket, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encinfer.client.keystore import KeyStoreClient
from encinfer.common import errors
from encinfer.common.auth import auth_metadata
from encinfer.v1 import keystore_pb2 as pb
from encinfer.v1 import keystore_pb2_grpc as pb_grpc

MIB = 1024 * 1024
FAST = {"ENCINFER_KEYSTORE_BACKEND_TIMEOUT": "1", "ENCINFER_KEYSTORE_HEALTH_INTERVAL": "0.2",
        "ENCINFER_TOKENS": "alice-t=alice:tenant", "ENCINFER_LOG_LEVEL": "INFO"}


@pytest.fixture(scope="module")
def own_minio(tmp_path_factory, minio_server):  # minio_server: skip cleanly when the binary is missing
    root = tmp_path_factory.mktemp("own-minio")
    (root / "data").mkdir()
    server = MinioServer(binary=MINIO_BIN, data_dir=root / "data")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def minio(own_minio):
    own_minio.start()  # whatever the previous test left
    yield own_minio
    own_minio.start()


def health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="encinfer.v1.KeyStore"), timeout=2).status
        except grpc.RpcError:
            return -1


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.minio
def test_minio_stopped_gives_unavailable_and_not_serving_then_recovers_without_restart(minio, keystore_process):
    ks = keystore_process({**minio.env(unique_bucket()), **FAST}, fake_parser=True)
    with KeyStoreClient(ks.target, token="alice-t", timeout=10, transfer_timeout=20) as alice:
        data = fake_key(2 * MIB)
        record = alice.put(data)
        assert health(ks.target) == SERVING

        minio.stop()
        # The client's deadline is 10 s: UNAVAILABLE (not DEADLINE_EXCEEDED) means the
        # key store gave up within its own 1 s backend deadline.
        with pytest.raises(errors.Unavailable):
            alice.stat(record.key_id)
        with pytest.raises(errors.Unavailable):
            alice.get(record.key_id)
        with pytest.raises(errors.Unavailable):
            alice.put(fake_key())
        assert wait_until(lambda: health(ks.target) == NOT_SERVING)

        minio.start()
        assert wait_until(lambda: health(ks.target) == SERVING)
        assert alice.get(record.key_id) == data
        assert alice.put(fake_key()).size_bytes == 4096
    assert ks.process.poll() is None  # the same process throughout


@pytest.mark.minio
def test_a_hung_minio_gives_unavailable_within_the_backend_deadline(minio, keystore_process):
    ks = keystore_process({**minio.env(unique_bucket()), **FAST}, fake_parser=True)
    with KeyStoreClient(ks.target, token="alice-t", timeout=15, transfer_timeout=15) as alice:
        record = alice.put(fake_key(MIB))
        minio.pause()  # accepts connections, answers nothing
        try:
            with pytest.raises(errors.Unavailable):
                alice.stat(record.key_id)
            with pytest.raises(errors.Unavailable):
                alice.get(record.key_id)
            assert wait_until(lambda: health(ks.target) == NOT_SERVING)
        finally:
            minio.resume()
        assert wait_until(lambda: health(ks.target) == SERVING)
        assert alice.stat(record.key_id) is not None


@pytest.mark.minio
def test_key_store_started_before_minio_serves_once_minio_is_up(minio, keystore_process):
    minio.stop()
    ks = keystore_process({**minio.env(unique_bucket()), **FAST}, fake_parser=True)
    assert health(ks.target) == NOT_SERVING
    minio.start()
    assert wait_until(lambda: health(ks.target) == SERVING)  # it created its bucket on the way
    with KeyStoreClient(ks.target, token="alice-t") as alice:
        assert alice.put(fake_key()).owner == "alice"


def test_serve_logs_its_bound_address_as_one_json_line(keystore_process):
    ks = keystore_process(FAST, fake_parser=True)
    [line] = [e for e in ks.log_lines() if e.get("message") == "key store listening"]
    assert line["address"] == ks.target and line["backend"] == "fs" and line["severity"] == "INFO"


def test_sigterm_lets_an_in_flight_upload_finish_then_exits_cleanly(keystore_process):
    ks = keystore_process({**FAST, "ENCINFER_KEYSTORE_SHUTDOWN_GRACE": "20"}, fake_parser=True)
    release, data = threading.Event(), fake_key(2 * MIB)

    def requests():
        yield pb.PutKeysRequest(header=pb.PutKeysHeader(expected_size=len(data)))
        yield pb.PutKeysRequest(chunk=data[:MIB])
        release.wait(30)
        yield pb.PutKeysRequest(chunk=data[MIB:])

    with grpc.insecure_channel(ks.target) as ch:
        future = pb_grpc.KeyStoreStub(ch).PutKeys.future(requests(), metadata=auth_metadata("alice-t"))
        assert wait_until(lambda: any(p.name.startswith("put-") for p in
                                      (ks.log_path.parent / "ksp0" / "tmp").glob("*")))
        ks.process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: any(e.get("message") == "shutting down" for e in ks.log_lines()))
        release.set()
        assert future.result(timeout=20).size_bytes == len(data)
    assert ks.process.wait(timeout=20) == 0
    assert any(e.get("message") == "key store stopped" for e in ks.log_lines())


def test_encinfer_keystore_serve_runs_the_service(keystore_process):
    script = Path(sys.executable).parent / "encinfer"
    command = [str(script), "keystore", "serve"] if script.exists() else \
        [sys.executable, "-m", "encinfer.cli", "keystore", "serve"]
    ks = keystore_process(FAST, command=command)
    assert health(ks.target) == SERVING
    assert ks.stop() == 0


def test_metrics_are_served_on_loopback_when_asked(keystore_process):
    import urllib.request

    from conftest import free_port
    port = free_port()
    ks = keystore_process({**FAST, "ENCINFER_METRICS_PORT": str(port)}, fake_parser=True)
    with KeyStoreClient(ks.target, token="alice-t") as alice:
        alice.put(fake_key())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'encinfer_rpcs_total{code="OK",method="/encinfer.v1.KeyStore/PutKeys"} 1.0' in text
    assert 'encinfer_keystore_bytes_total{direction="in"} 4096.0' in text


def test_a_started_key_store_warms_its_parser_without_an_error(keystore_process):
    ks = keystore_process({})
    with KeyStoreClient(ks.target) as client:  # a call answered: the service is up
        assert list(client.list()) == []
    assert wait_until(lambda: any(e.get("message") == "key store listening" for e in ks.log_lines()), timeout=30)
    import time
    time.sleep(3.0)  # the parser process starts and imports TenSEAL in the background
    errors_logged = [e for e in ks.log_lines() if e.get("severity") in ("ERROR", "CRITICAL")]
    assert errors_logged == []
