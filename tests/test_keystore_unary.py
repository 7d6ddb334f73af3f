"""PutKeysUnary: PutKeys in one message, for browsers (gRPC-Web cannot stream requests)."""
from __future__ import annotations

import hashlib

import grpc
import pytest
from conftest import fake_inspect, fake_key

from encinfer.common.auth import auth_metadata
from encinfer.v1 import keystore_pb2 as pb
from encinfer.v1 import keystore_pb2_grpc as pb_grpc


@pytest.fixture
def stub(keystore_factory):
    ks = keystore_factory("fs", tokens="alice-t=alice:tenant", inspect=fake_inspect, max_key_bytes=64 * 1024)
    ch = grpc.insecure_channel(ks.target)
    yield pb_grpc.KeyStoreStub(ch)
    ch.close()


def test_a_unary_upload_is_stored_under_the_sha256_of_its_bytes_like_a_streamed_one(stub):
    data = fake_key(5000)
    record = stub.PutKeysUnary(pb.PutKeysUnaryRequest(header=pb.PutKeysHeader(labels={"from": "page"}), bundle=data),
                               metadata=auth_metadata("alice-t"), timeout=10)
    assert record.key_id == hashlib.sha256(data).hexdigest() and record.owner == "alice"
    assert record.labels == {"from": "page"}
    assert stub.StatKeys(pb.StatKeysRequest(key_id=record.key_id), metadata=auth_metadata("alice-t"),
                         timeout=10).size_bytes == 5000


def test_a_unary_upload_needs_a_token(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.PutKeysUnary(pb.PutKeysUnaryRequest(bundle=fake_key(100)), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_unary_upload_over_the_size_limit_is_refused_as_a_streamed_one(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.PutKeysUnary(pb.PutKeysUnaryRequest(bundle=fake_key(65 * 1024)), metadata=auth_metadata("alice-t"),
                          timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_unary_upload_that_is_not_a_bundle_is_invalid(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.PutKeysUnary(pb.PutKeysUnaryRequest(bundle=b"not a bundle"), metadata=auth_metadata("alice-t"),
                          timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
