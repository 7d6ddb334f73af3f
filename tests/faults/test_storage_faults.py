"""Storage faults under the key store: objects altered through S3, bits flipped on MinIO's
disk, a corrupted record, a full spool disk. Real MinIO, real key store (and inference)
processes; every answer is a status a client can act on, within a bound, and the key
store heals without a restart.

What MinIO (single drive) answers for a flipped bit, measured: a GET whose first block
fails its bitrot check gets `503 SlowDownRead` with `Retry-After: 60`; a later block
breaks the body off, after a 200, at the same offset every time.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_procs import metric_value

from faults.conftest import ALICE, BOB, CALL_TIMEOUT, timed

BACKEND_DEADLINE = 5.0   # ENCINFER_KEYSTORE_BACKEND_TIMEOUT in the topology
SLACK = 5.0              # 2 busy cores
BLOCK = 1024 * 1024      # MinIO's erasure block; on one drive each is stored after its 32-byte bitrot hash
HASH = 32
KEYSTORE_SERVICE = "encinfer.v1.KeyStore"


# ---------------------------------------------------------------- helpers

def bundle(galois_steps: tuple[int, ...] = (1, 2)) -> bytes:
    """A fresh, valid public key bundle (N=4096): about 270 KB, plus 135 KB per Galois step."""
    from encinfer.he.params import CkksParams
    from encinfer.he.secret import SecretKeys
    params = CkksParams(poly_modulus_degree=4096, coeff_modulus_bits=(40, 29, 40), input_scale_bits=29,
                        output_scale_bits=29, galois_steps=galois_steps)
    return SecretKeys.generate(params).public_bundle()


def keystore_client(topology, token: str = ALICE):
    from encinfer.client.keystore import KeyStoreClient
    return KeyStoreClient(topology.keystore.address, token=token, timeout=CALL_TIMEOUT,
                          transfer_timeout=CALL_TIMEOUT)


def s3(topology):
    from minio import Minio
    return Minio(topology.minio.endpoint, access_key=topology.minio.access_key,
                 secret_key=topology.minio.secret_key, secure=False)


def health(address: str) -> str:
    with grpc.insecure_channel(address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=KEYSTORE_SERVICE), timeout=CALL_TIMEOUT)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def flip_on_disk(topology, object_name: str, block: int = 0) -> Path:
    """Flips one bit in MinIO's on-disk data of the object, inside data block `block`."""
    root = topology.minio.data_dir / topology.bucket / object_name
    parts = sorted(root.glob("*/part.1"))
    if parts:
        target, offset = parts[0], block * (HASH + BLOCK) + HASH + 100
    else:  # small objects are inlined at the end of xl.meta
        assert block == 0, "an inlined object has one block"
        target = root / "xl.meta"
        offset = target.stat().st_size - 100
    assert offset < target.stat().st_size, f"{target} has no block {block}"
    with open(target, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))
    return target


def damage_logged(proc) -> list[dict]:
    return [e for e in proc.log_lines()
            if e.get("message") == "damaged key found in storage and removed; its owners must upload it again"]


def is_error(result, *names: str) -> bool:
    from encinfer.common import errors
    return isinstance(result, tuple(getattr(errors, n) for n in names))


# ---------------------------------------------------------------- altered through the S3 API

