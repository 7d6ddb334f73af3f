"""Coefficient layout: scores equal the plaintext model's, SEAL's slot order, strict answers, re-randomization."""
from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal
from sklearn.linear_model import LogisticRegression
from test_he_latency import TOLERANCE, fit, mnist

from encinfer.common.errors import DataLoss, FailedPrecondition, InvalidArgument
from encinfer.he import serial
from encinfer.he.coeff import (
    MAGIC,
    CoeffLayout,
    CoeffModel,
    choose_coeff_params,
    coefficient_slots,
    decrypt_coeff,
    encrypt_coeff,
    load_coeff_keys,
    secret_coefficients,
    unpack_answer,
)
from encinfer.he.memory import CiphertextMemory
from encinfer.he.params import CkksParams
from encinfer.he.secret import SecretKeys


class Served:
    """A model served over the coefficient layout, with a client's keys for it."""

    def __init__(self, weights, bias, **kwargs) -> None:
        self.model = CoeffModel(weights, bias, **kwargs)
        self.layout = self.model.layout
        self.secret = SecretKeys.generate(self.layout.params)
        self.bundle = self.secret.public_bundle()
        self.keys = load_coeff_keys(self.bundle, self.layout.params)

    def encrypt(self, x) -> bytes:
        return encrypt_coeff(self.secret, x, self.layout)

    def answer(self, x) -> bytes:
        return self.model.evaluate(self.keys, self.encrypt(x))

    def scores(self, X) -> np.ndarray:
        return np.array([decrypt_coeff(self.secret, self.answer(x), self.layout) for x in X])


@pytest.fixture(scope="module")
def mnist_served():
    X, y = mnist()
    clf = fit(LogisticRegression(max_iter=30), X[:1000], y[:1000])
    return clf, Served(clf.coef_, clf.intercept_), X[1000:1200]


