"""The inference service's process lifecycle under faults: a killed worker is replaced
exactly once, a killed server leaves no worker behind, a failed start exits at once
with one clear line and nothing left, and a shutdown is visible to health pollers.

Each scenario prints what it measured (run with -s to see the numbers)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import free_port, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encinfer.common.auth import auth_metadata
from encinfer.v1 import inference_pb2 as pb
from encinfer.v1 import inference_pb2_grpc
from faults.conftest import (
    ALICE,
    CALL_TIMEOUT,
    EXIT_BOUND,
    MODEL,
    TOKEN_SPEC,
    assert_group_gone,
    children_of,
    exits_within,
    listening,
    port_of,
    process_group,
)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
GRACE = 5.0            # the topology's ENCINFER_GRACE_SECONDS
STOP_BOUND = 1.0 + GRACE + 10.0  # drain delay + grace + the server's own margin
REPLACE_BOUND = 60.0   # a new worker loads and pre-encodes the model: seconds on 2 busy cores
START_FAIL_BOUND = 20.0
STREAM_ITEMS = 40


def report(what: str, **numbers: float) -> None:
    print(f"[measured] {what}: " + ", ".join(f"{k}={v:.2f}" for k, v in numbers.items()))


# ---------------------------------------------------------------- helpers

def live_workers(topology) -> list[int]:
    return topology.worker_pids()


def zombies(topology) -> list[tuple[int, str, str]]:
    return [c for c in children_of(topology.inference.pid) if c[1] == "Z"]


def latency_inputs(topology, tmp_path, n: int):
    """A key uploaded for the latency layout and n encrypted images."""
    from encinfer import datasets
    from encinfer.he.latency import encrypt_latency
    with topology.classifier(tmp_path / "keys") as clf:
        secret, key_id = clf.keys("latency")
        layout = clf.layout_info("latency")
    X, _ = datasets.default_test_images(n)
    return key_id, [encrypt_latency(secret, x, layout) for x in X]


def predict(address: str, key_id: str, ciphertext: bytes) -> pb.PredictResponse:
    with grpc.insecure_channel(address) as ch:
        return inference_pb2_grpc.InferenceStub(ch).Predict(
            pb.PredictRequest(request_id="p", model=MODEL, key_id=key_id, ciphertext=ciphertext),
            metadata=auth_metadata(ALICE), timeout=CALL_TIMEOUT)


def wait_for_replacement(topology, gone: set[int], started: float) -> float:
    """Seconds from `started` until the pool has 2 live workers again, none of them in `gone`,
    and the server logged the replacement (the new worker answered its first call)."""
    def replaced() -> bool:
        pids = live_workers(topology)
        return (len(pids) == 2 and not gone & set(pids)
                and sum(e.get("message") == "inference worker replaced" for e in topology.inference.log_lines())
                >= len(gone))
    assert wait_until(replaced, timeout=REPLACE_BOUND, interval=0.05), (
        live_workers(topology), topology.inference.log_text()[-3000:])
    return time.monotonic() - started


def sigterm_exits_cleanly(topology) -> float:
    """SIGTERM: exit 0 within the bound, no process of the group left, no port left."""
    inf = topology.inference
    start = time.monotonic()
    inf.process.send_signal(signal.SIGTERM)
    code = exits_within(inf, STOP_BOUND + 10)
    took = time.monotonic() - start
    assert code == 0, inf.log_text()[-3000:]
    assert took < STOP_BOUND + 10
    assert_group_gone(inf)
    assert not listening(port_of(inf.address))
    return took


WORKER_DIED = "inference worker died; starting a new one"


def assert_log_is_json(proc, allowed_errors: tuple[str, ...] = ()) -> None:
    """Every line the service wrote is a JSON log line (no traceback, no BrokenPipeError), and
    no ERROR but the expected ones (asyncio's 'Task was destroyed but it is pending' is one)."""
    for line in proc.log_text().splitlines():
        if line.strip() and not line.startswith(("E1", "W1", "I1")):  # grpc C-core's own lines
            entry = json.loads(line)
            if entry["severity"] in ("ERROR", "CRITICAL"):
                assert entry["message"] in allowed_errors, entry


# ---------------------------------------------------------------- worker deaths

def test_worker_sigkilled_during_a_stream_is_replaced_once_and_sigterm_exits_cleanly(topology, tmp_path):
    key_id, cts = latency_inputs(topology, tmp_path, STREAM_ITEMS)
    predict(topology.inference.address, key_id, cts[0])  # both caches warm before the fault
    first = live_workers(topology)
    assert len(first) == 2
    answers: list[pb.PredictResponse] = []
    some_answered = threading.Event()

    def requests():
        yield pb.PredictStreamRequest(header=pb.StreamHeader(model=MODEL, key_id=key_id, layout=pb.LAYOUT_LATENCY))
        for i, ct in enumerate(cts):
            if i == 8:
                some_answered.wait(CALL_TIMEOUT)  # the kill lands while the stream is busy
            yield pb.PredictStreamRequest(item=pb.PredictRequest(request_id=str(i), ciphertext=ct))

    with grpc.insecure_channel(topology.inference.address) as ch:
        call = inference_pb2_grpc.InferenceStub(ch).PredictStream(requests(), metadata=auth_metadata(ALICE),
                                                                  timeout=REPLACE_BOUND + CALL_TIMEOUT)
        victim = first[0]
        for answer in call:
            answers.append(answer)
            if len(answers) == 4:
                os.kill(victim, signal.SIGKILL)
                killed_at = time.monotonic()
                some_answered.set()
        assert call.code() == grpc.StatusCode.OK

    assert sorted(int(a.request_id) for a in answers) == list(range(STREAM_ITEMS))
    codes = [a.status.code for a in answers]
    assert set(codes) <= {0, UNAVAILABLE}, [a.status for a in answers if a.status.code]
    assert all("retry" in a.status.message for a in answers if a.status.code)
    replaced_in = wait_for_replacement(topology, {victim}, killed_at)
    time.sleep(1.0)  # a second replacement would show up by now
    assert len(live_workers(topology)) == 2 and first[1] in live_workers(topology)
    assert not zombies(topology)
    assert sum(e.get("message") == WORKER_DIED for e in topology.inference.log_lines()) == 1
    reply, took = _timed_predict(topology, key_id, cts[1])
    assert reply.status.code == 0
    stop = sigterm_exits_cleanly(topology)
    assert_log_is_json(topology.inference, allowed_errors=(WORKER_DIED,))
    report("worker SIGKILL during a stream", items_unavailable=codes.count(UNAVAILABLE),
           items_ok=codes.count(0), kill_to_replacement_s=replaced_in, next_predict_s=took, sigterm_to_exit_s=stop)


def _timed_predict(topology, key_id, ct):
    start = time.monotonic()
    reply = predict(topology.inference.address, key_id, ct)
    return reply, time.monotonic() - start


def test_two_workers_sigkilled_in_a_row_leave_exactly_two_workers(topology, tmp_path):
    key_id, cts = latency_inputs(topology, tmp_path, 2)
    first = live_workers(topology)
    started = time.monotonic()
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    replaced_in = wait_for_replacement(topology, set(first), started)
    time.sleep(1.0)
    assert len(live_workers(topology)) == 2 and not zombies(topology)
    assert predict(topology.inference.address, key_id, cts[0]).status.code == 0
    # And the replacement itself dies: one more replacement, still two.
    second = live_workers(topology)
    os.kill(second[0], signal.SIGKILL)
    again_in = wait_for_replacement(topology, {*first, second[0]}, time.monotonic())
    assert len(live_workers(topology)) == 2 and not zombies(topology)
    assert predict(topology.inference.address, key_id, cts[1]).status.code == 0
    stop = sigterm_exits_cleanly(topology)
    assert_log_is_json(topology.inference, allowed_errors=(WORKER_DIED,))
    report("two worker SIGKILLs", both_replaced_s=replaced_in, third_replaced_s=again_in, sigterm_to_exit_s=stop)


def test_sigkill_of_the_server_leaves_no_worker_behind(topology):
    inf = topology.inference
    workers = live_workers(topology)
    assert len(workers) == 2
    start = time.monotonic()
    os.kill(inf.pid, signal.SIGKILL)
    inf.process.wait(timeout=10)

    def gone() -> bool:
        return not [p for p, state, _ in process_group(inf.pid) if state != "Z"]
    assert wait_until(gone, timeout=10, interval=0.05), process_group(inf.pid)
    took = time.monotonic() - start
    assert_group_gone(inf)
    assert not listening(port_of(inf.address))
    report("server SIGKILL", workers_gone_s=took)


# ---------------------------------------------------------------- failed starts

class Holder:
    """A port held by another process (here: a listening socket of the test's own)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def bad_tls(tmp_path) -> dict[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    key.write_text("not a key\n")
    return {"ENCINFER_TLS_CERT": str(cert), "ENCINFER_TLS_KEY": str(key)}


FAILED_STARTS = {
    # name: (env for the process, given a held port, the tmp dir and the model; words the ERROR line holds)
    "grpc-port-busy": (lambda held, tmp, model: {"ENCINFER_INFERENCE_ADDRESS": f"127.0.0.1:{held.port}"},
                       ["already in use", "ENCINFER_INFERENCE_ADDRESS"]),
    "metrics-port-busy": (lambda held, tmp, model: {"ENCINFER_METRICS_PORT": str(held.port)},
                          ["already in use", "ENCINFER_METRICS_PORT"]),
    "missing-model": (lambda held, tmp, model: {"ENCINFER_MODELS": str(tmp / "no-such-model")},
                      ["no-such-model", "does not exist", "ENCINFER_MODELS"]),
    "bad-tls-files": (lambda held, tmp, model: bad_tls(tmp), ["ENCINFER_TLS_CERT", "no PEM certificate"]),
}


def launch(tmp_path, fault_model, **env: str) -> tuple[subprocess.Popen, Path]:
    """`encinfer inference serve` in its own process group, 2 workers, tokens on, logging to a file."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ENCINFER_", "PROMETHEUS_"))}
    full.update({"PYTHONUNBUFFERED": "1", "ENCINFER_TOKENS": TOKEN_SPEC, "ENCINFER_WORKERS": "2",
                 "ENCINFER_INFERENCE_ADDRESS": f"127.0.0.1:{free_port()}", "ENCINFER_MODELS": str(fault_model),
                 "ENCINFER_KEYSTORE_TARGET": f"127.0.0.1:{free_port()}", **env})
    log_path = tmp_path / "inference.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "encinfer.cli", "inference", "serve"], env=full,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
                                start_new_session=True)
    return proc, log_path