def test_a_key_altered_through_s3_is_data_loss_then_gone_everywhere_and_a_reupload_heals(topology, tmp_path):
    from encinfer import datasets

    X, _ = datasets.default_test_images(1)
    with topology.classifier(tmp_path / "keys") as clf:
        before = clf.predict_one(X[0])
        _, kid = clf.keys("latency")
    with keystore_client(topology) as ks:
        original = ks.get(kid)
        altered = bytearray(original)
        altered[len(altered) // 2] ^= 0x01
        s3(topology).put_object(bucket_name=topology.bucket, object_name=f"keys/{kid}",
                                data=io.BytesIO(bytes(altered)), length=len(altered),
                                metadata={"sha256": kid, "size": str(len(altered))})

        result, seconds = timed(ks.get, kid)
        assert is_error(result, "DataLoss"), result
        assert seconds < BACKEND_DEADLINE + SLACK
        # Stat, List and Get now agree: the key is gone, so a client knows to upload it again.
        assert ks.stat(kid) is None
        assert kid not in [r.key_id for r in ks.list()]
        assert is_error(timed(ks.get, kid)[0], "NotFound")

        assert ks.put(original).key_id == kid
        assert ks.get(kid) == original
    with topology.classifier(tmp_path / "keys") as clf:  # the same key dir: the same secret and key id
        after = clf.predict_one(X[0])
    assert after.argmax() == before.argmax() and np.allclose(after, before, atol=1e-2)
    assert topology.keystore.process.poll() is None and topology.inference.process.poll() is None


# ---------------------------------------------------------------- a bit flipped on MinIO's disk

def test_a_bit_flipped_on_minios_disk_is_data_loss_within_the_deadline_and_a_reupload_heals(topology):
    data = bundle()
    with keystore_client(topology) as ks:
        kid = ks.put(data).key_id
        flip_on_disk(topology, f"keys/{kid}")
        result, seconds = timed(ks.get, kid)
        print(f"\nbit flip in the first block: {type(result).__name__} after {seconds:.3f} s")
        assert is_error(result, "DataLoss"), result
        assert "corrupted" in str(result)
        assert seconds < BACKEND_DEADLINE + SLACK
        assert ks.stat(kid) is None and kid not in [r.key_id for r in ks.list()]
        assert ks.put(data).key_id == kid
        assert ks.get(kid) == data
    [damage] = damage_logged(topology.keystore)
    assert damage["key_id"] == kid and damage["owners"] == ["alice"] and "SlowDownRead" in damage["detail"]


def test_minio_gone_is_unavailable_never_data_loss_and_no_key_is_removed(topology):
    data = bundle()
    with keystore_client(topology) as ks:
        kid = ks.put(data).key_id
        topology.minio.stop()
        try:
            result, seconds = timed(ks.get, kid)
            assert is_error(result, "Unavailable"), result
            assert seconds < BACKEND_DEADLINE + SLACK
        finally:
            topology.minio.start()
        assert wait_until(lambda: not isinstance(timed(ks.get, kid)[0], Exception), timeout=15)
        assert ks.get(kid) == data and ks.stat(kid).key_id == kid
    assert damage_logged(topology.keystore) == []


def test_a_bit_flipped_in_a_later_block_is_data_loss_not_unavailable(topology):
    data = bundle(galois_steps=tuple(range(1, 11)))  # > 1 MiB: the flip breaks the body off mid-stream
    assert len(data) > BLOCK + 1000
    with keystore_client(topology) as ks:
        kid = ks.put(data).key_id
        flip_on_disk(topology, f"keys/{kid}", block=1)
        result, seconds = timed(ks.get, kid)
        print(f"\nbit flip in the second block: {type(result).__name__} after {seconds:.3f} s")
        assert is_error(result, "DataLoss"), result
        assert seconds < BACKEND_DEADLINE + SLACK
        assert ks.stat(kid) is None
        assert ks.put(data).key_id == kid and ks.get(kid) == data
    [damage] = damage_logged(topology.keystore)
    assert f"at byte {BLOCK}" in damage["detail"], damage  # resumed there once, broken there again


def test_twenty_reads_of_a_corrupt_key_starve_neither_other_keys_nor_health(topology):
    bad_data, good_data = bundle(), bundle()
    with keystore_client(topology) as alice, keystore_client(topology, BOB) as bob:
        bad = alice.put(bad_data).key_id
        good = bob.put(good_data).key_id
        flip_on_disk(topology, f"keys/{bad}")

        statuses: list[str] = []
        done = threading.Event()

        def poll_health() -> None:
            while not done.is_set():
                statuses.append(health(topology.keystore.address))
                time.sleep(0.1)

        start = threading.Barrier(21)

        def bad_read():
            start.wait(timeout=CALL_TIMEOUT)
            return timed(alice.get, bad)

        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
            futures = [pool.submit(bad_read) for _ in range(20)]
            start.wait(timeout=CALL_TIMEOUT)
            time.sleep(0.2)  # the bad reads are at storage by now
            other, other_s = timed(bob.get, good)
            stat, stat_s = timed(bob.stat, good)
            bad_results = [f.result(timeout=CALL_TIMEOUT * 2) for f in futures]
        time.sleep(0.3)
        done.set()
        poller.join(timeout=CALL_TIMEOUT)

    worst = max(s for _, s in bad_results)
    print(f"\n20 reads of a corrupt key: worst {worst:.3f} s, "
          f"{sum(is_error(r, 'DataLoss') for r, _ in bad_results)} DATA_LOSS, "
          f"{sum(is_error(r, 'NotFound') for r, _ in bad_results)} NOT_FOUND; "
          f"another key's read meanwhile {other_s:.3f} s, its stat {stat_s:.3f} s; health {set(statuses)}")
    assert other == good_data and other_s < BACKEND_DEADLINE
    assert stat is not None and stat.key_id == good and stat_s < BACKEND_DEADLINE
    # The first readers share one download and its DATA_LOSS; the key is then gone (NOT_FOUND).
    assert all(is_error(r, "DataLoss", "NotFound") for r, _ in bad_results), bad_results
    assert any(is_error(r, "DataLoss") for r, _ in bad_results)
    assert worst < BACKEND_DEADLINE + SLACK
    assert statuses and set(statuses) == {"SERVING"}, statuses


# ---------------------------------------------------------------- bounded work per key id (in process)

class GatedFsStore:
    """The filesystem backend, with reads of chosen objects held until a gate opens; counts opens."""

    def __init__(self, root: Path) -> None:
        from encinfer.keystore.storage import FsObjectStore
        self._inner = FsObjectStore(root)
        self.held: set[str] = set()
        self.gate = threading.Event()
        self.opens: dict[str, int] = {}
        self.waiting = 0

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def open(self, name: str):
        self.opens[name] = self.opens.get(name, 0) + 1
        if name in self.held:
            self.waiting += 1
            self.gate.wait(CALL_TIMEOUT)
        return self._inner.open(name)


@pytest.fixture
def gated_keystore(tmp_path):
    """An in-process key store (fs backend, fake key parser) over a GatedFsStore."""
    from conftest import fake_inspect

    from encinfer.keystore.config import KeyStoreConfig
    from encinfer.keystore.server import BackgroundKeyStore
    from encinfer.keystore.store import KeyStore

    config = KeyStoreConfig(address="127.0.0.1:0", data_dir=tmp_path / "ks", health_interval=0.2, backend_timeout=2.0)
    backend = GatedFsStore(config.data_dir)
    ks = BackgroundKeyStore(config, lambda cfg: KeyStore(backend, cfg, inspect=fake_inspect))
    try:
        yield ks, backend
    finally:
        backend.gate.set()
        ks.stop()


def local_client(ks):
    from encinfer.client.keystore import KeyStoreClient
    return KeyStoreClient(ks.target, timeout=CALL_TIMEOUT, transfer_timeout=CALL_TIMEOUT)


def test_concurrent_reads_of_one_key_share_one_storage_read(gated_keystore):
    from conftest import fake_key

    ks, backend = gated_keystore
    slow, other = fake_key(300_000), fake_key(300_000)
    with local_client(ks) as client:
        slow_id, other_id = client.put(slow).key_id, client.put(other).key_id
        backend.held.add(f"keys/{slow_id}")
        with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
            reads = [pool.submit(client.get, slow_id) for _ in range(20)]
            assert wait_until(lambda: backend.waiting >= 1, timeout=CALL_TIMEOUT)
            time.sleep(0.5)  # time for 19 more storage reads, if they were to start
            assert backend.opens[f"keys/{slow_id}"] == 1
            got, seconds = timed(client.get, other_id)
            assert got == other and seconds < 2.0
            backend.gate.set()
            assert all(r.result(timeout=CALL_TIMEOUT) == slow for r in reads)
    assert backend.opens[f"keys/{slow_id}"] == 1
    assert wait_until(lambda: not list((ks.store.spool_dir).glob("get-*")), timeout=5)  # the shared file went


def test_health_does_not_queue_behind_storage_calls_that_hang(gated_keystore):
    from conftest import fake_key

    ks, backend = gated_keystore
    with local_client(ks) as client:
        ids = [client.put(fake_key(10_000)).key_id for _ in range(18)]  # more than the 16 storage threads
        backend.held.update(f"keys/{kid}" for kid in ids)
        with concurrent.futures.ThreadPoolExecutor(max_workers=18) as pool:
            reads = [pool.submit(timed, client.get, kid) for kid in ids]
            assert wait_until(lambda: backend.waiting >= 16, timeout=CALL_TIMEOUT)
            statuses = []
            for _ in range(15):  # 3 s: longer than the 2 s backend deadline a queued probe would hit
                statuses.append(health(ks.target))
                time.sleep(0.2)
            assert set(statuses) == {"SERVING"}, statuses
            # Every read the storage holds answers UNAVAILABLE at its deadline, not later.
            results = [r.result(timeout=CALL_TIMEOUT) for r in reads]
            assert all(is_error(res, "Unavailable") and seconds < 2.0 + 2 * SLACK for res, seconds in results), results


# ---------------------------------------------------------------- a corrupted record

@pytest.mark.parametrize("how", ["garbage written through S3", "a bit flipped on disk"])
def test_a_corrupted_record_is_data_loss_on_stat_left_out_of_list_and_deleted_for_real(topology, how):
    from encinfer.keystore.store import encode_owner

    data = bundle()
    with keystore_client(topology) as ks:
        kid = ks.put(data).key_id
        record = f"owners/{encode_owner('alice')}/{kid}"
        if how == "a bit flipped on disk":
            flip_on_disk(topology, record)
        else:
            garbage = b"{not json at all"
            s3(topology).put_object(bucket_name=topology.bucket, object_name=record,
                                    data=io.BytesIO(garbage), length=len(garbage))
        for _ in range(2):  # the same answer every time, not once
            result = timed(ks.stat, kid)[0]
            assert is_error(result, "DataLoss"), result
        assert kid not in [r.key_id for r in ks.list()]
        assert is_error(timed(ks.get, kid)[0], "DataLoss")
        assert ks.delete(kid) is True  # the corrupted record was removed: that is a delete
        assert ks.stat(kid) is None
        assert ks.put(data).key_id == kid and ks.get(kid) == data


def test_an_upload_overwrites_a_corrupted_record(topology):
    from encinfer.keystore.store import encode_owner

    data = bundle()
    with keystore_client(topology) as ks:
        kid = ks.put(data).key_id
        s3(topology).put_object(bucket_name=topology.bucket, object_name=f"owners/{encode_owner('alice')}/{kid}",
                                data=io.BytesIO(b"\x00garbage"), length=8)
        assert ks.put(data).key_id == kid
        assert ks.stat(kid).key_id == kid and ks.get(kid) == data


# ---------------------------------------------------------------- a full spool disk

@pytest.fixture
def small_disk(tmp_path):
    """A 5 MB tmpfs, unmounted afterwards (skipped where mounting is not allowed)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def spool_files(disk: Path) -> list[str]:
    spool = disk / "tmp"
    return sorted(p.name for p in spool.iterdir()) if spool.exists() else []


def free_bytes(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves about `leave` bytes free on the disk."""
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free_bytes(disk) - leave))
    return ballast