def plain_coefficients(plain: seal.Plaintext, params: CkksParams) -> np.ndarray:
    """A plaintext's polynomial coefficients (centered), read back through a ciphertext and SEAL's inverse NTT."""
    ctx, n = params.context(), params.poly_modulus_degree
    q = ctx.first_context_data().parms().coeff_modulus()[0].value()
    ct = seal.Ciphertext(ctx)
    seal.Encryptor(ctx, seal.KeyGenerator(ctx).secret_key()).encrypt_zero_symmetric(ct)
    words = CiphertextMemory.view(ct, 2 * n)
    words[:n] = [plain.data(i) for i in range(n)]
    words[n:] = 1
    seal.Evaluator(ctx).transform_from_ntt_inplace(ct)
    c = np.array(CiphertextMemory.view(ct, 2 * n)[:n]).astype(object)
    return np.array([int(v) - q if v > q // 2 else int(v) for v in c], dtype=np.int64)


# ---------------------------------------------------------------- encoding

def test_coefficient_slots_follow_seals_slot_order():
    params = CkksParams(4096, (60,), 20, 40, needs_public_key=True)
    coeffs = np.random.default_rng(1).integers(-1000, 1000, 4096).astype(np.float64)
    plain = seal.Plaintext()
    seal.CKKSEncoder(params.context()).encode(coefficient_slots(coeffs, 4096).tolist(),
                                              params.context().first_parms_id(), 1.0, plain)
    np.testing.assert_array_equal(plain_coefficients(plain, params), coeffs.astype(np.int64))


def test_the_product_holds_each_rows_score_at_its_output_coefficient_without_cross_talk(mnist_served):
    """Decrypting the raw products (no answer format) gives x . w_r exactly where the layout says."""
    clf, served, X = mnist_served
    lay, p = served.layout, served.layout.params
    x = X[0]
    positions = lay.output_positions()
    products = served.model.products(served.encrypt(x))
    decryptor = seal.Decryptor(p.context(), served.secret._secret_key)
    got = np.zeros(lay.n_outputs)
    for g, product in enumerate(products):
        plain = seal.Plaintext()
        decryptor.decrypt(product, plain)
        coeffs = plain_coefficients(plain, p)
        for r in np.flatnonzero(positions[:, 0] == g):
            got[r] = coeffs[positions[r, 1]] / 2.0 ** p.output_scale_bits
    expected = x @ clf.coef_.T
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_mnist_needs_two_products_and_no_evaluation_keys(mnist_served):
    _, served, _ = mnist_served
    p = served.layout.params
    assert (p.poly_modulus_degree, p.coeff_modulus_bits, served.layout.rows_per_product) == (4096, (60,), 5)
    assert served.layout.n_products == 2
    assert p.galois_elements() == [] and not p.needs_relin_keys and p.needs_public_key


# ---------------------------------------------------------------- correctness

def test_mnist_scores_match_the_plaintext_model(mnist_served):
    clf, served, X = mnist_served
    expected = clf.decision_function(X)
    got = served.scores(X)
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    assert np.max(np.abs(got - expected)) < 1e-5


def test_scores_match_with_flooding_noise(mnist_served):
    clf, served, X = mnist_served
    flooded = CoeffModel(clf.coef_, clf.intercept_, served.layout.params, flood_bits=30)
    got = np.array([decrypt_coeff(served.secret, flooded.evaluate(served.keys, served.encrypt(x)), served.layout)
                    for x in X[:50]])
    expected = clf.decision_function(X[:50])
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    assert np.max(np.abs(got - expected)) < TOLERANCE


def test_single_output_regression_matches_the_plaintext_model():
    rng = np.random.default_rng(3)
    W, b = rng.normal(0, 0.1, (1, 64)), np.array([0.5])
    served = Served(W, b)
    X = rng.uniform(0, 1, (10, 64))
    np.testing.assert_allclose(served.scores(X)[:, 0], X @ W[0] + b[0], atol=1e-5)


def test_many_outputs_spread_over_several_products():
    rng = np.random.default_rng(4)
    W, b = rng.normal(0, 0.1, (23, 700)), rng.normal(0, 1, 23)
    served = Served(W, b)
    assert (served.layout.rows_per_product, served.layout.n_products) == (5, 5)
    X = rng.uniform(0, 1, (3, 700))
    np.testing.assert_allclose(served.scores(X), X @ W.T + b, atol=1e-5)


# ---------------------------------------------------------------- answers

def test_answer_has_the_documented_size_and_header(mnist_served):
    _, served, X = mnist_served
    answer = served.answer(X[0])
    assert answer[:4] == MAGIC
    assert len(answer) == served.layout.answer_size() == 16 + (10 + 2 * 4096) * 5


def test_round_trip_fits_in_100_kb(mnist_served):
    _, served, X = mnist_served
    up = served.encrypt(X[0])
    assert len(up) + len(served.model.evaluate(served.keys, up)) <= 100_000


def test_two_answers_to_the_same_ciphertext_differ_and_decrypt_to_the_same_scores(mnist_served):
    _, served, X = mnist_served
    ct = served.encrypt(X[0])
    a, b = served.model.evaluate(served.keys, ct), served.model.evaluate(served.keys, ct)
    (c0a, c1a), (c0b, c1b) = unpack_answer(a, served.layout), unpack_answer(b, served.layout)
    assert not np.array_equal(c0a, c0b)
    assert np.mean(c1a == c1b) < 0.01  # every c1 coefficient re-randomized
    np.testing.assert_allclose(decrypt_coeff(served.secret, a, served.layout),
                               decrypt_coeff(served.secret, b, served.layout), atol=1e-5)


def test_an_answer_carries_no_coefficient_but_the_outputs(mnist_served):
    """c0 only at the outputs; the rest of the answer is c1, which decrypts nothing without c0."""
    _, served, X = mnist_served
    lay = served.layout
    c0, c1 = unpack_answer(served.answer(X[0]), lay)
    assert c0.shape == (lay.n_outputs,) and c1.shape == (lay.n_products, lay.params.poly_modulus_degree)


def test_an_answers_c1_is_not_the_unrandomized_product(mnist_served):
    """Without re-randomization c1 would be c1_in * w, a function of the weights the client could compute."""
    _, served, X = mnist_served
    ct = served.encrypt(X[0])
    product = served.model.products(ct)[0]
    seal.Evaluator(served.layout.params.context()).transform_from_ntt_inplace(product)
    n = served.layout.params.poly_modulus_degree
    raw = np.array(CiphertextMemory.view(product, 2 * n)[n:])
    from encinfer.he.coeff import _modulus, switch_modulus
    unrandomized = switch_modulus(raw, _modulus(served.layout.params), served.layout.answer_bits)
    _, c1 = unpack_answer(served.model.evaluate(served.keys, ct), served.layout)
    assert np.mean(c1[0] == unrandomized) < 0.01


def test_encryptions_of_zero_are_never_used_twice(mnist_served):
    _, served, X = mnist_served
    keys = load_coeff_keys(served.bundle, served.layout.params)
    keys.refill(4)
    seen = {id(keys.zero()) for _ in range(4)}
    assert len(seen) == 4 and keys.pooled() == 0
    assert keys.zero() is not None  # an empty pool makes a fresh one


def test_client_refuses_an_answer_of_the_wrong_size(mnist_served):
    _, served, X = mnist_served
    answer = served.answer(X[0])
    for bad in (answer[:-1], answer + b"\0", b"", b"EIC1"):
        with pytest.raises(InvalidArgument):
            decrypt_coeff(served.secret, bad, served.layout)


def test_client_refuses_an_answer_with_another_header(mnist_served):
    _, served, X = mnist_served
    answer = bytearray(served.answer(X[0]))
    for offset, value in ((0, ord("X")), (4, 48), (5, 1), (6, 3), (8, 9), (13, 0x20)):
        bad = bytearray(answer)
        bad[offset] = value
        with pytest.raises(InvalidArgument):
            decrypt_coeff(served.secret, bytes(bad), served.layout)


def test_answer_computed_for_another_secret_key_is_detected(mnist_served):
    _, served, X = mnist_served
    other = SecretKeys.generate(served.layout.params)
    answers = [served.model.evaluate(served.keys, encrypt_coeff(other, x, served.layout)) for x in X[:3]]
    with pytest.raises(DataLoss):
        for answer in answers:  # a random answer passes with probability 2^-10
            decrypt_coeff(served.secret, answer, served.layout)


# ---------------------------------------------------------------- refusals

def evaluate_refusal(served: Served, data: bytes) -> str:
    with pytest.raises(InvalidArgument) as info:
        served.model.evaluate(served.keys, data)
    return str(info.value)


def test_server_refuses_a_ciphertext_of_other_parameters(mnist_served):
    _, served, X = mnist_served
    other = CkksParams(4096, (58, 51), 25, 50)
    secret = SecretKeys.generate(other)
    pt = seal.Plaintext()
    secret.encoder.encode([0.5] * 2048, secret.context.first_parms_id(), 2.0 ** 27, pt)
    assert "not a valid SEAL object" in evaluate_refusal(served, secret.encrypt_symmetric(pt))


def test_server_refuses_an_oversized_ciphertext(mnist_served):
    _, served, X = mnist_served
    assert "larger than any fresh ciphertext" in evaluate_refusal(served, served.encrypt(X[0]) + b"\0" * 70_000)


def test_server_refuses_random_bytes_and_empty_input(mnist_served):
    _, served, _ = mnist_served
    evaluate_refusal(served, np.random.default_rng(0).bytes(30_000))
    assert "empty" in evaluate_refusal(served, b"")


def test_server_refuses_a_ciphertext_at_another_scale(mnist_served):
    _, served, X = mnist_served
    pt = seal.Plaintext()
    served.secret.encoder.encode(coefficient_slots(X[0], 4096).tolist(), served.secret.context.first_parms_id(),
                                 2.0 ** 30, pt)
    assert "scale" in evaluate_refusal(served, served.secret.encrypt_symmetric(pt))


def test_server_refuses_a_three_polynomial_ciphertext(mnist_served):
    _, served, X = mnist_served
    ctx = served.layout.params.context()
    ct = serial.load(lambda: seal.Ciphertext(ctx), served.encrypt(X[0]), ctx, "ct")
    seal.Evaluator(ctx).square_inplace(ct)
    message = evaluate_refusal(served, serial.dump(ct))
    assert "3 polynomials" in message or "larger than any fresh ciphertext" in message


def test_keys_without_a_public_key_are_refused(mnist_served):
    _, served, _ = mnist_served
    with pytest.raises(FailedPrecondition, match="public key"):
        load_coeff_keys(served.secret.public_bundle(include_public_key=False), served.layout.params)


def test_keys_for_other_parameters_are_refused(mnist_served):
    _, served, _ = mnist_served
    other = SecretKeys.generate(CkksParams(8192, (60,), 27, 53, needs_public_key=True))
    with pytest.raises(FailedPrecondition):
        load_coeff_keys(other.public_bundle(), served.layout.params)


def test_client_refuses_samples_out_of_range_or_shape(mnist_served):
    _, served, X = mnist_served
    for bad in (X[0][:-1], X[0] * 2, np.full(784, np.nan)):
        with pytest.raises(InvalidArgument):
            served.encrypt(bad)


# ---------------------------------------------------------------- layout description

def test_layout_survives_a_round_trip_through_a_dict(mnist_served):
    _, served, _ = mnist_served
    assert CoeffLayout.from_dict(served.layout.to_dict()) == served.layout


def test_layout_with_wrong_rows_per_product_is_refused(mnist_served):
    _, served, _ = mnist_served
    d = served.layout.to_dict()
    d["rows_per_product"] = 6
    with pytest.raises(InvalidArgument, match="rows per product"):
        CoeffLayout.from_dict(d)


def test_secret_coefficients_are_ternary_and_decrypt(mnist_served):
    _, served, _ = mnist_served
    s = secret_coefficients(served.layout.params.context(), served.secret._secret_key)
    assert s.shape == (4096,) and set(np.unique(s)) <= {-1, 0, 1}


def test_too_many_features_are_refused():
    with pytest.raises(InvalidArgument, match="batch layout"):
        choose_coeff_params(40_000, 10.0)


def test_public_key_with_another_polynomial_a_is_refused(mnist_served):
    """A client-chosen a (here SEAL's own random one) could unmask c1; only the common a is accepted."""
    _, served, _ = mnist_served
    from encinfer.he.keys import build_key_bundle
    own = seal.PublicKey()
    seal.KeyGenerator(served.layout.params.context(), served.secret._secret_key).create_public_key(own)
    bundle = build_key_bundle(serial.dump(served.layout.params.seal_parameters()), public_key=serial.dump(own))
    with pytest.raises(InvalidArgument, match="common polynomial"):
        load_coeff_keys(bundle, served.layout.params)


def test_public_key_made_with_the_common_a_encrypts_zero():
    params = CkksParams(4096, (60,), 27, 53, needs_public_key=True)
    secret = SecretKeys.generate(params)
    keys = load_coeff_keys(secret.public_bundle(), params)
    plain = secret.decrypt_ciphertext(keys.zero())
    values = np.array(secret.encoder.decode_double(plain))
    assert np.max(np.abs(values)) < 1e5  # noise only (scale 1): tiny against q ~ 2^60


# ---------------------------------------------------------------- the batch layout, re-randomized the same way

def test_batch_answers_are_re_randomized_and_decrypt_to_the_same_scores(mnist_served):
    from encinfer.he.batch import BatchModel, decrypt_batch, encrypt_batch
    clf, _, X = mnist_served
    model = BatchModel(clf.coef_, clf.intercept_)
    assert model.params.needs_public_key
    secret = SecretKeys.generate(model.params)
    zeros = load_coeff_keys(secret.public_bundle(), model.params, pool_size=20)
    parts = list(encrypt_batch(secret, X[:20], model.layout))
    a, b = model.evaluate(parts, 20, zeros), model.evaluate(parts, 20, zeros)
    assert all(x != y for x, y in zip(a, b, strict=True))
    sa, sb = decrypt_batch(secret, a, 20, model.layout), decrypt_batch(secret, b, 20, model.layout)
    np.testing.assert_allclose(sa, sb, atol=1e-4)
    np.testing.assert_allclose(sa, clf.decision_function(X[:20]), atol=TOLERANCE)


def test_rotation_layout_answers_are_re_randomized_and_decrypt_to_the_same_scores(mnist_served):
    from encinfer.he.keys import load_key_bundle
    from encinfer.he.latency import LatencyModel, decrypt_latency, encrypt_latency
    clf, _, X = mnist_served
    model = LatencyModel(clf.coef_, clf.intercept_)
    assert model.params.needs_public_key and len(model.params.coeff_modulus_bits) == 2
    secret = SecretKeys.generate(model.params)
    bundle = secret.public_bundle()
    keys, zeros = load_key_bundle(bundle, model.params), load_coeff_keys(bundle, model.params)
    ct = encrypt_latency(secret, X[0], model.layout)
    a, b = model.evaluate(keys, ct, zeros), model.evaluate(keys, ct, zeros)
    assert a != b
    sa, sb = decrypt_latency(secret, a, model.layout), decrypt_latency(secret, b, model.layout)
    np.testing.assert_allclose(sa, sb, atol=1e-4)
    np.testing.assert_allclose(sa, clf.decision_function(X[:1])[0], atol=TOLERANCE)