def json_lines(log_path) -> list[dict]:
    """Every line of the log, parsed: a line that is not JSON fails the test."""
    return [json.loads(line) for line in log_path.read_text(errors="replace").splitlines() if line.strip()]


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.parametrize("case", sorted(FAILED_STARTS))
def test_failed_start_exits_nonzero_at_once_with_one_error_line_and_nothing_left(case, fault_model, tmp_path):
    make_env, words = FAILED_STARTS[case]
    held = Holder()
    grpc_port = free_port()
    start = time.monotonic()
    env = {"ENCINFER_INFERENCE_ADDRESS": f"127.0.0.1:{grpc_port}", **make_env(held, tmp_path, fault_model)}
    proc, log_path = launch(tmp_path, fault_model, **env)
    try:
        code = wait_exit(proc, START_FAIL_BOUND)
        took = time.monotonic() - start
        assert code not in (None, 0), log_path.read_text(errors="replace")[-3000:]
        lines = json_lines(log_path)
        errors = [e for e in lines if e["severity"] in ("ERROR", "CRITICAL")]
        assert len(errors) == 1, errors
        assert errors[0]["message"].startswith("inference cannot start: ")
        for word in words:
            assert word in errors[0]["message"], errors[0]["message"]
        assert not any(e.get("message") == "inference serving" for e in lines)
        assert wait_until(lambda: not process_group(proc.pid), timeout=10), process_group(proc.pid)
        if case != "grpc-port-busy":
            assert not listening(grpc_port)  # the held port is the test's own: only ours must be closed
    finally:
        held.close()
        kill_group(proc)
    report(f"failed start ({case})", exit_code=code, start_to_exit_s=took)
    print(f"[measured] its one line: {errors[0]['message']}")


