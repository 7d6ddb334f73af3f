"""The object-store contract both backends keep, and the clean-up the core builds on it."""
from __future__ import annotations

import hashlib
import os
import time

import pytest
from conftest import FakeClock, fake_inspect, fake_key, unique_bucket
from minio_front import MinioFront, busy_reads, busy_writes, degraded_without

from encinfer.client.keystore import KeyStoreClient
from encinfer.common.errors import InvalidArgument, Unavailable
from encinfer.keystore.config import S3Settings
from encinfer.keystore.storage import FsObjectStore, S3ObjectStore


@pytest.fixture(params=["fs", pytest.param("s3", marks=pytest.mark.minio)])
def store(request, tmp_path):
    if request.param == "fs":
        backend = FsObjectStore(tmp_path / "objects")
    else:
        m = request.getfixturevalue("minio_server")
        backend = S3ObjectStore(S3Settings(endpoint=m.endpoint, access_key=m.access_key, secret_key=m.secret_key,
                                           bucket=unique_bucket()), timeout=2.0)
    backend.ensure_ready()
    yield backend
    backend.close()


def test_an_object_reads_back_with_its_size_and_metadata(store):
    store.put_bytes("a/b", b"hello", {"sha256": "x", "size": "5"})
    info = store.head("a/b")
    assert store.read_bytes("a/b") == b"hello"
    assert (info.size, info.metadata) == (5, {"sha256": "x", "size": "5"})


def test_a_big_file_streams_in_and_out(store, tmp_path):
    data = os.urandom(20 * 1024 * 1024 + 17)  # more than one 16 MiB multipart part
    (tmp_path / "big").write_bytes(data)
    store.put_file("keys/big", tmp_path / "big", len(data), {})
    reader = store.open("keys/big")
    try:
        out = b"".join(iter(lambda: reader.read(1 << 20), b""))
    finally:
        reader.close()
    assert hashlib.sha256(out).digest() == hashlib.sha256(data).digest()
    assert (tmp_path / "big").exists()  # the caller's file stays readable


def test_missing_objects_are_none_and_deleting_them_is_fine(store):
    assert store.head("nope") is None and store.read_bytes("nope") is None and store.open("nope") is None
    store.delete("nope")


def test_list_is_sorted_after_a_start_and_limited(store):
    for name in ("p/c", "p/a", "p/b", "q/a"):
        store.put_bytes(name, b"", {})
    assert store.list("p/") == ["p/a", "p/b", "p/c"]
    assert store.list("p/", start_after="p/a") == ["p/b", "p/c"]
    assert store.list("p/", limit=1) == ["p/a"]
    store.delete("p/b")
    assert store.list("") == ["p/a", "p/c", "q/a"]


def test_fs_names_cannot_leave_the_store(tmp_path):
    store = FsObjectStore(tmp_path / "s")
    store.ensure_ready()
    with pytest.raises(InvalidArgument):
        store.put_bytes("../escape", b"x", {})
    assert not (tmp_path / "escape").exists()


def test_an_fs_object_without_its_sidecar_does_not_exist(tmp_path):
    store = FsObjectStore(tmp_path / "s")
    store.ensure_ready()
    (store.objects / "half").write_bytes(b"a write interrupted before its metadata")
    assert store.head("half") is None and store.list("") == []


def test_an_unreachable_s3_is_unavailable_not_a_hang(tmp_path):
    from conftest import free_port
    store = S3ObjectStore(S3Settings(endpoint=f"127.0.0.1:{free_port()}", access_key="a", secret_key="b"),
                          timeout=1.0)
    with pytest.raises(Unavailable):
        store.check()
    with pytest.raises(Unavailable):
        store.head("x")


def front_store(front, minio_server, timeout: float) -> S3ObjectStore:
    store = S3ObjectStore(S3Settings(endpoint=front.endpoint, access_key=minio_server.access_key,
                                     secret_key=minio_server.secret_key, bucket=unique_bucket()), timeout=timeout)
    store.ensure_ready()
    return store


@pytest.mark.minio
@pytest.mark.parametrize("code", ["SlowDownWrite", "XMinioServerNotInitialized"])
def test_a_write_minio_cannot_take_for_a_moment_is_retried_within_the_deadline(minio_server, code):
    with MinioFront(minio_server.endpoint, busy_writes(4, code)) as front:
        store = front_store(front, minio_server, timeout=5.0)
        store.put_bytes("keys/k", b"payload", {"kind": "test"})
        assert store.read_bytes("keys/k") == b"payload"
    assert [c for _, _, c in front.refused] == [code] * 4


@pytest.mark.minio
def test_a_write_minio_keeps_refusing_is_unavailable_with_its_reason_within_the_deadline(minio_server):
    with MinioFront(minio_server.endpoint, busy_writes(10_000)) as front:
        store = front_store(front, minio_server, timeout=1.0)
        start = time.monotonic()
        with pytest.raises(Unavailable, match="SlowDownWrite"):
            store.put_bytes("keys/k", b"payload", {})
        assert time.monotonic() - start < 3.0  # the 1 s deadline, not an endless retry
    assert 2 <= len(front.refused) <= 20


@pytest.mark.minio
def test_an_object_unreadable_for_a_moment_is_read_and_never_called_corrupt(minio_server):
    """SlowDownRead is also what a corrupt object answers; for a few seconds after a node dies it
    is what a sound one answers too: only an answer that lasts makes the object corrupt."""
    with MinioFront(minio_server.endpoint, busy_reads(4)) as front:
        store = front_store(front, minio_server, timeout=5.0)
        store.put_bytes("keys/k", b"payload", {})
        assert store.read_bytes("keys/k") == b"payload"
    assert [c for _, _, c in front.refused] == ["SlowDownRead"] * 4


