"""Three inference replicas and two key-store replicas behind HAProxy (hash on x-encinfer-key-id),
MinIO on loopback: `encinfer stack up --inference-replicas 3 --keystore-replicas 2 --proxy haproxy`.

The scenarios run in file order on one topology: affinity first (all replicas up), then
an inference replica is killed under load, then a key-store replica.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from encinfer.client import EncryptedClassifier
from encinfer.common import errors
from encinfer.scaling import Scale
from encinfer.stack import Stack

from .conftest import fetches_by_replica, need_binaries, owners, sample, tenant, wait_for

pytestmark = pytest.mark.minio

REPLICA_ENV = {"ENCINFER_WORKERS": "1", "ENCINFER_GRACE_SECONDS": "2"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    need_binaries("haproxy")
    work = tmp_path_factory.mktemp("scaled")
    scale = Scale(inference=3, keystore=2, proxy="haproxy")
    names = ["inference", "inference-2", "inference-3"]
    with Stack(work, free_ports=True, scale=scale, env={n: REPLICA_ENV for n in names},
               start_timeout=180, stop_grace=10) as s:
        yield s


@pytest.fixture(scope="module")
def tenants(stack, tmp_path_factory):
    """Eight tenants, each with its own key, each having made one prediction."""
    base = tmp_path_factory.mktemp("tenants")
    out = []
    for i in range(8):
        clf = tenant(stack, base / f"t{i}")
        clf.predict_one(sample(i))
        out.append(clf)
    yield out
    for clf in out:
        clf.close()


def key_id(clf) -> str:
    return clf.keys("latency")[1]


def test_each_key_id_is_fetched_by_exactly_one_replica(stack, tenants):
    for clf in tenants:  # more calls, over new connections too: still no second fetch anywhere
        for j in range(3):
            clf.predict_one(sample(j))
    fetches = fetches_by_replica(stack)
    for clf in tenants:
        assert list(owners(fetches, key_id(clf)).values()) == [1], (key_id(clf), fetches)


def test_key_ids_spread_over_the_replicas(stack, tenants):
    fetches = fetches_by_replica(stack)
    used = {next(iter(owners(fetches, key_id(clf)))) for clf in tenants}
    assert len(used) >= 2, fetches


def test_ring_hash_clients_keep_each_key_on_one_replica_without_a_proxy(stack, tmp_path):
    replicas = "ipv4:" + ",".join(stack.address(r) for r in stack.replicas("inference"))
    clients = [EncryptedClassifier(inference=replicas, keystore=stack.client_address, token=stack.token("demo"),
                                   key_dir=tmp_path / f"rh{i}", layout="latency", routing="ring_hash",
                                   timeout=30) for i in range(3)]
    try:
        for clf in clients:
            for j in range(3):
                clf.predict_one(sample(j))
        fetches = fetches_by_replica(stack)
        for clf in clients:
            assert list(owners(fetches, key_id(clf)).values()) == [1], (key_id(clf), fetches)
    finally:
        for clf in clients:
            clf.close()


def test_a_batch_whose_worker_died_is_sent_again_once(stack, tmp_path, caplog):
    clf = EncryptedClassifier(inference=stack.client_address, keystore=stack.client_address,
                              token=stack.token("demo"), key_dir=tmp_path / "batch", layout="batch", timeout=60)
    X = np.random.default_rng(1).random((16384, 784))
    try:
        clf.keys("batch")
        box: dict = {}
        worker = threading.Thread(target=lambda: box.update(out=clf.predict(X)), daemon=True)
        with caplog.at_level(logging.WARNING, logger="encinfer.client.classifier"):
            worker.start()
            time.sleep(1.5)  # the stream is under way: its batches are in the replicas' workers
            killed = [pid for r in stack.replicas("inference") for pid in worker_pids(stack.pid(r))]
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            worker.join(timeout=120)
        assert not worker.is_alive() and len(box["out"]) == len(X)
        assert killed and "batch stream retried once" in caplog.text
    finally:
        clf.close()


def worker_pids(server_pid: int | None) -> list[int]:
    """The HE worker processes of one inference replica (children, not the resource tracker)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat", "rb").read().decode(errors="replace")
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == server_pid and "resource_tracker" not in cmdline:
            out.append(int(entry))
    return out


def test_killing_an_inference_replica_mid_load_fails_no_prediction(stack, tenants):
    fetches = fetches_by_replica(stack)
    victim = next(iter(owners(fetches, key_id(tenants[0]))))
    moved = [c for c in tenants if victim in owners(fetches, key_id(c))]
    failures: list[BaseException] = []
    durations: list[tuple[float, float]] = []
    done = [0]
    stop = threading.Event()

    def load(clf) -> None:
        i = 0
        while not stop.is_set() and i < 200:  # bounded
            start = time.monotonic()
            try:
                clf.predict_one(sample(i))
                done[0] += 1
                durations.append((start, time.monotonic() - start))
            except BaseException as exc:  # noqa: BLE001 - counted, asserted below
                failures.append(exc)
            i += 1

    loaded = list(dict.fromkeys(tenants[:4] + moved[:2]))
    threads = [threading.Thread(target=load, args=(c,), daemon=True) for c in loaded]
    for t in threads:
        t.start()
    time.sleep(2.0)
    before = done[0]
    stack.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    time.sleep(6.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert failures == [], failures[:3]
    assert done[0] > before, "no prediction after the kill"
    assert time.monotonic() - killed_at < 70
    around = [d for t, d in durations if killed_at - 1.0 <= t <= killed_at + 3.0]
    normal = sorted(d for t, d in durations if t < killed_at - 1.0)
    print(f"kill: {len(around)} calls around it, slowest {max(around, default=0) * 1000:.0f} ms; "
          f"before it p50 {normal[len(normal) // 2] * 1000:.0f} ms")  # measured, for `pytest -s`
    # The victim's keys moved: each has exactly one new owner, which fetched it once.
    after = fetches_by_replica(stack)
    for clf in (c for c in loaded if c in moved):
        new = {r: n for r, n in owners(after, key_id(clf)).items() if r != victim}
        assert list(new.values()) == [1], (key_id(clf), after)


def test_killing_a_key_store_replica_loses_nothing(stack, tenants, tmp_path):
    stack.kill("keystore", signal.SIGKILL)
    # Keys uploaded before are still there (one bucket behind both replicas) and served.
    for clf in tenants[:3]:
        record = clf._keystore.stat(key_id(clf))
        assert record is not None and record.key_id == key_id(clf)
    # A new tenant uploads through the proxy (round robin skips the dead replica) and the
    # inference replica that owns its key fetches it from the surviving one.
    fresh = tenant(stack, tmp_path / "fresh")
    try:
        assert wait_for(lambda: _predicts(fresh), timeout=20), "no prediction with one key store replica"
        assert fresh._keystore.stat(key_id(fresh)) is not None
    finally:
        fresh.close()


def _predicts(clf) -> bool:
    try:
        clf.predict_one(sample(99))
        return True
    except (errors.EncinferError, grpc.RpcError):
        return False
