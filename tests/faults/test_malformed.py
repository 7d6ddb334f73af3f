"""Malformed bytes and cancelled calls: every method of both services answers bytes that
are no valid protobuf message with INVALID_ARGUMENT (never UNKNOWN or INTERNAL), says
so in its access log, and keeps serving; a client that cancels a stream is counted and
logged CANCELLED, never INTERNAL (which would page someone for nothing).

The services run as real processes, started once for the module (these faults leave
nothing broken behind, which the tests check after every call).
"""
from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from conftest import MINIO_BIN, MinioServer, free_port, wait_until
from service_procs import ServiceProcess, ServiceProcs, metric_value

from faults.conftest import ALICE, CALL_TIMEOUT, Topology

GARBAGE = b"\xff\xff\xff garbage"  # an invalid wire type in the first tag: no message decodes it
AUTH = (("authorization", f"Bearer {ALICE}"),)
INFERENCE, KEYSTORE = "/encinfer.v1.Inference/", "/encinfer.v1.KeyStore/"
HEALTH, REFLECTION = "/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/"

# (service, full method, kind, request message type): every method either service serves.
METHODS = [
    ("inference", INFERENCE + "ListModels", "unary_unary", "encinfer.v1.ListModelsRequest"),
    ("inference", INFERENCE + "GetModelInfo", "unary_unary", "encinfer.v1.GetModelInfoRequest"),
    ("inference", INFERENCE + "Predict", "unary_unary", "encinfer.v1.PredictRequest"),
    ("inference", INFERENCE + "PredictStream", "stream_stream", "encinfer.v1.PredictStreamRequest"),
    ("keystore", KEYSTORE + "PutKeys", "stream_unary", "encinfer.v1.PutKeysRequest"),
    ("keystore", KEYSTORE + "GetKeys", "unary_stream", "encinfer.v1.GetKeysRequest"),
    ("keystore", KEYSTORE + "StatKeys", "unary_unary", "encinfer.v1.StatKeysRequest"),
    ("keystore", KEYSTORE + "DeleteKeys", "unary_unary", "encinfer.v1.DeleteKeysRequest"),
    ("keystore", KEYSTORE + "ListKeys", "unary_unary", "encinfer.v1.ListKeysRequest"),
    ("inference", HEALTH + "Check", "unary_unary", "grpc.health.v1.HealthCheckRequest"),
    ("keystore", HEALTH + "Watch", "unary_stream", "grpc.health.v1.HealthCheckRequest"),
    ("keystore", REFLECTION + "ServerReflectionInfo", "stream_stream",
     "grpc.reflection.v1alpha.ServerReflectionRequest"),
]


# ---------------------------------------------------------------- the services, once

@pytest.fixture(scope="module")
def served(tmp_path_factory, fault_model) -> Iterator[Topology]:
    """MinIO, the key store and inference (2 workers) as processes, with /metrics on."""
    if not (os.path.isfile(MINIO_BIN) and os.access(MINIO_BIN, os.X_OK)):
        pytest.skip(f"MinIO binary not found at {MINIO_BIN} (run `make minio-bin`)")
    workdir = tmp_path_factory.mktemp("malformed")
    (workdir / "minio").mkdir()
    minio = MinioServer(binary=MINIO_BIN, data_dir=workdir / "minio")
    minio.start()
    topo = Topology(workdir=workdir, model_stem=fault_model, minio=minio, procs=ServiceProcs(workdir))
    try:
        topo.start_keystore(ENCINFER_METRICS_PORT=str(free_port()))
        topo.start_inference(ENCINFER_METRICS_PORT=str(free_port()))
        yield topo
    finally:
        topo.stop()
        shutil.rmtree(workdir / "minio", ignore_errors=True)


def service(topo: Topology, name: str) -> ServiceProcess:
    return topo.inference if name == "inference" else topo.keystore


# ---------------------------------------------------------------- raw calls

