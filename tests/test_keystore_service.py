"""The key store's behaviour over gRPC, the same suite on both backends (fs, and s3 on real MinIO).

Key parsing is replaced by `fake_inspect` here (storage behaviour only); the real
parser's verdicts are in test_keystore_validation.py.
"""
from __future__ import annotations

import hashlib
import threading

import grpc
import pytest
from conftest import FakeClock, fake_inspect, fake_key, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encinfer.client.keystore import KeyStoreClient
from encinfer.common import errors
from encinfer.common.auth import auth_metadata
from encinfer.v1 import keystore_pb2 as pb
from encinfer.v1 import keystore_pb2_grpc as pb_grpc

TOKENS = "alice-t=alice:tenant,bob-t=bob:tenant,svc-t=inference:service"
MIB = 1024 * 1024
DAY = 86400


@pytest.fixture(params=["fs", pytest.param("s3", marks=pytest.mark.minio)])
def backend(request):
    return request.param


@pytest.fixture
def start(backend, request, keystore_factory):
    """start(**config_overrides) -> a running key store on this test's backend."""
    def make(**overrides):
        if backend == "s3":
            overrides["minio"] = request.getfixturevalue("minio_server")
        overrides.setdefault("inspect", fake_inspect)
        return keystore_factory(backend, tokens=TOKENS, **overrides)
    return make


@pytest.fixture
def ks(start):
    return start()


def _client(ks, token: str):
    with KeyStoreClient(ks.target, token=token) as c:
        yield c


@pytest.fixture
def alice(ks):
    yield from _client(ks, "alice-t")


@pytest.fixture
def bob(ks):
    yield from _client(ks, "bob-t")


@pytest.fixture
def service(ks):
    yield from _client(ks, "svc-t")


@pytest.fixture
def stub(ks):
    ch = grpc.insecure_channel(ks.target)
    yield pb_grpc.KeyStoreStub(ch)
    ch.close()


def objects(ks, prefix: str) -> list[str]:
    return ks.store.backend.list(prefix)


def spool_files(ks) -> list[str]:
    return [p.name for p in ks.store.spool_dir.iterdir() if p.name.startswith(("put-", "get-"))]


def put_requests(header: pb.PutKeysHeader | None, chunks: list[bytes]):
    if header is not None:
        yield pb.PutKeysRequest(header=header)
    for c in chunks:
        yield pb.PutKeysRequest(chunk=c)


def rpc_code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


# ------------------------------------------------------------------ upload and download


def test_put_names_the_key_by_the_sha256_of_its_bytes(alice):
    data = fake_key(5000)
    record = alice.put(data, labels={"model": "mnist"})
    assert record.key_id == hashlib.sha256(data).hexdigest() == record.sha256
    assert record.size_bytes == 5000 and record.owner == "alice" and record.labels == {"model": "mnist"}


def test_put_records_the_parsed_parameters(alice):
    p = alice.put(fake_key()).parameters
    assert (p.scheme, p.poly_modulus_degree, p.coeff_modulus_bits) == ("ckks", 4096, (40, 29, 40))
    assert p.galois_steps == (1, 2) and p.has_public_key and not p.has_relin_keys


def test_get_returns_the_uploaded_bytes_across_many_chunks(alice):
    data = fake_key(2 * MIB + 123)
    record = alice.put(data)
    assert alice.get(record.key_id) == data


def test_get_to_a_file_writes_the_verified_bytes(alice, tmp_path):
    data = fake_key(MIB + 1)
    record = alice.put(data)
    out = tmp_path / "out"
    out.mkdir()
    path = alice.get(record.key_id, dest=out / "copy.bin")
    assert path.read_bytes() == data
    assert [p.name for p in out.iterdir()] == ["copy.bin"]


def test_put_streams_a_file_from_disk(alice, tmp_path):
    data = fake_key(3 * MIB)
    (tmp_path / "keys.bin").write_bytes(data)
    seen = []
    record = alice.put(tmp_path / "keys.bin", progress=seen.append)
    assert record.key_id == hashlib.sha256(data).hexdigest() and sum(seen) == len(data)


def test_progress_reports_every_downloaded_byte(alice):
    data = fake_key(MIB + 7)
    record = alice.put(data)
    seen = []
    alice.get(record.key_id, progress=seen.append)
    assert sum(seen) == len(data)