@pytest.mark.minio
def test_bytes_a_degraded_minio_cannot_find_are_unavailable_and_the_key_is_kept(minio_server, keystore_factory):
    """A distributed MinIO missing nodes has answered "no such object" for a key's bytes it held:
    while its health says it lacks a write quorum that is UNAVAILABLE, never DATA_LOSS and removal."""
    from encinfer.common.errors import DataLoss

    refuse: list = [lambda method, path: None]
    with MinioFront(minio_server.endpoint, lambda method, path: refuse[0](method, path)) as front:
        ks = keystore_factory("s3", minio=type("Endpoint", (), {
            "endpoint": front.endpoint, "access_key": minio_server.access_key,
            "secret_key": minio_server.secret_key})(), tokens="t1=alice:tenant", inspect=fake_inspect)
        with KeyStoreClient(ks.target, token="t1", timeout=10, transfer_timeout=10) as client:
            data = fake_key()
            kid = client.put(data).key_id
            refuse[0] = degraded_without({f"keys/{kid}"})
            with pytest.raises(Unavailable, match="degraded"):
                client.get(kid)
            refuse[0] = lambda method, path: None  # the nodes are back
            assert client.get(kid) == data and client.stat(kid).key_id == kid
            # Once the cluster is whole, bytes that are really gone are DATA_LOSS (and the key removed).
            refuse[0] = lambda method, path: "NoSuchKey" if method == "GET" and path.split("?")[0].endswith(
                f"/keys/{kid}") else None
            with pytest.raises(DataLoss):
                client.get(kid)


def test_an_invalid_bucket_name_stops_the_service_at_start():
    from encinfer.common.errors import ConfigError
    with pytest.raises(ConfigError, match="ENCINFER_S3_BUCKET"):
        S3ObjectStore(S3Settings(bucket="b1"), timeout=1.0)  # too short


# ------------------------------------------------------------------ clean-up of leftovers


@pytest.fixture(params=["fs", pytest.param("s3", marks=pytest.mark.minio)])
def ks_with_clock(request, keystore_factory):
    clock = FakeClock()
    kwargs = {"minio": request.getfixturevalue("minio_server")} if request.param == "s3" else {}
    ks = keystore_factory(request.param, tokens="alice-t=alice:tenant", inspect=fake_inspect, clock=clock, **kwargs)
    return ks, clock


def test_cleanup_removes_leftovers_of_interrupted_uploads_once_they_are_old(ks_with_clock):
    ks, clock = ks_with_clock
    backend = ks.store.backend
    with KeyStoreClient(ks.target, token="alice-t") as alice:
        kept = alice.put(fake_key()).key_id
    orphan = "ab" * 32
    backend.put_bytes(f"keys/{orphan}", b"bytes whose upload never finished", {})
    backend.put_bytes(f"refs/{'cd' * 32}/alice", b"", {})
    assert ks.call(ks.store.cleanup())["orphan_blobs"] == 0  # too young: might be an upload in flight
    clock.advance(3600)
    counts = ks.call(ks.store.cleanup())
    assert (counts["orphan_blobs"], counts["orphan_refs"]) == (1, 1)
    assert backend.list("keys/") == [f"keys/{kept}"] and backend.list("refs/") == [f"refs/{kept}/alice"]


def test_cleanup_removes_stale_spool_files(ks_with_clock):
    ks, _ = ks_with_clock
    stale, fresh = ks.store.spool_dir / "put-stale", ks.store.spool_dir / "put-fresh"
    stale.write_bytes(b"x"), fresh.write_bytes(b"y")
    old = time.time() - 2 * 86400
    os.utime(stale, (old, old))
    assert ks.call(ks.store.cleanup())["spool_files"] == 1
    assert not stale.exists() and fresh.exists()


# ------------------------------------------------------------------ storage requests per operation

class CountingStore:
    """An ObjectStore that counts every call made to it, by name."""

    def __init__(self, backend) -> None:
        self.backend, self.calls = backend, []

    def __getattr__(self, name):
        attr = getattr(self.backend, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)
        return call


def test_a_first_fetch_for_a_named_owner_is_two_storage_reads_and_an_upload_reads_its_record_once(tmp_path):
    import asyncio

    from encinfer.common.auth import Principal
    from encinfer.keystore.config import KeyStoreConfig
    from encinfer.keystore.store import KeyStore, PutHeader

    config = KeyStoreConfig(data_dir=tmp_path)
    counting = CountingStore(FsObjectStore(tmp_path / "objects"))
    store = KeyStore(counting, config, inspect=fake_inspect)
    alice, service = Principal("alice", "tenant"), Principal("inference", "service")
    data = fake_key(10_000)

    async def chunks():
        yield data

    async def scenario() -> None:
        await store._io(counting.backend.ensure_ready)
        counting.calls.clear()
        record = await store.put(alice, PutHeader(), chunks())
        assert counting.calls.count("read_bytes") == 1  # the owner's record, once
        counting.calls.clear()
        async with await store.fetch(service, record.key_id, "alice") as key:
            assert b"".join([c async for c in key.chunks()]) == data
        assert counting.calls == ["read_bytes", "open"], counting.calls  # the record, then the bytes
    try:
        asyncio.run(scenario())
    finally:
        store.close()
