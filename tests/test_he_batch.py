"""The batch (throughput) layout: encrypted scores equal the plaintext model's, bad parts are refused."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import tenseal.sealapi as seal
from threadpoolctl import threadpool_limits

from bench.data import shared_mnist_dir
from encinfer.common.errors import FailedPrecondition, InvalidArgument
from encinfer.he import serial
from encinfer.he.batch import (
    KERNELS,
    NUMPY_CHUNK,
    BatchLayout,
    BatchModel,
    choose_batch_params,
    decrypt_batch,
    encrypt_batch,
    split_batches,
)
from encinfer.he.params import CkksParams
from encinfer.he.secret import SecretKeys

TOLERANCE = 1e-3


def make_secret(params: CkksParams) -> SecretKeys:
    return SecretKeys.generate(params)


def encrypt_column(secret, values, scale_bits: int, parms_id=None) -> bytes:
    pt = seal.Plaintext()
    if parms_id is None:
        secret.encoder.encode(list(values), 2.0 ** scale_bits, pt)
    else:
        secret.encoder.encode(list(values), parms_id, 2.0 ** scale_bits, pt)
    return secret.encrypt_symmetric(pt)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    X, y = load_digits(return_X_y=True)
    with warnings.catch_warnings(), threadpool_limits(1):  # 2 BLAS threads on 2 busy cores: 100x slower
        warnings.simplefilter("ignore")
        clf = LogisticRegression(max_iter=300).fit(X, y)
    model = BatchModel(clf.coef_, clf.intercept_, input_range=(0.0, 16.0))
    return X, clf, model, make_secret(model.layout.params)


@pytest.fixture(scope="module")
def mnist():
    """A 784-pixel LogisticRegression on real MNIST; test images from ../shared when present."""
    from sklearn.linear_model import LogisticRegression

    from encinfer import datasets
    X_all, y_all = datasets.load_default_mnist()
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        clf = LogisticRegression(C=0.1, max_iter=60).fit(X_all[::2], y_all[::2])
    shared = shared_mnist_dir()
    X = datasets.load_mnist(shared, "test")[0] if shared else X_all
    model = BatchModel(clf.coef_, clf.intercept_)
    return np.asarray(X, dtype=np.float64), clf, model, make_secret(model.layout.params)


@pytest.fixture()
def one_part(digits):
    """A valid first part for the digits model, and what it takes to build others."""
    X, _, model, secret = digits
    layout = model.layout
    return model, secret, next(iter(encrypt_batch(secret, X[:10], layout)))


def run(model: BatchModel, secret, X: np.ndarray) -> np.ndarray:
    parts = list(encrypt_batch(secret, X, model.layout))
    return decrypt_batch(secret, model.evaluate(parts, len(X)), len(X), model.layout)


def assert_matches(scores: np.ndarray, plain: np.ndarray) -> None:
    assert scores.shape == plain.shape
    np.testing.assert_array_equal(scores.argmax(1), plain.argmax(1))
    assert np.abs(scores - plain).max() < TOLERANCE


# ---------------------------------------------------------------- correctness

def test_digits_scores_match_plaintext_on_every_sample(digits):
    X, clf, model, secret = digits
    assert_matches(run(model, secret, X), clf.decision_function(X))


def test_mnist_full_batch_matches_plaintext_in_real_and_imaginary_halves(mnist):
    X, clf, model, secret = mnist
    n, slots = model.layout.max_samples, model.layout.params.slots
    assert n == 2 * slots
    scores, plain = run(model, secret, X[:n]), clf.decision_function(X[:n])
    assert_matches(scores[:slots], plain[:slots])
    assert_matches(scores[slots:], plain[slots:])


def test_batch_of_a_few_samples_matches_plaintext(mnist):
    X, clf, model, secret = mnist
    assert_matches(run(model, secret, X[100:105]), clf.decision_function(X[100:105]))


def test_batch_just_over_the_real_slots_matches_plaintext(digits):
    X, clf, model, secret = digits
    small = BatchModel(clf.coef_, clf.intercept_, choose_batch_params(
        clf.coef_, clf.intercept_, input_range=(0.0, 16.0), poly_modulus_degree=2048))
    secret2048 = make_secret(small.layout.params)
    n = small.layout.params.slots + 3
    assert_matches(run(small, secret2048, X[:n]), clf.decision_function(X[:n]))


def test_output_with_all_zero_weights_still_gets_its_bias(digits):
    X, clf, _, _ = digits
    W, b = clf.coef_.copy(), clf.intercept_.copy()
    W[3] = 0.0
    model = BatchModel(W, b, input_range=(0.0, 16.0))
    scores = run(model, make_secret(model.layout.params), X[:50])
    assert np.abs(scores - (X[:50] @ W.T + b)).max() < TOLERANCE


def test_parameters_with_several_levels_answer_at_the_last_level(digits):
    X, clf, _, _ = digits
    params = CkksParams(8192, (60, 40, 60), 30, 50)
    model = BatchModel(clf.coef_, clf.intercept_, params)
    secret = make_secret(params)
    parts = list(encrypt_batch(secret, X[:20], model.layout))
    answer = model.evaluate(parts, 20)
    ctx = params.context()
    assert serial.load_ciphertext(answer[0], ctx).parms_id() == ctx.last_parms_id()
    assert_matches(decrypt_batch(secret, answer, 20, model.layout), clf.decision_function(X[:20]))


# ---------------------------------------------------------------- layout and parameters

def test_layout_lists_only_features_with_nonzero_weights(mnist):
    _, clf, model, _ = mnist
    used = np.flatnonzero(np.any(clf.coef_ != 0, axis=0))
    assert model.layout.feature_indices == tuple(used)
    assert 0 not in model.layout.feature_indices  # the corner pixel is never ink


def test_layout_round_trips_through_its_dict(mnist):
    layout = mnist[2].layout
    assert BatchLayout.from_dict(layout.to_dict()) == layout


def test_layout_dict_without_an_input_range_leaves_it_unchecked(mnist):
    d = mnist[2].layout.to_dict()
    del d["input_range"]
    assert BatchLayout.from_dict(d).input_range is None


def test_layout_dict_with_a_missing_field_is_invalid_argument(mnist):
    d = mnist[2].layout.to_dict()
    del d["feature_indices"]
    with pytest.raises(InvalidArgument):
        BatchLayout.from_dict(d)


def test_default_parameters_need_no_evaluation_keys_and_meet_128_bit_security(mnist):
    params = mnist[2].layout.params
    assert params.galois_elements() == [] and not params.needs_relin_keys
    assert sum(params.coeff_modulus_bits) <= 109 and params.poly_modulus_degree == 4096
    assert params.complex_packing and mnist[2].layout.max_samples == params.poly_modulus_degree


def test_scores_too_large_for_the_prime_are_invalid_argument():
    with pytest.raises(InvalidArgument, match="bits of scale"):
        choose_batch_params(np.full((2, 10), 1e9), np.zeros(2))


def test_split_batches_covers_every_sample_in_order(mnist):
    layout = mnist[2].layout
    slices = split_batches(2 * layout.max_samples + 5, layout)
    assert [(s.start, s.stop) for s in slices] == [
        (0, layout.max_samples), (layout.max_samples, 2 * layout.max_samples),
        (2 * layout.max_samples, 2 * layout.max_samples + 5)]


# ---------------------------------------------------------------- server: bad parts

def test_part_out_of_order_is_invalid_argument(one_part):
    model, _, part = one_part
    acc = model.start(10)
    with pytest.raises(InvalidArgument, match="expected part 0"):
        acc.add(1, part)


def test_part_repeated_is_invalid_argument(one_part):
    model, _, part = one_part
    acc = model.start(10)
    acc.add(0, part)
    with pytest.raises(InvalidArgument, match="expected part 1"):
        acc.add(0, part)


def test_part_beyond_the_last_is_invalid_argument(one_part):
    model, _, part = one_part
    total = len(model.layout.feature_indices)
    with pytest.raises(InvalidArgument, match="out of range"):
        model.start(10).add(total, part)


def test_finishing_with_parts_missing_is_invalid_argument(one_part):
    model, _, part = one_part
    acc = model.start(10)
    acc.add(0, part)
    with pytest.raises(InvalidArgument, match="1 of"):
        acc.finish()


def test_adding_after_finish_is_invalid_argument(digits):
    X, _, model, secret = digits
    parts = list(encrypt_batch(secret, X[:3], model.layout))
    acc = model.start(3)
    for i, p in enumerate(parts):
        acc.add(i, p)
    acc.finish()
    with pytest.raises(InvalidArgument, match="already finished"):
        acc.add(len(parts), parts[0])


@pytest.mark.parametrize("data", [b"", b"\x00" * 64, bytes(range(256)) * 40], ids=["empty", "zeros", "random"])
def test_part_that_is_not_a_ciphertext_is_invalid_argument(one_part, data):
    model, _, _ = one_part
    with pytest.raises(InvalidArgument, match="batch part 0"):
        model.start(10).add(0, data)


def test_truncated_part_is_invalid_argument(one_part):
    model, _, part = one_part
    with pytest.raises(InvalidArgument):
        model.start(10).add(0, part[:len(part) // 2])


def test_part_under_other_parameters_is_invalid_argument(one_part):
    model, _, _ = one_part
    other = make_secret(CkksParams(8192, (60,), 30, 50))
    with pytest.raises(InvalidArgument, match="not a valid SEAL object"):
        model.start(10).add(0, encrypt_column(other, [0.5] * 10, 30))


def test_part_at_another_scale_is_invalid_argument(one_part):
    model, secret, _ = one_part
    with pytest.raises(InvalidArgument, match="scale 2\\^25"):
        model.start(10).add(0, encrypt_column(secret, [0.5] * 10, 25))


def test_part_at_a_lower_level_is_invalid_argument(digits):
    _, clf, _, _ = digits
    params = CkksParams(8192, (60, 40, 60), 30, 50)
    model, secret = BatchModel(clf.coef_, clf.intercept_, params), make_secret(params)
    ctx = params.context()
    low = ctx.first_context_data().next_context_data().parms_id()
    with pytest.raises(InvalidArgument, match="lower level"):
        model.start(10).add(0, encrypt_column(secret, [0.5] * 10, 30, low))


def test_part_with_three_polynomials_is_invalid_argument(one_part):
    model, secret, _ = one_part
    ctx = model.context
    ct = serial.load_ciphertext(encrypt_column(secret, [0.5] * 10, 20), ctx)
    seal.Evaluator(ctx).square_inplace(ct)  # no relinearization: 3 polynomials
    with pytest.raises(InvalidArgument, match="3 polynomials"):
        model.start(10).add(0, serial.dump(ct))


@pytest.mark.parametrize("n", [0, -1, 4097])
def test_batch_size_outside_one_to_max_samples_is_invalid_argument(digits, n):
    model = digits[2]
    with pytest.raises(InvalidArgument, match="1 to"):
        model.start(n if n != 4097 else model.layout.max_samples + 1)


@pytest.mark.parametrize("kernel", KERNELS)
def test_accumulator_memory_does_not_grow_with_features(mnist, kernel):
    X, clf, _, secret = mnist
    model = BatchModel(clf.coef_, clf.intercept_, kernel=kernel)
    parts = encrypt_batch(secret, X[:8], model.layout)
    acc = model.start(8)
    acc.add(0, next(parts))
    first = acc.nbytes
    for i, part in enumerate(parts, start=1):
        acc.add(i, part)
    assert acc.received == len(model.layout.feature_indices) > 500
    assert acc.nbytes == first
    ct_bytes = 2 * model.params.poly_modulus_degree * 8
    # seal: one ciphertext per output and one product; numpy: four 16-bit limbs (as float64)
    # per output and per row of one fixed chunk, and one carrier ciphertext.
    limit = model.layout.n_outputs + 1 if kernel == "seal" else 4 * (model.layout.n_outputs + NUMPY_CHUNK) + 1
    assert first <= limit * ct_bytes < len(model.layout.feature_indices) * ct_bytes


# ---------------------------------------------------------------- kernels

def test_numpy_kernel_is_used_by_default_here(mnist):
    assert mnist[2].kernel == "numpy"


def test_numpy_and_seal_kernels_give_identical_ciphertexts(digits):
    X, clf, _, secret = digits
    fast = BatchModel(clf.coef_, clf.intercept_, input_range=(0.0, 16.0), kernel="numpy")
    slow = BatchModel(clf.coef_, clf.intercept_, input_range=(0.0, 16.0), kernel="seal")
    parts = list(encrypt_batch(secret, X[:40], fast.layout))
    assert fast.evaluate(parts, 40) == slow.evaluate(parts, 40)


def test_seal_kernel_scores_match_plaintext(digits):
    X, clf, _, secret = digits
    model = BatchModel(clf.coef_, clf.intercept_, input_range=(0.0, 16.0), kernel="seal")
    assert_matches(run(model, secret, X[:300]), clf.decision_function(X[:300]))


def test_weights_too_large_for_exact_float_sums_use_the_seal_kernel():
    params = CkksParams(4096, (60,), 20, 50)
    W, b = np.full((2, 64), 100.0), np.zeros(2)
    assert BatchModel(W, b, params).kernel == "seal"
    with pytest.raises(FailedPrecondition, match="weights too large"):
        BatchModel(W, b, params, kernel="numpy")


# ---------------------------------------------------------------- client: bad input

@pytest.mark.parametrize("shape", [(5, 63), (5, 65), (64,), (5, 64, 1)])
def test_samples_of_the_wrong_shape_are_invalid_argument(digits, shape):
    _, _, model, secret = digits
    with pytest.raises(InvalidArgument, match="shape"):
        encrypt_batch(secret, np.zeros(shape), model.layout)


def test_samples_with_nan_are_invalid_argument(digits):
    X, _, model, secret = digits
    bad = X[:4].copy()
    bad[2, 30] = np.nan
    with pytest.raises(InvalidArgument, match="NaN"):
        encrypt_batch(secret, bad, model.layout)


def test_samples_outside_the_input_range_are_invalid_argument(mnist):
    X, _, model, secret = mnist
    assert model.layout.input_range == (0.0, 1.0)
    with pytest.raises(InvalidArgument, match="input range"):
        encrypt_batch(secret, X[:4] * 255, model.layout)


def test_explicit_parameters_that_can_overflow_for_the_input_range_are_invalid_argument(digits):
    _, clf, _, _ = digits
    with pytest.raises(InvalidArgument, match="overflow"):
        BatchModel(clf.coef_, clf.intercept_, CkksParams(4096, (60,), 30, 56), input_range=(0.0, 16.0))


def test_more_samples_than_slots_is_invalid_argument(digits):
    _, _, model, secret = digits
    with pytest.raises(InvalidArgument, match="1 to"):
        encrypt_batch(secret, np.zeros((model.layout.max_samples + 1, 64)), model.layout)


def test_secret_key_for_other_parameters_is_failed_precondition(digits):
    X, _, model, _ = digits
    with pytest.raises(FailedPrecondition):
        encrypt_batch(make_secret(CkksParams(8192, (60,), 30, 50)), X[:2], model.layout)


def test_answer_with_the_wrong_number_of_ciphertexts_is_invalid_argument(digits):
    X, _, model, secret = digits
    answer = model.evaluate(encrypt_batch(secret, X[:2], model.layout), 2)
    with pytest.raises(InvalidArgument, match="10 ciphertexts"):
        decrypt_batch(secret, answer[:-1], 2, model.layout)
