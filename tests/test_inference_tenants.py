"""Tenants share nothing but the service: identical key bytes (a batch-layout key is the
parameters only) work for each tenant that uploaded them, and nobody predicts with a
key another tenant uploaded."""
from __future__ import annotations

import grpc
import pytest

pytest.register_assert_rewrite("inference_fixtures")
from inference_fixtures import ALICE, BOB, assert_matches_plaintext

pytest_plugins = ["inference_fixtures"]
pytestmark = pytest.mark.timeout(120)


def test_two_tenants_with_identical_batch_keys_both_predict(fs_stack, test_images, tmp_path):
    X = test_images[0][:5]
    import shutil

    with fs_stack.classifier(tmp_path / "alice", ALICE, "batch") as alice, \
            fs_stack.classifier(tmp_path / "bob", BOB, "batch") as bob:
        alice_id = alice.keys("batch")[1]
        # Batch keys carry a public key (fresh noise each time): identical bytes means bob
        # uploads alice's very bundle, with a copy of her secret to decrypt.
        from encinfer.client.keystore import KeyStoreClient
        (tmp_path / "bob").mkdir()
        with KeyStoreClient(fs_stack.keystore_target, token=ALICE) as ks:
            bundle = ks.get(alice_id, dest=tmp_path / "bundle.bin")
        with KeyStoreClient(fs_stack.keystore_target, token=BOB) as ks:
            assert ks.put(bundle).key_id == alice_id  # same bytes, same key id, bob's own record
        for secret in (tmp_path / "alice").glob("*.secret"):
            shutil.copy(secret, tmp_path / "bob" / secret.name)
            meta = secret.with_suffix(".json")
            (tmp_path / "bob" / meta.name).write_text(meta.read_text())
        assert bob.keys("batch")[1] == alice_id
        assert_matches_plaintext(fs_stack.model, X, alice.decision_function(X))
        assert_matches_plaintext(fs_stack.model, X, bob.decision_function(X))


def test_a_tenant_cannot_predict_with_another_tenants_latency_key(fs_stack, test_images, tmp_path):
    from encinfer.client.classifier import PredictionError
    from encinfer.common.errors import PermissionDenied

    x = test_images[0][0]
    with fs_stack.classifier(tmp_path / "alice", ALICE, "latency") as alice, \
            fs_stack.classifier(tmp_path / "bob", BOB, "latency") as bob:
        alice_key = alice.keys("latency")
        bob._secrets["latency"] = alice_key  # bob tries alice's key id
        with pytest.raises(PermissionDenied) as err:
            bob.predict_one(x)
        assert err.value.code == "PERMISSION_DENIED" and not isinstance(err.value, grpc.RpcError)
        with pytest.raises(PredictionError) as item_err:
            bob.decision_function(x[None, :])
        assert item_err.value.code == "PERMISSION_DENIED" and isinstance(item_err.value, PermissionDenied)


def test_key_store_answers_one_owners_record_to_the_service_only(keystore_factory, small_bundle):
    from encinfer.common.auth import Principal
    from encinfer.common.errors import NotFound, PermissionDenied
    from encinfer.keystore.store import PutHeader

    ks = keystore_factory("fs")
    alice, bob, service = Principal("alice", "tenant"), Principal("bob", "tenant"), Principal("inference", "service")

    async def one_chunk():
        yield small_bundle

    record = ks.call(ks.store.put(alice, PutHeader(labels={}, expected_size=0, ttl_seconds=0), one_chunk()))
    assert ks.call(ks.store.stat(service, record.key_id, "alice")).owner == "alice"
    with pytest.raises(NotFound):
        ks.call(ks.store.stat(service, record.key_id, "bob"))
    with pytest.raises(PermissionDenied):
        ks.call(ks.store.stat(bob, record.key_id, "alice"))
