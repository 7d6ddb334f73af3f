"""Untrusted SEAL bytes against the real topology: crafted objects cost no process, and a
crash of the key store's parser process costs at most the upload it was reading.

Crafted ciphertexts reach Predict and a crafted bundle reaches PutKeys: INVALID_ARGUMENT,
no worker replaced, the next good call answered. The parser child is then killed, idle
and in the middle of a parse: the key store answers that upload INVALID_ARGUMENT (or
takes it, when the child died before the parse began), starts one new child, keeps its
pid and keeps serving; SIGTERM leaves nothing of it behind.
"""
from __future__ import annotations

import os
import signal
import struct
import threading

import grpc
import numpy as np
from conftest import wait_until

from faults.conftest import ALICE, CALL_TIMEOUT, EXIT_BOUND, MODEL, assert_group_gone, children_of, exits_within, timed

HEADER = struct.Struct("<HBBBBHQ")
ERROR_BOUND = 10.0  # seconds until the client sees a refusal (generous on 2 busy cores)


def forged_header(size: int, version: tuple[int, int] = (4, 3)) -> bytes:
    return HEADER.pack(0xA15E, 16, *version, 0, 0, size)


def parser_children(keystore_pid: int) -> list[int]:
    """The key store's live parser processes (multiprocessing's resource tracker excluded)."""
    return [pid for pid, state, cmd in children_of(keystore_pid)
            if state != "Z" and "multiprocessing" in cmd and "resource_tracker" not in cmd]


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def keystore_client(topology):
    from encinfer.client.keystore import KeyStoreClient
    return KeyStoreClient(topology.keystore.address, token=ALICE, timeout=CALL_TIMEOUT)


def small_bundle() -> bytes:
    from encinfer.he.params import CkksParams
    from encinfer.he.secret import SecretKeys
    return SecretKeys.generate(CkksParams(4096, (40, 29, 40), 29, 40, galois_steps=(1,))).public_bundle()


def test_crafted_ciphertexts_are_refused_and_cost_no_worker(topology, tmp_path):
    from encinfer import datasets
    from encinfer.he import serial
    from encinfer.he.latency import encrypt_latency
    from encinfer.v1 import inference_pb2 as pb
    from encinfer.v1 import inference_pb2_grpc

    X, _ = datasets.default_test_images(2)
    with topology.classifier(tmp_path / "keys", layout="latency") as clf:
        clf.predict_one(X[0])
        secret, key_id = clf.keys("latency")
        layout = clf.layout_info("latency")
        workers = sorted(topology.worker_pids())
        good = serial.check_ciphertext(encrypt_latency(secret, X[1], layout), layout.params.context())
        meta = bytearray(good)
        struct.pack_into("<Q", meta, 16 + 33, 3)  # three polynomials
        crafted = [forged_header(2 ** 40) + good[16:], forged_header(2 ** 63) + good[16:],
                   forged_header(len(good), (4, 4)) + good[16:], bytes(meta)]
        with grpc.insecure_channel(topology.inference.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for data in crafted:
                err, seconds = timed(stub.Predict, pb.PredictRequest(model=MODEL, key_id=key_id, request_id="r",
                                                                      ciphertext=data),
                                     metadata=(("authorization", f"Bearer {ALICE}"),), timeout=CALL_TIMEOUT)
                assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
                assert seconds < ERROR_BOUND
        assert np.all(np.isfinite(np.asarray(clf.predict_one(X[1]), dtype=float)))
    assert sorted(topology.worker_pids()) == workers  # no worker died or was replaced


def test_a_crafted_bundle_is_refused_and_the_key_store_keeps_serving(topology):
    from encinfer.common.errors import InvalidArgument
    bundle = small_bundle()
    # The Galois key's SEAL header claims 2^40 bytes: refused from the section header, never read.
    at = bundle.index(b"GALK")
    length = struct.unpack_from("<Q", bundle, at + 8)[0]
    crafted = bundle[:at + 16] + forged_header(2 ** 40) + bundle[at + 32:]
    assert len(crafted) == len(bundle) and length > 32
    with keystore_client(topology) as ks:
        err, seconds = timed(ks.put, crafted)
        assert isinstance(err, InvalidArgument) and "2^40" in str(err), err
        assert seconds < ERROR_BOUND
        assert ks.put(bundle).key_id
    assert topology.keystore.process.poll() is None


def test_a_parser_crash_costs_at_most_one_upload_and_one_new_child(topology):
    from encinfer.common.errors import InvalidArgument
    from encinfer.he.params import CkksParams
    from encinfer.he.secret import SecretKeys

    ks_pid = topology.keystore.pid
    assert wait_until(lambda: len(parser_children(ks_pid)) == 1, timeout=30, interval=0.1)
    bundle = small_bundle()

    # Idle: the next upload is not blamed, and one new child serves it.
    (idle,) = parser_children(ks_pid)
    os.kill(idle, signal.SIGSEGV)
    with keystore_client(topology) as ks:
        record, seconds = timed(ks.put, bundle)
        assert not isinstance(record, Exception), record
        assert seconds < 30
    (second,) = parser_children(ks_pid)
    assert second != idle

    # Busy: a bundle big enough to parse for a while; the child is killed once it is at work.
    big = SecretKeys.generate(CkksParams(8192, (60, 40, 40, 60), 40, 40,
                                         galois_steps=tuple(range(1, 13)))).public_bundle()
    before = cpu_ticks(second)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=timed(keystore_client(topology).put, big)))
    thread.start()
    busy = wait_until(lambda: cpu_ticks(second) - before >= 5, timeout=60, interval=0.01)  # 50 ms of parsing
    os.kill(second, signal.SIGSEGV)
    thread.join(CALL_TIMEOUT + 10)
    assert not thread.is_alive()
    answer, seconds = result["r"]
    # Caught at work, the upload is refused; a child that died after it answered (or before the parse
    # began) cost nothing. Never UNAVAILABLE, INTERNAL or a hang.
    if isinstance(answer, Exception):
        assert isinstance(answer, InvalidArgument) and "crashed the key parser" in str(answer), answer
    assert busy and seconds < CALL_TIMEOUT

    assert wait_until(lambda: len(parser_children(ks_pid)) == 1, timeout=30, interval=0.1)
    with keystore_client(topology) as ks:
        assert ks.put(bundle).key_id
    assert topology.keystore.pid == ks_pid and topology.keystore.process.poll() is None

    topology.keystore.process.send_signal(signal.SIGTERM)
    assert exits_within(topology.keystore, EXIT_BOUND) == 0, topology.keystore.log_text()[-2000:]
    assert_group_gone(topology.keystore)
