"""The coefficient layout through the real services: GetModelInfo states it, the client picks it,
answers match the plaintext model, are re-randomized and small, bad input is refused."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

pytest.register_assert_rewrite("inference_fixtures")
from inference_fixtures import ALICE, CALL_TIMEOUT, MODEL, assert_matches_plaintext, assert_status, rpc_error

from encinfer.client.keystore import KeyStoreClient
from encinfer.he.coeff import CoeffLayout, decrypt_coeff, encrypt_coeff
from encinfer.he.latency import encrypt_latency
from encinfer.modelinfo import ModelDescription
from encinfer.v1 import inference_pb2 as pb

pytest_plugins = ["inference_fixtures"]
pytestmark = pytest.mark.timeout(120)

AUTH = (("authorization", f"Bearer {ALICE}"),)


@pytest.fixture
def clf(fs_stack, tmp_path):
    c = fs_stack.classifier(tmp_path / "keys")
    yield c
    c.close()


def info_of(stack) -> pb.ModelInfo:
    return stack.stub().GetModelInfo(pb.GetModelInfoRequest(model=MODEL), metadata=AUTH, timeout=CALL_TIMEOUT)


def predict(stack, key_id: str, ciphertext: bytes, layout=pb.LAYOUT_COEFF) -> pb.PredictResponse:
    return stack.stub().Predict(pb.PredictRequest(model=MODEL, key_id=key_id, ciphertext=ciphertext, layout=layout),
                                metadata=AUTH, timeout=CALL_TIMEOUT)


def test_model_info_states_the_coefficient_layout(fs_stack):
    lay = next(lay for lay in info_of(fs_stack).layouts if lay.layout == pb.LAYOUT_COEFF)
    p = lay.parameters
    assert (p.poly_modulus_degree, list(p.coeff_modulus_bits)) == (4096, [60])
    assert p.needs_public_key and not p.galois_steps and not p.needs_conjugation_key and not p.needs_relin_keys
    assert (lay.rows_per_product, lay.answer_bits) == (5, 40)
    assert isinstance(ModelDescription.from_pb(info_of(fs_stack)).layouts["coeff"], CoeffLayout)


def test_client_picks_the_coefficient_layout_from_getmodelinfo(clf):
    assert clf.single_sample_layout() == "coeff"


def test_client_uses_the_rotation_layout_when_the_model_offers_no_coefficient_layout(clf):
    info = pb.ModelInfo()
    info.CopyFrom(clf.info)
    del info.layouts[:]
    info.layouts.extend(lay for lay in clf.info.layouts if lay.layout != pb.LAYOUT_COEFF)
    clf._info = info
    assert clf.single_sample_layout() == "latency"


def test_streamed_scores_match_the_plaintext_model(fs_stack, clf, test_images):
    X = test_images[0][:12]
    assert_matches_plaintext(fs_stack.model, X, clf.decision_function(X))
    assert set(clf._secrets) == {"coeff"}  # keys for the coefficient layout only


def test_unary_predict_scores_match_the_plaintext_model(fs_stack, clf, test_images):
    X = test_images[0][40:43]
    assert_matches_plaintext(fs_stack.model, X, np.array([clf.predict_one(x) for x in X]))


def test_round_trip_is_at_most_100_kb_per_image(clf, test_images):
    X = test_images[0][:4]
    clf.decision_function(X)
    assert (clf.stats.bytes_up + clf.stats.bytes_down) / len(X) <= 100_000


def test_two_answers_to_one_ciphertext_differ_and_decrypt_to_the_same_scores(fs_stack, clf, test_images):
    secret, key_id = clf.keys("coeff")
    layout = clf.layout_info("coeff")
    ct = encrypt_coeff(secret, test_images[0][0], layout)
    a, b = (predict(fs_stack, key_id, ct).ciphertexts[0] for _ in range(2))
    assert a != b and len(a) == len(b) == layout.answer_size()
    np.testing.assert_allclose(decrypt_coeff(secret, a, layout), decrypt_coeff(secret, b, layout), atol=1e-5)


def test_ciphertext_for_other_parameters_is_refused(fs_stack, clf, test_images):
    _, key_id = clf.keys("coeff")
    rotation_secret, _ = clf.keys("latency")
    ct = encrypt_latency(rotation_secret, test_images[0][0], clf.layout_info("latency"))
    assert_status(rpc_error(lambda: predict(fs_stack, key_id, ct)), grpc.StatusCode.INVALID_ARGUMENT,
                  "not a valid SEAL object")


def test_oversized_ciphertext_is_refused(fs_stack, clf, test_images):
    secret, key_id = clf.keys("coeff")
    ct = encrypt_coeff(secret, test_images[0][0], clf.layout_info("coeff")) + b"\0" * 40_000
    assert_status(rpc_error(lambda: predict(fs_stack, key_id, ct)), grpc.StatusCode.INVALID_ARGUMENT,
                  "larger than any fresh ciphertext")


def test_key_without_a_public_key_is_refused_before_any_compute(fs_stack, clf, test_images):
    secret, _ = clf.keys("coeff")
    with KeyStoreClient(fs_stack.keystore_target, token=ALICE) as ks:
        key_id = ks.put(secret.public_bundle(include_public_key=False)).key_id
    ct = encrypt_coeff(secret, test_images[0][0], clf.layout_info("coeff"))
    assert_status(rpc_error(lambda: predict(fs_stack, key_id, ct)), grpc.StatusCode.FAILED_PRECONDITION,
                  "public key")


def test_rotation_layout_key_is_refused_for_the_coefficient_layout(fs_stack, clf, test_images):
    secret, _ = clf.keys("coeff")
    _, rotation_key = clf.keys("latency")
    ct = encrypt_coeff(secret, test_images[0][0], clf.layout_info("coeff"))
    assert_status(rpc_error(lambda: predict(fs_stack, rotation_key, ct)), grpc.StatusCode.FAILED_PRECONDITION,
                  r"do not match.*This key fits the model's latency \(LAYOUT_LATENCY\) layout")


def test_a_coefficient_key_in_a_request_without_a_layout_is_told_to_state_it(fs_stack, clf, test_images):
    """An unset layout means the rotation layout (callers from before the coefficient layout): the
    refusal names the layout the key fits, so the caller knows what to add."""
    secret, key_id = clf.keys("coeff")
    ct = encrypt_coeff(secret, test_images[0][0], clf.layout_info("coeff"))
    err = rpc_error(lambda: predict(fs_stack, key_id, ct, layout=pb.LAYOUT_UNSPECIFIED))
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION,
                  r"latency layout.*fits the model's .*coeff \(LAYOUT_COEFF\)")


def test_encryptions_of_zero_are_prepared_while_the_workers_are_idle(fs_stack, clf, test_images):
    import asyncio

    from inference_fixtures import wait_for

    from encinfer.inference import worker
    clf.decision_function(test_images[0][:4])
    pool = fs_stack.inference.server.pool

    def pools() -> list[tuple[int, int]]:
        async def ask():
            return await asyncio.gather(*(pool.call(i, worker.zero_pools) for i in range(len(pool.load))))
        return [p for per_worker in fs_stack.on_server_loop(ask()) for p in per_worker]
    assert pools()  # the workers drew from a pool
    assert wait_for(lambda: all(ready == wanted for ready, wanted in pools()))