def raw_call(target: str, method: str, kind: str, messages: list[bytes],
             timeout: float = CALL_TIMEOUT) -> grpc.RpcError | None:
    """Sends these exact bytes (no serializer) and returns the call's error, or None if it succeeded."""
    with grpc.insecure_channel(target) as ch:
        make: Callable = getattr(ch, kind)
        stub = make(method, request_serializer=None, response_deserializer=None)
        try:
            if kind == "unary_unary":
                stub(messages[0], metadata=AUTH, timeout=timeout)
            elif kind == "unary_stream":
                list(stub(messages[0], metadata=AUTH, timeout=timeout))
            elif kind == "stream_unary":
                stub(iter(messages), metadata=AUTH, timeout=timeout)
            else:
                list(stub(iter(messages), metadata=AUTH, timeout=timeout))
        except grpc.RpcError as e:
            return e
    return None


def assert_still_serving(topo: Topology, name: str) -> None:
    """A valid call on the same service succeeds right after the malformed one."""
    from encinfer.v1 import inference_pb2, keystore_pb2
    proc = service(topo, name)
    if name == "inference":
        method, request = INFERENCE + "ListModels", inference_pb2.ListModelsRequest()
    else:
        method, request = KEYSTORE + "ListKeys", keystore_pb2.ListKeysRequest()
    error = raw_call(proc.address, method, "unary_unary", [request.SerializeToString()])
    assert error is None, f"{name} stopped serving: {error}"


def access_lines(proc: ServiceProcess, method: str, code: str) -> list[dict]:
    return [e for e in proc.log_lines()
            if e.get("message") == "rpc" and e.get("method") == method and e.get("code") == code]


def evidence(proc: ServiceProcess, method: str) -> str:
    """The method's counts and its log lines (and any warning or error): what an assertion shows."""
    counts = [line for line in proc.metrics().splitlines() if line.startswith("encinfer_rpcs_total") and method in line]
    lines = [e for e in proc.log_lines() if e.get("method") == method or e.get("severity") not in ("INFO", "DEBUG")]
    return "\n".join([*counts, *map(str, lines[-30:])])


def rpc_count(proc: ServiceProcess, method: str, code: str) -> float:
    return metric_value(proc.metrics(), f'encinfer_rpcs_total{{code="{code}",method="{method}"}}') or 0.0


# ---------------------------------------------------------------- malformed bytes

@pytest.mark.parametrize("name,method,kind,type_name", METHODS, ids=[m[1].rsplit(".", 1)[1] for m in METHODS])
def test_undecodable_request_is_invalid_argument_naming_the_message_type(served, name, method, kind, type_name):
    proc = service(served, name)
    internal_before, invalid_before = rpc_count(proc, method, "INTERNAL"), rpc_count(proc, method, "INVALID_ARGUMENT")
    start = time.monotonic()
    error = raw_call(proc.address, method, kind, [GARBAGE])
    elapsed = time.monotonic() - start

    assert error is not None, f"{method} accepted {GARBAGE!r}"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert f"not a valid {type_name} message" in error.details() and "decoded" in error.details()
    assert elapsed < 10.0, f"{method} took {elapsed:.1f} s to refuse garbage"
    assert_still_serving(served, name)
    # Counted as what it is; never as a bug.
    assert wait_until(lambda: rpc_count(proc, method, "INVALID_ARGUMENT") == invalid_before + 1, timeout=10)
    assert rpc_count(proc, method, "INTERNAL") == internal_before


@pytest.mark.parametrize("name,method", [(n, m) for n, m, _, _ in METHODS if not m.startswith(HEALTH)],
                         ids=[m[1].rsplit(".", 1)[1] for m in METHODS if not m[1].startswith(HEALTH)])
def test_access_log_line_of_an_undecodable_request_carries_its_message(served, name, method):
    kind = next(k for _, m, k, _ in METHODS if m == method)
    proc = service(served, name)
    raw_call(proc.address, method, kind, [GARBAGE])

    def logged() -> list[dict]:
        return [e for e in access_lines(proc, method, "INVALID_ARGUMENT")
                if "could not be decoded" in e.get("details", "")]
    assert wait_until(lambda: bool(logged()), timeout=10), proc.log_text()[-2000:]
    line = logged()[-1]
    assert line["severity"] == "INFO" and len(line["details"]) <= 300 and "request_id" in line
    assert "garbage" not in line["details"]  # the message names the problem, never the bytes


