"""The client library and CLIs under faults: every failure is an encinfer error with its
status and message (never a grpc type), bounded by the caller's deadline; a remembered
key id predicts through a key-store outage; a lost key is uploaded again and the next
call works; every CLI failure is one line on stderr and a non-zero exit code."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from encinfer.common import errors
from faults.conftest import ALICE, timed

pytestmark = pytest.mark.timeout(180)

# How long after a fault the client must have its answer (generous: 2 busy cores).
ERROR_BOUND = 15.0


def measured(what: str, seconds: float, detail: str = "") -> None:
    """For the record (pytest -s): how long the client waited."""
    print(f"\nmeasured: {what}: {seconds:.2f} s {detail}")


def images(n: int) -> np.ndarray:
    from encinfer import datasets
    return datasets.default_test_images(n)[0]


def slow(X: np.ndarray, pause: float):
    """The samples one by one with a pause: a stream that outlasts any fault injected in it."""
    for x in X:
        time.sleep(pause)
        yield x


def count_uploads(clf) -> list:
    calls = []
    real_put = clf._keystore.put

    def put(*args, **kwargs):
        calls.append(time.monotonic())
        return real_put(*args, **kwargs)
    clf._keystore.put = put
    return calls


def stream_until_fault(clf, X, fault, after: int = 3):
    """Streams X, injects fault() after `after` answers; (answers, error, seconds from fault to error)."""
    answered, faulted_at = [], None
    try:
        for i, _ in clf.predict_stream(slow(X, 0.05)):
            answered.append(i)
            if len(answered) == after:
                fault()
                faulted_at = time.monotonic()
    except Exception as e:  # noqa: BLE001 - the test asserts on what came back
        return answered, e, time.monotonic() - faulted_at if faulted_at else None
    return answered, None, None


# ---------------------------------------------------------------- the inference service goes away mid-stream

def test_inference_killed_mid_stream_is_an_encinfer_unavailable_not_a_grpc_error(topology, tmp_path):
    with topology.classifier(tmp_path / "keys", layout="latency") as clf:
        answered, error, seconds = stream_until_fault(
            clf, images(200), lambda: os.killpg(topology.inference.pid, signal.SIGKILL))
    assert isinstance(error, errors.EncinferError), repr(error)
    assert not isinstance(error, grpc.RpcError)
    measured("SIGKILL of inference -> client error", seconds, f"{error.code}: {error.message}")
    assert error.code == "UNAVAILABLE" and error.message, (error.code, error.message)
    assert seconds < ERROR_BOUND
    assert 3 <= len(answered) < 200


def test_inference_stopped_mid_stream_ends_the_stream_with_an_encinfer_error(topology, tmp_path):
    # SIGTERM: the server drains for its 5 s grace, then ends the stream this slow sender keeps open.
    with topology.classifier(tmp_path / "keys", layout="latency") as clf:
        answered, error, seconds = stream_until_fault(
            clf, images(1000), lambda: topology.inference.process.send_signal(signal.SIGTERM))
    assert isinstance(error, errors.EncinferError), repr(error)
    assert not isinstance(error, grpc.RpcError)
    measured("SIGTERM of inference -> client error", seconds, f"{error.code}: {error.message}")
    assert error.code in ("UNAVAILABLE", "CANCELLED") and error.message, (error.code, error.message)
    assert seconds < 5 + ERROR_BOUND
    assert len(answered) < 1000


# ---------------------------------------------------------------- deadlines

def test_model_info_honours_the_callers_timeout_against_a_frozen_inference_service(topology, tmp_path):
    os.killpg(topology.inference.pid, signal.SIGSTOP)
    with topology.classifier(tmp_path / "keys", timeout=2.0) as clf:
        error, seconds = timed(lambda: clf.info)
    measured("info(timeout=2) against frozen inference", seconds, repr(error))
    assert isinstance(error, errors.DeadlineExceeded), repr(error)
    assert not isinstance(error, grpc.RpcError)
    assert 1.5 < seconds < 2.0 + 5.0


def test_key_upload_honours_its_deadline_against_a_frozen_key_store(topology, tmp_path):
    from encinfer.client.keystore import KeyStoreClient

    with topology.classifier(tmp_path / "keys") as clf:
        secret, _ = clf.keys("batch")  # made and uploaded while the key store answers
        bundle = secret.public_bundle()
    topology.keystore_freeze()
    with KeyStoreClient(topology.keystore.address, token=ALICE, timeout=2.0, transfer_timeout=2.0) as ks:
        error, seconds = timed(ks.put, bundle)
        stat_error, stat_seconds = timed(ks.stat, "ab" * 32)
    assert isinstance(error, errors.DeadlineExceeded), repr(error)
    assert isinstance(stat_error, errors.DeadlineExceeded), repr(stat_error)
    measured("put/stat with 2 s deadlines against a frozen key store", max(seconds, stat_seconds))
    assert seconds < 2.0 + 5.0 and stat_seconds < 2.0 + 5.0


# ---------------------------------------------------------------- key-store outages

def warm(topology, key_dir) -> np.ndarray:
    """A first client uploads the key and predicts once, so inference caches it; returns its scores."""
    with topology.classifier(key_dir, layout="latency") as clf:
        return clf.decision_function(images(2))


def test_a_new_client_with_a_remembered_key_predicts_while_the_key_store_is_killed(topology, tmp_path):
    expected = warm(topology, tmp_path / "keys")
    topology.keystore_kill()
    with topology.classifier(tmp_path / "keys", layout="latency") as clf:
        scores, seconds = timed(clf.decision_function, images(2))
        one = clf.predict_one(images(1)[0])
    assert not isinstance(scores, Exception), repr(scores)
    np.testing.assert_allclose(scores, expected, atol=1e-3)
    np.testing.assert_allclose(one, expected[0], atol=1e-3)
    measured("new client predicts, key store killed", seconds)
    assert seconds < ERROR_BOUND


def test_a_new_client_with_a_remembered_key_predicts_while_the_key_store_is_frozen(topology, tmp_path):
    expected = warm(topology, tmp_path / "keys")
    topology.keystore_freeze()  # connections open, nothing answers: a check would wait for its deadline
    with topology.classifier(tmp_path / "keys", layout="latency") as clf:
        scores, seconds = timed(clf.decision_function, images(2))
    assert not isinstance(scores, Exception), repr(scores)
    np.testing.assert_allclose(scores, expected, atol=1e-3)
    measured("new client predicts, key store frozen", seconds)
    assert seconds < 10.0  # not the key store's 20 s deadline


def test_a_key_deleted_in_the_key_store_is_uploaded_again_and_the_next_predict_works(bare_topology, tmp_path):
    from encinfer.client.keystore import KeyStoreClient

    topology = bare_topology
    topology.start_keystore()
    topology.start_inference(ENCINFER_KEY_RECHECK_SECONDS="0")  # inference sees the deletion at once
    X = images(3)
    with topology.classifier(tmp_path / "keys", layout="latency") as clf:
        expected = clf.decision_function(X)
        key_id = clf.keys("latency")[1]
        with KeyStoreClient(topology.keystore.address, token=ALICE, timeout=20) as ks:
            assert ks.delete(key_id)
            uploads = count_uploads(clf)
            scores, seconds = timed(clf.decision_function, X)
            new_id = clf.keys("latency")[1]  # public keys made again from the secret: new bytes, new id
            assert ks.stat(new_id) is not None
    assert not isinstance(scores, Exception), repr(scores)
    np.testing.assert_allclose(scores, expected, atol=1e-3)
    measured("predict after the key was deleted (re-upload and retry)", seconds)
    assert len(uploads) == 1 and seconds < ERROR_BOUND
    with topology.classifier(tmp_path / "keys", layout="latency") as later:  # remembered, still good
        again = count_uploads(later)
        np.testing.assert_allclose(later.decision_function(X), expected, atol=1e-3)
    assert again == []


def tamper(topology, key_id: str) -> str:
    """Overwrites the key's bytes in MinIO through the S3 API (same length, one byte changed)."""
    import io

    from minio import Minio

    m = topology.minio
    s3 = Minio(endpoint=m.endpoint, access_key=m.access_key, secret_key=m.secret_key, secure=False)
    [name] = [o.object_name for o in s3.list_objects(topology.bucket, recursive=True)
              if o.object_name.endswith(f"keys/{key_id}")]
    reply = s3.get_object(topology.bucket, name)
    try:
        data = bytearray(reply.read())
    finally:
        reply.close()
        reply.release_conn()
    data[len(data) // 2] ^= 0xFF
    s3.put_object(topology.bucket, name, io.BytesIO(bytes(data)), len(data))
    return name


def test_a_key_altered_in_storage_is_uploaded_again_and_the_next_predict_works(topology, tmp_path):
    X = images(2)
    with topology.classifier(tmp_path / "keys", layout="latency") as first:
        _, key_id = first.keys("latency")  # uploaded, never used: inference has no copy to fall back on
    tamper(topology, key_id)
    with topology.classifier(tmp_path / "keys", layout="latency") as clf:  # remembers the altered key
        uploads = count_uploads(clf)
        scores, seconds = timed(clf.decision_function, X)
        assert not isinstance(scores, Exception), repr(scores)
        assert len(uploads) == 1 and clf.keys("latency")[1] != key_id
        np.testing.assert_allclose(clf.decision_function(X), scores, atol=1e-3)
    measured("predict after the key was altered in storage (DATA_LOSS, re-upload, retry)", seconds)
    assert seconds < ERROR_BOUND


# ---------------------------------------------------------------- the CLIs

def encinfer(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ENCINFER_")}
    return subprocess.run([sys.executable, "-m", "encinfer.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {})}, stdin=subprocess.DEVNULL)


def assert_one_error_line(result: subprocess.CompletedProcess, exit_code: int, starts: str) -> None:
    assert result.returncode == exit_code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(starts), result.stderr[-2000:]


def predict_argv(topology, tmp_path, npy) -> list[str]:
    return ["predict", "--npy", str(npy), "--inference", topology.inference.address,
            "--keystore", topology.keystore.address, "--token", ALICE, "--key-dir", str(tmp_path / "keys")]


def test_encinfer_predict_against_a_stopped_inference_service_prints_one_error_line(topology, tmp_path):
    np.save(tmp_path / "x.npy", images(3))
    topology.inference.stop()
    result, seconds = timed(encinfer, *predict_argv(topology, tmp_path, tmp_path / "x.npy"))
    measured("encinfer predict against a stopped inference service (process run)", seconds, result.stderr.strip())
    assert_one_error_line(result, 1, "error: UNAVAILABLE: ")
    assert result.stdout == ""


def test_encinfer_predict_refuses_out_of_range_inputs_with_one_line_and_exit_2(topology, tmp_path):
    np.save(tmp_path / "x.npy", images(3) * 255.0)  # floats, so not taken for uint8 pixels
    result = encinfer(*predict_argv(topology, tmp_path, tmp_path / "x.npy"))
    assert_one_error_line(result, 2, "error: sample 0, feature ")
    assert "divide them by 255" in result.stderr


def test_encinfer_keys_and_probe_against_a_killed_key_store_print_one_error_line(topology, tmp_path):
    topology.keystore_kill()
    for argv in (["ls"], ["stat", "ab" * 32], ["rm", "ab" * 32]):
        result = encinfer("keys", *argv, "--target", topology.keystore.address, "--token", ALICE)
        assert_one_error_line(result, 1, "error: UNAVAILABLE: ")
    result = encinfer("probe", topology.keystore.address)
    assert_one_error_line(result, 1, f"error: UNAVAILABLE: {topology.keystore.address}: ")


def test_encinfer_predict_with_a_remembered_key_works_while_the_key_store_is_killed(topology, tmp_path):
    X = images(3)
    warm(topology, tmp_path / "keys")
    np.save(tmp_path / "x.npy", X)
    topology.keystore_kill()
    result = encinfer(*predict_argv(topology, tmp_path, tmp_path / "x.npy"))
    assert result.returncode == 0, result.stderr[-2000:]
    with topology.classifier(tmp_path / "keys", layout="latency") as clf:
        expected = [str(c) for c in clf.predict(X)]
    assert result.stdout.split() == expected