def test_the_same_bytes_twice_give_one_id_and_one_stored_object(ks, alice):
    data = fake_key()
    first, second = alice.put(data), alice.put(data)
    assert first.key_id == second.key_id
    assert objects(ks, "keys/") == [f"keys/{first.key_id}"]
    assert [r.key_id for r in alice.list()] == [first.key_id]


def test_uploading_again_renews_expiry_and_keeps_created(start):
    clock = FakeClock()
    ks = start(clock=clock)
    with KeyStoreClient(ks.target, token="alice-t") as alice:
        data = fake_key()
        first = alice.put(data, ttl_seconds=3600)
        clock.advance(1800)
        again = alice.put(data, ttl_seconds=3600, labels={"v": "2"})
    assert again.created == first.created
    assert again.expires - first.expires == pytest.approx(1800, abs=1)
    assert again.labels == {"v": "2"}


def test_default_expiry_applies_when_ttl_is_zero(start):
    ks = start(default_ttl=1000)
    with KeyStoreClient(ks.target, token="alice-t") as alice:
        record = alice.put(fake_key())
    assert record.expires - record.created == pytest.approx(1000, abs=1)


def test_stat_tells_presence_and_expiry_cheaply(alice):
    record = alice.put(fake_key(), ttl_seconds=7200)
    stat = alice.stat(record.key_id)
    assert stat == record and 7000 < stat.expires_in() <= 7200


def test_stat_of_an_unknown_key_is_none(alice):
    assert alice.stat("ab" * 32) is None


def test_get_of_an_unknown_key_is_not_found(alice):
    with pytest.raises(errors.NotFound):
        alice.get("ab" * 32)


