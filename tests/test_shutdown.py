"""Graceful shutdown of both services as real processes: on SIGTERM health turns
NOT_SERVING first, new calls are refused, calls in flight finish within the grace
period (ENCINFER_GRACE_SECONDS; the key store's ENCINFER_KEYSTORE_SHUTDOWN_GRACE),
then the process exits 0."""
from __future__ import annotations

import os
import queue
import signal
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytest.register_assert_rewrite("inference_fixtures")
from conftest import wait_until
from inference_fixtures import ALICE, CALL_TIMEOUT, MODEL, SERVICE, TOKEN_SPEC
from service_procs import ServiceProcs

from encinfer.common.auth import auth_metadata
from encinfer.v1 import inference_pb2 as pb
from encinfer.v1 import inference_pb2_grpc

pytest_plugins = ["inference_fixtures"]

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
EXIT_WITHIN = 30.0  # seconds: bounded waits, never timing assertions
FIRST, LATER = 3, 3  # items sent before SIGTERM, and after it on the same stream


@pytest.fixture
def procs(tmp_path):
    started = ServiceProcs(tmp_path)
    yield started
    started.stop_all()


def start_pair(procs: ServiceProcs, model_stem, grace: str):
    ks = procs.keystore({"ENCINFER_TOKENS": TOKEN_SPEC})
    inf = procs.inference(model_stem, ks.address, {"ENCINFER_TOKENS": TOKEN_SPEC, "ENCINFER_KEYSTORE_TOKEN": SERVICE,
                                                   "ENCINFER_WORKERS": "1", "ENCINFER_GRACE_SECONDS": grace})
    return ks, inf


def client_keys(inference: str, keystore: str, key_dir):
    from encinfer.client.classifier import EncryptedClassifier
    with EncryptedClassifier(inference=inference, keystore=keystore, model=MODEL, token=ALICE, key_dir=key_dir,
                             timeout=CALL_TIMEOUT) as clf:
        secret, key_id = clf.keys("latency")
        return secret, key_id, clf.layout_info("latency")


class HeldStream:
    """A PredictStream that sends FIRST items, waits for release(), sends LATER items, then closes."""

    def __init__(self, target: str, key_id: str, ciphertexts: list[bytes], timeout: float = 60.0) -> None:
        self.channel = grpc.insecure_channel(target)
        self._go = threading.Event()
        self.answers: queue.Queue = queue.Queue()

        def requests():
            yield pb.PredictStreamRequest(header=pb.StreamHeader(model=MODEL, key_id=key_id, layout=pb.LAYOUT_LATENCY))
            for i, ct in enumerate(ciphertexts):
                if i == FIRST and not self._go.wait(timeout):
                    return
                yield pb.PredictStreamRequest(item=pb.PredictRequest(request_id=str(i), ciphertext=ct))

        self.call = inference_pb2_grpc.InferenceStub(self.channel).PredictStream(
            requests(), metadata=auth_metadata(ALICE), timeout=timeout)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for answer in self.call:
                self.answers.put(answer)
            self.answers.put(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            self.answers.put(e.code())

    def take(self, n: int) -> list:
        return [self.answers.get(timeout=EXIT_WITHIN) for _ in range(n)]

    def release(self) -> None:
        self._go.set()

    def close(self) -> None:
        self._go.set()
        self.channel.close()


def watch(target: str):
    """A Health/Watch stream and its first status."""
    channel = grpc.insecure_channel(target)
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
    return channel, stream, next(stream).status


def refuses_new_calls(target: str) -> bool:
    with grpc.insecure_channel(target) as ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.UNAVAILABLE
    return False


def encrypted_images(secret, layout, n: int) -> tuple[np.ndarray, list[bytes]]:
    from encinfer import datasets
    from encinfer.he.latency import encrypt_latency
    X = datasets.default_test_images(n)[0]
    return X, [encrypt_latency(secret, x, layout) for x in X]


def send(process, how: str) -> None:
    """SIGTERM to the server (docker stop, the stack), or to its whole process group (a
    terminal's Ctrl-C, systemd's control-group kill): workers included."""
    sig = signal.SIGINT if how == "ctrl-c-to-group" else signal.SIGTERM
    if how.endswith("to-group"):
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)


