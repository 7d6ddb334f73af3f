"""encinfer's own rows for `make bench`: real servers on loopback, measured at the RPC.

Latency layout: sequential unary Predict calls (server time = the handler's time,
reported in each answer), the first call cold (the server's first request: key
fetched through the key store, verified, deserialized in the worker, and the process's
own first-call costs), then the first calls of a new key id on the running server (a
new tenant's first requests), then a PredictStream of all images for throughput.
Batch layout: batches pre-encrypted by the client, then streamed with their parts
interleaved so every worker is busy; server time per image = stream
wall time / images (upload, deserialization, compute and download included).
Each layout is measured with 1 and with 2 worker processes.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encinfer.client.classifier import SINGLE_SAMPLE, EncryptedClassifier
from encinfer.client.demo import LocalStack
from encinfer.he.batch import decrypt_batch, encrypt_batch
from encinfer.he.secret import SecretKeys
from encinfer.inference.artifact import load_model
from encinfer.stack import free_port
from encinfer.v1 import inference_pb2 as pb


def _agreement(artifact, scores: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    plain = artifact.scores(X)
    agree = float(np.mean(scores.argmax(1) == plain.argmax(1)))
    acc = float(np.mean(scores.argmax(1) == np.asarray(y)))
    return agree, acc, float(np.max(np.abs(scores - plain)))


@contextmanager
def _inference_process(stem: str, workers: int, keystore: str, tokens: str, service_token: str) -> Iterator[str]:
    """The inference service as its own process, as deployed: the measuring client must
    not share a GIL with the server it measures."""
    port = free_port()
    env = {**os.environ, "ENCINFER_INFERENCE_ADDRESS": f"127.0.0.1:{port}", "ENCINFER_MODELS": stem,
           "ENCINFER_WORKERS": str(workers), "ENCINFER_KEYSTORE_TARGET": keystore, "ENCINFER_TOKENS": tokens,
           "ENCINFER_KEYSTORE_TOKEN": service_token, "ENCINFER_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "encinfer.inference.server"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as ch:
            grpc.channel_ready_future(ch).result(timeout=120)
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=60, wait_for_ready=True)
        yield target
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def _session(stem: str, workers: int, layout: str) -> Iterator[EncryptedClassifier]:
    """A key store (in this process: it is not on the hot path), the inference service
    as a separate process, and a client, torn down afterwards."""
    with tempfile.TemporaryDirectory(prefix="encinfer-bench-") as tmp, \
            LocalStack([stem], Path(tmp), inference=False) as local, \
            _inference_process(stem, workers, local.keystore.target, local.token_spec,
                               local.service_token) as target, \
            EncryptedClassifier(inference=target, keystore=local.keystore.target,
                                model=load_model(stem).name, token=local.tenant_token, layout=layout,
                                key_dir=Path(tmp) / "keys") as clf:
        yield clf


def bench_latency(stem: str, X: np.ndarray, y: np.ndarray, workers: int = 2, wire: str | None = None) -> dict:
    """One sample per request, in the layout the client library picks ("coeff" when the model
    offers it), or in `wire` ("coeff" or "latency", the rotation layout)."""
    artifact = load_model(stem)
    with _session(stem, workers, wire or "auto") as clf:
        wire = clf.single_sample_layout()
        clf.layout = wire  # the stream below too, whatever its size
        encrypt_one, decrypt_one, wire_enum = SINGLE_SAMPLE[wire]
        t = time.perf_counter()
        secret, key_id = clf.keys(wire)
        keygen_upload_ms = (time.perf_counter() - t) * 1000
        key_bytes = clf._keystore.stat(key_id).size_bytes
        layout = clf.layout_info(wire)
        t = time.perf_counter()
        cts = [encrypt_one(secret, x, layout) for x in X]
        encrypt_ms = (time.perf_counter() - t) * 1000 / len(X)
        stub, md = clf._stub, clf._metadata
        rtt, server, outs = [], [], []
        for i, ct in enumerate(cts):
            t = time.perf_counter()
            reply = stub.Predict(pb.PredictRequest(model=artifact.name, key_id=key_id, request_id=str(i),
                                                   ciphertext=ct, layout=wire_enum), metadata=md, timeout=120)
            rtt.append((time.perf_counter() - t) * 1000)
            server.append(reply.server_ms)
            outs.append(reply.ciphertexts[0])
        # A new key id on the running server: its first request fetches and loads the key,
        # the next ones find it in every worker.
        fresh = SecretKeys.generate(layout.params)
        fresh_id = clf._keystore.put(fresh.public_bundle()).key_id
        new_rtt, new_server = [], []
        for i, x in enumerate(X[:3]):
            ct = encrypt_one(fresh, x, layout)
            t = time.perf_counter()
            reply = stub.Predict(pb.PredictRequest(model=artifact.name, key_id=fresh_id, request_id=f"new-{i}",
                                                   ciphertext=ct, layout=wire_enum), metadata=md, timeout=120)
            new_rtt.append((time.perf_counter() - t) * 1000)
            new_server.append(reply.server_ms)
        t = time.perf_counter()
        scores = np.array([decrypt_one(secret, c, layout) for c in outs])
        decrypt_ms = (time.perf_counter() - t) * 1000 / len(X)
        # Throughput: everything in one stream, every worker busy.
        t = time.perf_counter()
        clf.decision_function(X)
        stream_s = time.perf_counter() - t
    agree, acc, err = _agreement(artifact, scores, X, y)
    warm_server = server[1:] or server
    warm_rtt = rtt[1:] or rtt
    return {
        "system": "encinfer", "layout": wire, "wire_layout": wire,
        "client_encrypt_ms_per_image": encrypt_ms,
        "server_ms_per_image": statistics.median(warm_server),
        "client_decrypt_ms_per_image": decrypt_ms,
        "e2e_ms_per_image": encrypt_ms + statistics.median(warm_rtt) + decrypt_ms,
        "bytes_up_per_image": sum(map(len, cts)) / len(cts),
        "bytes_down_per_image": sum(map(len, outs)) / len(outs),
        "key_bytes": int(key_bytes), "agreement": agree, "accuracy": acc, "n_images": len(X),
        "max_score_error": err, "workers": workers,
        "cold_rtt_ms": rtt[0], "cold_server_ms": server[0],
        "new_key_rtt_ms": new_rtt, "new_key_server_ms": new_server,
        "warm_rtt_ms_p50": statistics.median(warm_rtt),
        "warm_rtt_ms_p95": float(np.percentile(warm_rtt, 95)),
        "stream_ms_per_image": stream_s * 1000 / len(X),
        "stream_images_per_s": len(X) / stream_s,
        "keygen_upload_ms": keygen_upload_ms,
    }


def bench_batch(stem: str, X: np.ndarray, y: np.ndarray, workers: int = 2) -> dict:
    artifact = load_model(stem)
    with _session(stem, workers, "batch") as clf:
        secret, key_id = clf.keys("batch")
        key_bytes = clf._keystore.stat(key_id).size_bytes
        layout = clf.layout_info("batch")
        chunks = [X[s:s + layout.max_samples] for s in range(0, len(X), layout.max_samples)]
        t = time.perf_counter()
        parts = [list(encrypt_batch(secret, c, layout)) for c in chunks]
        encrypt_ms = (time.perf_counter() - t) * 1000 / len(X)
        messages = [pb.PredictStreamRequest(header=pb.StreamHeader(model=artifact.name, key_id=key_id,
                                                                   layout=pb.LAYOUT_BATCH))]
        window = 4
        for g in range(0, len(chunks), window):
            for position in range(len(layout.feature_indices)):
                for j in range(g, min(g + window, len(chunks))):
                    messages.append(pb.PredictStreamRequest(batch_part=pb.BatchPart(
                        request_id=str(j), position=position, n_samples=len(chunks[j]),
                        ciphertext=parts[j][position])))
        # Pre-encrypted messages: the wall time below is the service's alone.
        t = time.perf_counter()
        answers = list(clf._stub.PredictStream(iter(messages), metadata=clf._metadata, timeout=3600))
        wall_s = time.perf_counter() - t
        bad = [a for a in answers if a.status.code]
        if bad:
            raise RuntimeError(f"batch failed: {bad[0].status.message}")
        t = time.perf_counter()
        by_id = {a.request_id: a for a in answers}
        scores = np.concatenate([decrypt_batch(secret, list(by_id[str(j)].ciphertexts), len(c), layout)
                                 for j, c in enumerate(chunks)])
        decrypt_ms = (time.perf_counter() - t) * 1000 / len(X)
    agree, acc, err = _agreement(artifact, scores, X, y)
    server_ms = wall_s * 1000 / len(X)
    return {
        "system": "encinfer", "layout": "batch",
        "client_encrypt_ms_per_image": encrypt_ms,
        "server_ms_per_image": server_ms,
        "client_decrypt_ms_per_image": decrypt_ms,
        "e2e_ms_per_image": encrypt_ms + server_ms + decrypt_ms,
        "bytes_up_per_image": sum(len(p) for ps in parts for p in ps) / len(X),
        "bytes_down_per_image": sum(len(c) for a in answers for c in a.ciphertexts) / len(X),
        "key_bytes": int(key_bytes), "agreement": agree, "accuracy": acc, "n_images": len(X),
        "max_score_error": err, "workers": workers,
        "samples_per_batch": layout.max_samples, "features_sent": len(layout.feature_indices),
        "images_per_s": len(X) / wall_s,
    }