def _predict_stream_header() -> bytes:
    from encinfer.v1 import inference_pb2 as pb
    return pb.PredictStreamRequest(header=pb.StreamHeader(model="mnist", key_id="k", layout=pb.LAYOUT_LATENCY)
                                   ).SerializeToString()


def _put_keys_header() -> bytes:
    from encinfer.v1 import keystore_pb2 as pb
    return pb.PutKeysRequest(header=pb.PutKeysHeader(expected_size=10)).SerializeToString()


@pytest.mark.parametrize("name,method,kind,first", [
    ("inference", INFERENCE + "PredictStream", "stream_stream", _predict_stream_header),
    ("keystore", KEYSTORE + "PutKeys", "stream_unary", _put_keys_header),
], ids=["PredictStream", "PutKeys"])
def test_undecodable_message_mid_stream_fails_the_call_with_invalid_argument(served, name, method, kind, first):
    proc = service(served, name)
    before = rpc_count(proc, method, "INVALID_ARGUMENT")
    error = raw_call(proc.address, method, kind, [first(), GARBAGE, first()])
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "could not be decoded" in error.details()
    assert wait_until(lambda: rpc_count(proc, method, "INVALID_ARGUMENT") == before + 1, timeout=10), \
        evidence(proc, method)
    assert_still_serving(served, name)


def test_error_details_in_access_log_are_capped(served):
    """A long message (here an unknown model name the client chose) is cut to about 300 characters."""
    from encinfer.v1 import inference_pb2 as pb
    proc = served.inference
    long_name = "m" * 2000
    error = raw_call(proc.address, INFERENCE + "GetModelInfo", "unary_unary",
                     [pb.GetModelInfoRequest(model=long_name).SerializeToString()])
    assert error is not None and error.code() == grpc.StatusCode.NOT_FOUND, error

    def lines() -> list[dict]:
        return [e for e in access_lines(proc, INFERENCE + "GetModelInfo", "NOT_FOUND")
                if "mmmm" in e.get("details", "")]
    assert wait_until(lambda: bool(lines()), timeout=10)
    assert all(len(e["details"]) <= 300 for e in lines())


# ---------------------------------------------------------------- cancelled streams

OUTCOMES = ("OK", "CANCELLED", "INTERNAL", "UNKNOWN")


def outcomes(proc: ServiceProcess, method: str) -> dict[str, float]:
    return {code: rpc_count(proc, method, code) for code in OUTCOMES}


def assert_each_cancel_counted_once_never_as_a_bug(proc: ServiceProcess, method: str,
                                                   before: dict[str, float], rounds: int) -> None:
    """Each cancelled call is counted once: CANCELLED, or OK when the server had finished
    sending before the cancel reached it (grpc.aio tells a handler nothing then); never
    INTERNAL or UNKNOWN, and no traceback in the log."""
    def delta() -> dict[str, float]:
        now = outcomes(proc, method)
        return {code: now[code] - before[code] for code in OUTCOMES}
    assert wait_until(lambda: delta()["CANCELLED"] + delta()["OK"] >= rounds, timeout=20), evidence(proc, method)
    time.sleep(0.5)  # a handler closed late (at a yield, by its finalizer) would count now
    d = delta()
    assert d["INTERNAL"] == 0 and d["UNKNOWN"] == 0, evidence(proc, method)
    assert d["CANCELLED"] + d["OK"] == rounds, evidence(proc, method)
    assert d["CANCELLED"] >= rounds / 2, evidence(proc, method)
    entries = proc.log_lines()
    assert not [e for e in entries if e.get("message") == "unhandled error"], evidence(proc, method)
    assert not access_lines(proc, method, "INTERNAL")
    assert all("cancelled" in e["details"] for e in access_lines(proc, method, "CANCELLED"))