@pytest.mark.parametrize("how", ["sigterm", "sigterm-to-group", "ctrl-c-to-group"])
def test_inference_sigterm_finishes_the_stream_in_flight_then_exits_0(procs, mnist_model, tmp_path, how):
    from encinfer.he.latency import decrypt_latency

    stem, model = mnist_model
    ks, inf = start_pair(procs, stem, grace="20")
    secret, key_id, layout = client_keys(inf.address, ks.address, tmp_path / "keys")
    X, cts = encrypted_images(secret, layout, FIRST + LATER)
    health_channel, health, status = watch(inf.address)
    stream = HeldStream(inf.address, key_id, cts)
    try:
        assert status == SERVING
        before = stream.take(FIRST)  # the stream is open and working
        send(inf.process, how)
        assert next(health).status == NOT_SERVING  # first, while the stream is still open
        health.cancel()  # a watcher that stays would hold the shutdown for the whole grace period
        assert wait_until(lambda: refuses_new_calls(inf.address), timeout=EXIT_WITHIN)
        assert inf.process.poll() is None  # still draining
        stream.release()  # more work on the open stream, after SIGTERM
        after = stream.take(LATER + 1)
    finally:
        stream.close()
        health_channel.close()
    assert after[-1] == grpc.StatusCode.OK
    answers = {a.request_id: a for a in before + after[:-1]}
    assert all(a.status.code == 0 for a in answers.values()), [a.status for a in answers.values()]
    assert sorted(answers) == [str(i) for i in range(FIRST + LATER)]
    scores = np.array([decrypt_latency(secret, answers[str(i)].ciphertexts[0], layout) for i in range(len(X))])
    np.testing.assert_array_equal(scores.argmax(axis=1), model.scores(X).argmax(axis=1))
    assert inf.process.wait(timeout=EXIT_WITHIN) == 0
    assert inf.logged("inference stopping")


def test_inference_sigterm_cancels_a_call_that_outlasts_the_grace_period_then_exits_0(procs, mnist_model, tmp_path):
    stem, _ = mnist_model
    ks, inf = start_pair(procs, stem, grace="1")
    secret, key_id, layout = client_keys(inf.address, ks.address, tmp_path / "keys")
    _, cts = encrypted_images(secret, layout, FIRST + LATER)
    stream = HeldStream(inf.address, key_id, cts)
    try:
        stream.take(FIRST)
        inf.process.send_signal(signal.SIGTERM)
        # Never released: the grace period ends the call for us.
        end = stream.take(1)[0]
    finally:
        stream.close()
    assert end in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), end
    assert inf.process.wait(timeout=EXIT_WITHIN) == 0


def test_inference_exits_0_at_once_on_sigterm_when_idle(procs, mnist_model):
    ks, inf = start_pair(procs, mnist_model[0], grace="20")
    inf.process.send_signal(signal.SIGTERM)
    assert inf.process.wait(timeout=EXIT_WITHIN) == 0  # no call in flight: no need to wait out the grace
    assert inf.logged("inference stopping")


def test_inference_workers_exit_with_the_server(procs, mnist_model):
    ks, inf = start_pair(procs, mnist_model[0], grace="5")
    workers = [int(p) for p in os.popen(f"pgrep -P {inf.pid}").read().split()]
    assert workers
    inf.process.send_signal(signal.SIGTERM)
    assert inf.process.wait(timeout=EXIT_WITHIN) == 0
    assert wait_until(lambda: not [p for p in workers if os.path.exists(f"/proc/{p}")
                                   and "zombie" not in open(f"/proc/{p}/status").read().lower()], timeout=10)


def test_key_store_sigterm_turns_health_not_serving_first_then_exits_0(procs):
    ks = procs.keystore({"ENCINFER_TOKENS": TOKEN_SPEC, "ENCINFER_KEYSTORE_SHUTDOWN_GRACE": "20"})
    channel, health, status = watch(ks.address)
    try:
        assert status == SERVING
        ks.process.send_signal(signal.SIGTERM)
        assert next(health).status == NOT_SERVING
        health.cancel()
    finally:
        channel.close()
    assert ks.process.wait(timeout=EXIT_WITHIN) == 0
    assert ks.logged("key store stopped")
