"""The peer benchmark rows: every field present, agreement measured from decryptions."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from bench.peers import FIELDS, bench_encrypted_inference, bench_plaintext, bench_tenseal_dot
from encinfer import datasets


@pytest.fixture(scope="module")
def model_and_images():
    from encinfer.inference.mnist import train_mnist

    estimator, _ = train_mnist()
    X, y = datasets.default_test_images(20)
    return estimator.coef_, estimator.intercept_, X, y


def test_plaintext_row_agrees_with_itself_and_has_every_field(model_and_images):
    row = bench_plaintext(*model_and_images)
    assert set(FIELDS) <= set(row)
    assert (row["agreement"], row["n_images"]) == (1.0, 20)


def test_plaintext_agreement_drops_when_the_scores_disagree(model_and_images):
    W, b, X, y = model_and_images
    row = bench_plaintext(W, b, X, y, estimator=_Shuffled(W, b))
    assert row["agreement"] < 1.0


class _Shuffled:
    """A model whose outputs are rotated by one class: its argmax never matches."""

    def __init__(self, W, b):
        self.W, self.b = W, b

    def decision_function(self, X):
        return np.roll(X @ self.W.T + self.b, 1, axis=1)


def test_ten_tenseal_dots_decrypt_to_the_plaintext_argmax(model_and_images):
    row = bench_tenseal_dot(*model_and_images, n_images=1)
    assert row["agreement"] == 1.0 and row["max_score_error"] < 1e-3
    assert row["key_bytes"] > 10_000_000  # every Galois key, as the tutorials make them


@pytest.mark.skipif(importlib.util.find_spec("encrypted") is None,
                    reason="encrypted-inference 0.9 is installed by `make bench` only")
def test_encrypted_inference_at_its_best_decrypts_to_the_plaintext_argmax(model_and_images):
    row = bench_encrypted_inference(*model_and_images, n_images=1, mode="best")
    assert row["agreement"] == 1.0 and row["bytes_down_per_image"] > row["bytes_up_per_image"]