@pytest.mark.parametrize("bad", ["", "xyz", "ab" * 31, "ab" * 33, "g" * 64, "../" * 21 + "a"])
def test_malformed_key_ids_are_invalid_argument(stub, bad):
    md = auth_metadata("alice-t")
    assert rpc_code(lambda: stub.StatKeys(pb.StatKeysRequest(key_id=bad), metadata=md)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(lambda: list(stub.GetKeys(pb.GetKeysRequest(key_id=bad), metadata=md))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(lambda: stub.DeleteKeys(pb.DeleteKeysRequest(key_id=bad), metadata=md)) == \
        grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ delete


def test_delete_removes_the_key_and_its_bytes(ks, alice):
    record = alice.put(fake_key())
    assert alice.delete(record.key_id) is True
    assert alice.stat(record.key_id) is None
    assert objects(ks, "keys/") == [] and objects(ks, "owners/") == [] and objects(ks, "refs/") == []


def test_delete_of_a_key_you_do_not_have_returns_false(alice):
    assert alice.delete("cd" * 32) is False


# ------------------------------------------------------------------ owners and roles


def test_another_owners_key_is_not_found_as_if_unknown(alice, bob):
    record = alice.put(fake_key())
    assert bob.stat(record.key_id) is None
    with pytest.raises(errors.NotFound) as info:
        bob.get(record.key_id)
    assert "not yours" in str(info.value)
    assert bob.delete(record.key_id) is False
    assert alice.get(record.key_id)  # untouched


def test_service_role_reads_any_owners_key(alice, service):
    data = fake_key()
    record = alice.put(data)
    assert service.stat(record.key_id).owner == "alice"
    assert service.get(record.key_id) == data


def test_service_role_lists_only_its_own_keys(alice, service):
    alice.put(fake_key())
    assert list(service.list()) == []


def test_identical_bytes_from_two_owners_share_one_object_with_separate_records(ks, alice, bob):
    data = fake_key()
    a, b = alice.put(data, labels={"who": "a"}), bob.put(data, labels={"who": "b"})
    assert a.key_id == b.key_id and (a.owner, b.owner) == ("alice", "bob")
    assert objects(ks, "keys/") == [f"keys/{a.key_id}"]
    assert alice.delete(a.key_id)
    assert alice.stat(a.key_id) is None
    assert bob.get(b.key_id) == data and bob.stat(b.key_id).labels == {"who": "b"}
    assert bob.delete(b.key_id)
    assert objects(ks, "keys/") == []


def test_list_shows_only_your_keys_page_by_page(stub, alice, bob):
    mine = sorted(alice.put(fake_key()).key_id for _ in range(5))
    bob.put(fake_key())
    md = auth_metadata("alice-t")
    pages, token = [], ""
    for _ in range(10):
        reply = stub.ListKeys(pb.ListKeysRequest(page_size=2, page_token=token), metadata=md)
        pages.append([k.key_id for k in reply.keys])
        token = reply.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [k for p in pages for k in p] == mine
    assert [r.key_id for r in alice.list(page_size=3)] == mine


def test_malformed_page_token_is_invalid_argument(stub):
    code = rpc_code(lambda: stub.ListKeys(pb.ListKeysRequest(page_token="not-a-token"),
                                          metadata=auth_metadata("alice-t")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_missing_token_is_unauthenticated(ks):
    with KeyStoreClient(ks.target) as anonymous:
        with pytest.raises(errors.Unauthenticated):
            anonymous.put(fake_key())
        with pytest.raises(errors.Unauthenticated):
            list(anonymous.list())


def test_wrong_token_is_unauthenticated(ks):
    with KeyStoreClient(ks.target, token="guess") as stranger:
        with pytest.raises(errors.Unauthenticated):
            stranger.stat("ab" * 32)


# ------------------------------------------------------------------ limits


def test_owner_key_limit_is_resource_exhausted_but_renewal_still_works(start):
    ks = start(max_keys_per_owner=2)
    with KeyStoreClient(ks.target, token="alice-t") as alice, KeyStoreClient(ks.target, token="bob-t") as bob:
        first = fake_key()
        alice.put(first), alice.put(fake_key())
        with pytest.raises(errors.ResourceExhausted):
            alice.put(fake_key())
        alice.put(first)      # renewing a key already held is not a new key
        bob.put(fake_key())   # the limit is per owner
        assert len(list(alice.list())) == 2


def test_ttl_above_the_maximum_is_invalid_argument(start):
    ks = start(max_ttl=3600, default_ttl=60)
    with KeyStoreClient(ks.target, token="alice-t") as alice:
        with pytest.raises(errors.InvalidArgument):
            alice.put(fake_key(), ttl_seconds=3601)
        assert list(alice.list()) == []


@pytest.mark.parametrize("labels", [{"": "x"}, {"bad key!": "x"}, {"k": "v" * 257},
                                    {f"k{i}": "v" for i in range(33)}])
def test_bad_labels_are_invalid_argument(alice, labels):
    with pytest.raises(errors.InvalidArgument):
        alice.put(fake_key(), labels=labels)


def test_expired_keys_are_invisible_and_cleaned_up(start):
    clock = FakeClock()
    ks = start(clock=clock)
    with KeyStoreClient(ks.target, token="alice-t") as alice, KeyStoreClient(ks.target, token="svc-t") as svc:
        short, long = alice.put(fake_key(), ttl_seconds=60), alice.put(fake_key(), ttl_seconds=DAY)
        clock.advance(61)
        assert alice.stat(short.key_id) is None and svc.stat(short.key_id) is None
        with pytest.raises(errors.NotFound):
            alice.get(short.key_id)
        assert [r.key_id for r in alice.list()] == [long.key_id]
        counts = ks.call(ks.store.cleanup())
    assert counts["expired"] == 1
    assert objects(ks, "keys/") == [f"keys/{long.key_id}"]


# ------------------------------------------------------------------ bad input


def test_random_bytes_are_invalid_argument_and_nothing_is_stored(ks, alice):
    import os
    with pytest.raises(errors.InvalidArgument):
        alice.put(os.urandom(10_000))
    assert objects(ks, "") == [] and spool_files(ks) == []


def test_an_empty_upload_is_invalid_argument(stub):
    code = rpc_code(lambda: stub.PutKeys(put_requests(pb.PutKeysHeader(), []), metadata=auth_metadata("alice-t")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_stream_without_header_is_invalid_argument(ks, stub):
    code = rpc_code(lambda: stub.PutKeys(put_requests(None, [fake_key()]), metadata=auth_metadata("alice-t")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert objects(ks, "") == []


def test_a_second_header_is_invalid_argument(ks, stub):
    def requests():
        yield pb.PutKeysRequest(header=pb.PutKeysHeader())
        yield pb.PutKeysRequest(chunk=fake_key())
        yield pb.PutKeysRequest(header=pb.PutKeysHeader())
    with pytest.raises(grpc.RpcError) as info:
        stub.PutKeys(requests(), metadata=auth_metadata("alice-t"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "second header" in info.value.details()
    assert objects(ks, "") == [] and spool_files(ks) == []


def test_a_chunk_over_1_mib_is_invalid_argument(ks, stub):
    code = rpc_code(lambda: stub.PutKeys(put_requests(pb.PutKeysHeader(), [fake_key(MIB + 1)]),
                                         metadata=auth_metadata("alice-t")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert objects(ks, "") == []


def test_a_message_over_grpcs_4_mib_limit_is_resource_exhausted(ks, stub):
    code = rpc_code(lambda: stub.PutKeys(put_requests(pb.PutKeysHeader(), [fake_key(5 * MIB)]),
                                         metadata=auth_metadata("alice-t")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # gRPC itself refused the message, so the handler may still be unwinding: wait for it.
    assert wait_until(lambda: spool_files(ks) == []) and objects(ks, "") == []


def test_a_stream_shorter_than_expected_size_is_invalid_argument(ks, stub):
    data = fake_key(MIB)
    header = pb.PutKeysHeader(expected_size=2 * MIB)
    with pytest.raises(grpc.RpcError) as info:
        stub.PutKeys(put_requests(header, [data]), metadata=auth_metadata("alice-t"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in info.value.details()
    assert objects(ks, "") == [] and spool_files(ks) == []


def test_a_stream_longer_than_expected_size_is_invalid_argument(stub):
    header = pb.PutKeysHeader(expected_size=100)
    code = rpc_code(lambda: stub.PutKeys(put_requests(header, [fake_key(101)]), metadata=auth_metadata("alice-t")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_an_upload_over_the_size_limit_stops_as_soon_as_it_passes_it(start):
    ks = start(max_key_bytes=2 * MIB)
    sent = []

    def requests():
        yield pb.PutKeysRequest(header=pb.PutKeysHeader())
        for i in range(64):
            sent.append(i)
            yield pb.PutKeysRequest(chunk=fake_key(MIB))
    with grpc.insecure_channel(ks.target) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.KeyStoreStub(ch).PutKeys(requests(), metadata=auth_metadata("alice-t"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(sent) < 16  # the server hung up after 3 of 64 MiB (plus what flow control let through)
    assert objects(ks, "") == [] and spool_files(ks) == []


def test_an_expected_size_over_the_limit_is_refused_before_any_byte(start):
    ks = start(max_key_bytes=MIB)
    with grpc.insecure_channel(ks.target) as ch:
        stub = pb_grpc.KeyStoreStub(ch)
        code = rpc_code(lambda: stub.PutKeys(put_requests(pb.PutKeysHeader(expected_size=MIB + 1), []),
                                             metadata=auth_metadata("alice-t")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_cancelled_upload_leaves_no_key_and_no_temp_file(ks, stub, alice):
    release = threading.Event()

    def requests():
        yield pb.PutKeysRequest(header=pb.PutKeysHeader(expected_size=10 * MIB))
        yield pb.PutKeysRequest(chunk=fake_key(MIB))
        yield pb.PutKeysRequest(chunk=fake_key(MIB))
        release.wait(30)  # the client stalls mid-upload, then gives up

    future = stub.PutKeys.future(requests(), metadata=auth_metadata("alice-t"))
    try:
        assert wait_until(lambda: any(n.startswith("put-") for n in spool_files(ks)))
        future.cancel()
        assert wait_until(lambda: spool_files(ks) == [])
    finally:
        release.set()
    assert future.cancelled()
    assert list(alice.list()) == [] and objects(ks, "") == []


def test_an_object_altered_in_storage_is_data_loss_never_data(ks, alice):
    data = fake_key(MIB + 5)
    record = alice.put(data)
    name = f"keys/{record.key_id}"
    backend = ks.store.backend
    altered = bytearray(backend.read_bytes(name))
    altered[-1] ^= 0xFF
    backend.put_bytes(name, bytes(altered), backend.head(name).metadata)  # behind the service's back
    received = []
    with pytest.raises(errors.DataLoss):
        alice.get(record.key_id, progress=received.append)
    assert received == []  # not one byte of the altered object was sent
    alice.put(data)  # uploading again repairs it
    assert alice.get(record.key_id) == data


# ------------------------------------------------------------------ health and reflection


def test_health_is_serving_with_a_reachable_backend(ks):
    with grpc.insecure_channel(ks.target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="encinfer.v1.KeyStore"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_key_store_service(ks):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(ks.target) as ch:
        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name for r in replies for s in r.list_services_response.service]
    assert "encinfer.v1.KeyStore" in names