def raw_put_without_size(address: str, token: str, data: bytes, chunk: int = 1024 * 1024):
    """PutKeys with expected_size 0 (unknown), so only the spool write can find the disk full."""
    from encinfer.v1 import keystore_pb2 as pb
    from encinfer.v1 import keystore_pb2_grpc as pb_grpc

    def requests():
        yield pb.PutKeysRequest(header=pb.PutKeysHeader())
        for i in range(0, len(data), chunk):
            yield pb.PutKeysRequest(chunk=data[i:i + chunk])
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.KeyStoreStub(ch).PutKeys(requests(), metadata=[("authorization", f"Bearer {token}")],
                                                timeout=CALL_TIMEOUT)


def test_a_full_spool_disk_is_resource_exhausted_visible_in_health_and_leaves_nothing(bare_topology, small_disk):
    from conftest import free_port

    topo = bare_topology
    metrics_port = free_port()
    topo.start_keystore(ENCINFER_KEYSTORE_DATA_DIR=str(small_disk), ENCINFER_METRICS_PORT=str(metrics_port))
    ks_proc = topo.keystore
    too_big = os.urandom(6 * 1024 * 1024)  # more than the disk holds; refused before any parse
    small = bundle()
    with keystore_client(topo) as ks:
        # Announced size over the free space: refused before a byte is written.
        result, seconds = timed(ks.put, too_big)
        assert is_error(result, "ResourceExhausted"), result
        assert f"key store spool disk full at {small_disk}" in str(result) and seconds < CALL_TIMEOUT
        # Size not announced: the write hits ENOSPC, the partial spool file goes.
        with pytest.raises(grpc.RpcError) as raised:
            raw_put_without_size(ks_proc.address, ALICE, too_big)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "spool disk full" in raised.value.details()
        assert spool_files(small_disk) == []
        assert metric_value(ks_proc.metrics(), "encinfer_keystore_spool_full_total") >= 2

        kid = ks.put(small).key_id  # the disk has room for a small key: uploads still work
        ballast = fill(small_disk, leave=64 * 1024)
        try:
            # A cold download that cannot be spooled is RESOURCE_EXHAUSTED too, and health says why.
            assert is_error(timed(ks.get, kid)[0], "ResourceExhausted")
            assert spool_files(small_disk) == []
            assert wait_until(lambda: health(ks_proc.address) == "NOT_SERVING", timeout=10)
            assert any("spool disk full" in e.get("message", "") for e in ks_proc.log_lines())
            assert metric_value(ks_proc.metrics(), "encinfer_keystore_spool_free_bytes") < 1024 * 1024
        finally:
            ballast.unlink()
        # Space freed: SERVING again, without a restart, and uploads and downloads work.
        assert wait_until(lambda: health(ks_proc.address) == "SERVING", timeout=10)
        assert ks.get(kid) == small
        other = bundle()
        assert ks.put(other).key_id == hashlib.sha256(other).hexdigest()
    assert spool_files(small_disk) == [] and ks_proc.process.poll() is None
    ks_proc.stop()  # before the fixture unmounts the disk it uses
