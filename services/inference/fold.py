"""Folding a fitted scikit-learn linear model, and the affine steps of a Pipeline before
it, into one weight matrix W (n_outputs x n_features) and bias b, scores = X @ W.T + b:
all the encrypted path computes, so the preprocessing costs nothing at serving.

Each export checks the folded model against the estimator itself (FOLD_RTOL).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from encinfer.common.errors import InvalidArgument

# Relative tolerance of the export-time check that the folded model reproduces the estimator.
FOLD_RTOL = 1e-9


def _affine_of(step: Any, n_in: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The affine map of one fitted transformer as (A, c, diagonal): z = x * A + c if diagonal
    (A a vector), else z = x @ A + c (A is n_in x n_out). Raises InvalidArgument if not affine."""
    from sklearn.decomposition import PCA, IncrementalPCA, TruncatedSVD
    from sklearn.preprocessing import MaxAbsScaler, MinMaxScaler, RobustScaler, StandardScaler

    ones, zeros = np.ones(n_in), np.zeros(n_in)
    if step is None or (isinstance(step, str) and step == "passthrough"):
        return ones, zeros, True
    if type(step) is StandardScaler:
        scale = np.asarray(step.scale_, dtype=np.float64) if step.with_std else ones
        mean = np.asarray(step.mean_, dtype=np.float64) if step.with_mean else zeros
        return 1.0 / scale, -mean / scale, True
    if type(step) is RobustScaler:
        scale = np.asarray(step.scale_, dtype=np.float64) if step.with_scaling else ones
        center = np.asarray(step.center_, dtype=np.float64) if step.with_centering else zeros
        return 1.0 / scale, -center / scale, True
    if type(step) is MinMaxScaler:
        if step.clip:
            raise InvalidArgument("MinMaxScaler(clip=True) clips its output, which is not affine; "
                                  "refit with clip=False to export")
        return np.asarray(step.scale_, dtype=np.float64), np.asarray(step.min_, dtype=np.float64), True
    if type(step) is MaxAbsScaler:
        return 1.0 / np.asarray(step.scale_, dtype=np.float64), zeros, True
    if type(step) in (PCA, IncrementalPCA):
        components = np.asarray(step.components_, dtype=np.float64)  # n_components x n_in
        A = components.T.copy()
        c = -(np.asarray(step.mean_, dtype=np.float64) @ components.T)
        if step.whiten:
            # Same clip as scikit-learn's _BasePCA._transform.
            scale = np.sqrt(np.asarray(step.explained_variance_, dtype=np.float64))
            scale[scale < np.finfo(scale.dtype).eps] = np.finfo(scale.dtype).eps
            A /= scale
            c /= scale
        return A, c, False
    if type(step) is TruncatedSVD:
        A = np.asarray(step.components_, dtype=np.float64).T.copy()
        return A, np.zeros(A.shape[1]), False
    raise InvalidArgument(
        f"pipeline step {type(step).__name__} is not affine (or not supported); supported before the "
        f"final estimator: StandardScaler, RobustScaler, MinMaxScaler(clip=False), MaxAbsScaler, PCA, "
        f"IncrementalPCA, TruncatedSVD, 'passthrough'")


def flatten(estimator: Any) -> tuple[list[Any], Any]:
    """(transformers, final estimator) of a Pipeline, nested Pipelines flattened."""
    from sklearn.pipeline import Pipeline

    if not isinstance(estimator, Pipeline):
        return [], estimator
    steps: list[Any] = []
    for _, step in estimator.steps[:-1]:
        if isinstance(step, Pipeline):
            inner, last = flatten(step)
            steps += inner + [last]
        else:
            steps.append(step)
    inner, final = flatten(estimator.steps[-1][1])
    return steps + inner, final


def _final_linear(final: Any) -> tuple[np.ndarray, np.ndarray]:
    """coef (n_rows x n_in) and intercept (n_rows) of the final estimator."""
    if final is None or (isinstance(final, str) and final == "passthrough"):
        raise InvalidArgument("the pipeline has no final estimator")
    if not hasattr(final, "coef_"):
        raise InvalidArgument(
            f"{type(final).__name__} is not a fitted linear model (no coef_); export needs a fitted "
            f"scikit-learn linear classifier or regressor such as LogisticRegression, LinearSVC, "
            f"RidgeClassifier, LinearRegression or Ridge")
    coef = final.coef_
    if hasattr(coef, "toarray"):  # sparsify()'d models
        coef = coef.toarray()
    coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
    intercept = np.asarray(getattr(final, "intercept_", 0.0), dtype=np.float64)
    intercept = np.broadcast_to(np.atleast_1d(intercept), (coef.shape[0],)).copy()
    return coef, intercept


def fold(estimator: Any) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) with X @ W.T + b equal to the estimator's raw linear scores (decision_function,
    or predict for a regressor), before any binary expansion. Raises InvalidArgument for
    anything that is not affine preprocessing + a linear model."""
    steps, final = flatten(estimator)
    coef, intercept = _final_linear(final)
    # Back-substitute from the last step: scores = z @ M + v with M (n_z x n_out).
    M, v = coef.T.copy(), intercept.copy()
    for step in reversed(steps):
        A, c, diagonal = _affine_of(step, M.shape[0])
        v = v + c @ M
        M = A[:, None] * M if diagonal else A @ M
    return np.ascontiguousarray(M.T), v


def kind_of(estimator: Any) -> str:
    from sklearn.base import is_classifier, is_regressor

    if is_classifier(estimator):
        return "classifier"
    if is_regressor(estimator):
        return "regressor"
    raise InvalidArgument(f"{type(estimator).__name__} is neither a classifier nor a regressor")


def describe_steps(estimator: Any) -> list[str]:
    steps, final = flatten(estimator)
    return [type(s).__name__ if not isinstance(s, str) else s for s in steps] + [type(final).__name__]


def check_fold(estimator: Any, kind: str, W: np.ndarray, b: np.ndarray, squeeze: bool) -> None:
    """Compares the folded model with the estimator on random inputs: a fold that does not
    reproduce it is refused, whatever the reason (a subclass, an unusual option)."""
    rng = np.random.default_rng(0)
    n = W.shape[1]
    X = np.vstack([rng.uniform(0.0, 1.0, (8, n)), rng.normal(0.0, 3.0, (8, n))])
    expected = estimator.decision_function(X) if kind == "classifier" else estimator.predict(X)
    expected = np.asarray(expected, dtype=np.float64)
    got = X @ W.T + b
    got = got[:, 0] if squeeze or expected.ndim == 1 else got
    if got.shape != expected.shape or not np.allclose(
            got, expected, rtol=FOLD_RTOL, atol=FOLD_RTOL * max(1.0, float(np.max(np.abs(expected))))):
        raise InvalidArgument(
            f"the folded weights do not reproduce {type(estimator).__name__}'s scores "
            f"(max difference {np.max(np.abs(got - expected)) if got.shape == expected.shape else 'shape'}); "
            f"this estimator cannot be exported as a linear model")
    if kind == "classifier":
        predicted = np.asarray(estimator.predict(X))
        classes = np.asarray(estimator.classes_)
        if predicted.ndim != 1 or classes.ndim != 1:
            raise InvalidArgument("multi-label / multi-output classifiers are not supported")