def test_sigterm_during_start_up_exits_0_with_nothing_left(fault_model, tmp_path):
    # Without tokens the server warns as its start begins: the signal lands while workers load.
    proc, log_path = launch(tmp_path, fault_model, ENCINFER_TOKENS="")
    try:
        assert wait_until(lambda: any(e.get("severity") == "WARNING" for e in json_lines(log_path)),
                          timeout=START_FAIL_BOUND, interval=0.02), log_path.read_text()[-2000:]
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = wait_exit(proc, STOP_BOUND)
        took = time.monotonic() - start
        assert code == 0, log_path.read_text(errors="replace")[-3000:]
        assert wait_until(lambda: not process_group(proc.pid), timeout=10), process_group(proc.pid)
        assert not [e for e in json_lines(log_path) if e["severity"] == "ERROR"]
    finally:
        kill_group(proc)
    report("SIGTERM during start-up", sigterm_to_exit_s=took)


# ---------------------------------------------------------------- shutdown seen by health pollers

def poll_health_until_refused(target: str, stop_after: float) -> list[tuple[float, str]]:
    """Health/Check every 50 ms on one channel until the call fails: (time, SERVING | NOT_SERVING | code)."""
    seen: list[tuple[float, str]] = []
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + stop_after
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                seen.append((time.monotonic(), health_pb2.HealthCheckResponse.ServingStatus.Name(status)))
            except grpc.RpcError as e:
                seen.append((time.monotonic(), e.code().name))
                break
            time.sleep(0.05)
    return seen