def test_client_cancelling_predict_stream_is_counted_and_logged_cancelled_never_internal(served, tmp_path):
    proc = served.inference
    method = INFERENCE + "PredictStream"
    rng = np.random.default_rng(9)
    rounds = 8
    with served.classifier(tmp_path / "keys") as clf:
        n = clf.info.n_features
        clf.keys("latency")  # upload first: only the streams below are counted
        before = outcomes(proc, method)
        for r in range(rounds):
            samples = (rng.random(n) for _ in itertools.count())  # endless: only the cancel ends the call
            stream = clf.predict_stream(samples, window=4 + r % 4)
            got = [next(stream) for _ in range(1 + r % 3)]
            stream.close()  # the client stops reading: the library cancels the call
            assert len(got) == 1 + r % 3
        assert_each_cancel_counted_once_never_as_a_bug(proc, method, before, rounds)
        # ... and the service goes on predicting.
        assert clf.decision_function(rng.random((2, n))).shape == (2, 10)


def test_client_cancelling_while_answers_flow_is_cancelled_never_internal(served):
    """Items the server answers at once (an unknown key): the cancel lands while it is sending."""
    from encinfer.v1 import inference_pb2 as pb
    from encinfer.v1 import inference_pb2_grpc
    proc = served.inference
    method = INFERENCE + "PredictStream"
    rounds = 6

    def requests() -> Iterator[pb.PredictStreamRequest]:
        yield pb.PredictStreamRequest(header=pb.StreamHeader(model="mnist", key_id="no-such-key",
                                                             layout=pb.LAYOUT_LATENCY))
        for i in range(10_000):  # bounded; the cancel comes long before
            yield pb.PredictStreamRequest(item=pb.PredictRequest(request_id=str(i), ciphertext=b"x"))

    before = outcomes(proc, method)
    with grpc.insecure_channel(proc.address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        for _ in range(rounds):
            call = stub.PredictStream(requests(), metadata=AUTH, timeout=CALL_TIMEOUT)
            answers = [next(call) for _ in range(3)]
            assert all(a.status.code for a in answers)  # item errors, answered in the stream
            call.cancel()
            assert call.code() == grpc.StatusCode.CANCELLED
    assert_each_cancel_counted_once_never_as_a_bug(proc, method, before, rounds)
    assert_still_serving(served, "inference")


# ---------------------------------------------------------------- the frame itself

class _ServicerContext:
    """The little of grpc.aio's servicer context the frame reads, for driving a handler
    the way grpc does without a network in between."""

    def __init__(self) -> None:
        self.aborted: tuple | None = None

    def invocation_metadata(self):
        return ()

    def code(self):
        return None

    def details(self):
        return ""

    def done(self) -> bool:
        return self.aborted is not None

    def cancelled(self) -> bool:
        return False

    async def abort(self, code, details=""):
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def test_stream_handler_closed_at_a_yield_is_cancelled_and_its_cleanup_runs():
    """grpc.aio drops a streaming handler at a `yield` when a write fails because the client
    left; closing it later raises GeneratorExit there. That is a cancellation, not a bug."""
    import asyncio

    from encinfer.common import rpc
    cleaned = []

    async def handler(request, context):
        try:
            for i in range(1000):
                yield i
        finally:
            await asyncio.sleep(0)  # cleanup that awaits, like PredictStream's session.cancel()
            cleaned.append(True)

    method = "/test.Frame/ClosedAtYield"

    def count(code: str) -> float:
        return rpc.RPCS.labels(method, code)._value.get()

    async def drive() -> None:
        wrapper = rpc._wrap_stream(handler, method, rpc._Decoder(None))
        responses = wrapper(None, _ServicerContext())
        assert await responses.__anext__() == 0
        await responses.aclose()  # what the finalizer does with a generator grpc dropped

    asyncio.run(drive())
    assert cleaned == [True]
    assert count("CANCELLED") == 1 and count("INTERNAL") == 0


def test_undecodable_request_reaches_no_handler():
    """The decoder never raises (grpc.aio would answer UNKNOWN); the frame refuses the call."""
    import asyncio

    from encinfer.common import rpc
    from encinfer.v1 import inference_pb2 as pb
    reached = []

    async def handler(request, context):
        reached.append(request)
        return pb.PredictResponse()

    decoder = rpc._Decoder(pb.PredictRequest.FromString)
    request = decoder(GARBAGE)
    context = _ServicerContext()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(rpc._wrap_unary(handler, "/test.Frame/Undecodable", decoder)(request, context))
    assert not reached
    code, details = context.aborted
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("request is not a valid encinfer.v1.PredictRequest message: it could not be decoded")