def _first(seen, what):
    return next((t for t, s in seen if s == what), None)


@pytest.mark.parametrize("service", ["inference", "keystore"])
def test_sigterm_shows_not_serving_to_health_pollers_before_the_port_closes(topology, service):
    proc = topology.inference if service == "inference" else topology.keystore
    channel = grpc.insecure_channel(proc.address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
    try:
        assert next(watch).status == SERVING
        results: list = []
        poller = threading.Thread(target=lambda: results.extend(poll_health_until_refused(proc.address, 30)))
        poller.start()
        time.sleep(0.3)
        sent = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        watch.cancel()  # a watcher that stays holds the shutdown for the grace period
        poller.join(40)
    finally:
        channel.close()
    states = [s for _, s in results]
    # The last call fails: refused (UNAVAILABLE), or cut when the server closed (CANCELLED).
    assert states[0] == "SERVING" and states[-1] in ("UNAVAILABLE", "CANCELLED"), states
    not_serving, refused = _first(results, "NOT_SERVING"), results[-1][0]
    assert not_serving is not None and not_serving < refused, states
    assert "SERVING" not in states[states.index("NOT_SERVING"):]
    assert exits_within(proc, EXIT_BOUND) == 0, proc.log_text()[-2000:]
    assert_group_gone(proc)
    assert_log_is_json(proc)
    report(f"{service} SIGTERM seen by a poller", not_serving_after_s=not_serving - sent,
           not_serving_for_s=refused - not_serving)
