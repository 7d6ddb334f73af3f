"""The safe model artifact: folding, exactness, refusals, integrity, no pickles."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge, RidgeClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import (
    MaxAbsScaler,
    MinMaxScaler,
    Normalizer,
    PolynomialFeatures,
    RobustScaler,
    StandardScaler,
)
from sklearn.svm import LinearSVC

from encinfer.common.errors import DataLoss, InvalidArgument, NotFound
from encinfer.inference.artifact import artifact_paths, export_model, load_model
from encinfer.inference.fold import fold

RTOL = 1e-9


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:600], y[:600]


def fit(estimator, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(X, y)


def assert_scores_equal(expected, got):
    expected = np.asarray(expected)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.max(np.abs(expected)))


PIPELINES = {
    "bare logistic regression": lambda: LogisticRegression(max_iter=300),
    "standard scaler": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)),
    "scaler without mean": lambda: make_pipeline(StandardScaler(with_mean=False), LinearSVC()),
    "min-max scaler": lambda: make_pipeline(MinMaxScaler(feature_range=(-1, 2)), LogisticRegression(max_iter=300)),
    "max-abs scaler": lambda: make_pipeline(MaxAbsScaler(), RidgeClassifier()),
    "robust scaler": lambda: make_pipeline(RobustScaler(), LogisticRegression(max_iter=300)),
    "pca": lambda: make_pipeline(PCA(n_components=20), LogisticRegression(max_iter=300)),
    "scaler then whitened pca": lambda: make_pipeline(StandardScaler(), PCA(n_components=15, whiten=True),
                                                      LinearSVC()),
    "truncated svd": lambda: make_pipeline(TruncatedSVD(n_components=12, random_state=0), RidgeClassifier()),
    "nested pipeline": lambda: make_pipeline(make_pipeline(MinMaxScaler(), StandardScaler()), PCA(10),
                                             LogisticRegression(max_iter=300)),
}


@pytest.mark.parametrize("shape", sorted(PIPELINES))
def test_folded_scores_equal_the_pipelines_decision_function(shape, digits, tmp_path):
    X, y = digits
    estimator = fit(PIPELINES[shape](), X, y)
    export_model(estimator, tmp_path / "m", "m")
    artifact = load_model(tmp_path / "m")
    assert_scores_equal(estimator.decision_function(X), artifact.decision_function(X))
    assert np.array_equal(artifact.predict(X), estimator.predict(X))


def test_fold_gives_one_matrix_over_the_raw_features(digits):
    X, y = digits
    W, b = fold(fit(make_pipeline(StandardScaler(), PCA(10), LogisticRegression(max_iter=300)), X, y))
    assert W.shape == (10, 64) and b.shape == (10,)


@pytest.mark.parametrize("step", [Normalizer(), PolynomialFeatures(2), MinMaxScaler(clip=True)],
                         ids=["normalizer", "polynomial", "clipping min-max"])
def test_non_affine_steps_are_refused_by_name(step, digits, tmp_path):
    X, y = digits
    estimator = fit(make_pipeline(step, LogisticRegression(max_iter=50)), X, y)
    with pytest.raises(InvalidArgument, match=type(step).__name__):
        export_model(estimator, tmp_path / "m", "m")


def test_estimator_without_coefficients_is_refused(digits, tmp_path):
    from sklearn.tree import DecisionTreeClassifier

    X, y = digits
    with pytest.raises(InvalidArgument, match="coef_"):
        export_model(DecisionTreeClassifier().fit(X, y), tmp_path / "m", "m")


def test_binary_classifier_becomes_two_outputs_that_argmax_like_sklearn(digits, tmp_path):
    X, y = digits
    estimator = fit(LogisticRegression(max_iter=300), X, y >= 5)
    artifact = export_model(estimator, tmp_path / "m", "m")
    assert artifact.n_outputs == 2 and artifact.metadata["binary"]
    assert_scores_equal(estimator.decision_function(X), artifact.decision_function(X))
    assert np.array_equal(artifact.predict(X), estimator.predict(X))
    assert np.array_equal(artifact.labels_of(np.argmax(artifact.scores(X), axis=1)), estimator.predict(X))


def test_binary_tie_predicts_the_first_class_like_sklearn(tmp_path):
    estimator = LogisticRegression().fit(np.array([[-1.0], [1.0]]), np.array(["no", "yes"]))
    estimator.coef_, estimator.intercept_ = np.array([[1.0]]), np.array([0.0])  # score 0 exactly at x = 0
    artifact = export_model(estimator, tmp_path / "m", "m")
    assert artifact.predict(np.array([[0.0]]))[0] == estimator.predict(np.array([[0.0]]))[0] == "no"


@pytest.mark.parametrize("regressor", [LinearRegression(), make_pipeline(StandardScaler(), Ridge(alpha=0.5))],
                         ids=["linear regression", "scaled ridge"])
def test_regressor_predictions_are_reproduced(regressor, digits, tmp_path):
    X, y = digits
    estimator = regressor.fit(X, y.astype(float))
    export_model(estimator, tmp_path / "r", "r")
    artifact = load_model(tmp_path / "r")
    assert artifact.kind == "regressor" and artifact.n_outputs == 1
    assert_scores_equal(estimator.predict(X), artifact.predict(X))


def test_multi_target_regressor_keeps_every_output(digits, tmp_path):
    X, y = digits
    targets = np.column_stack([y, y ** 2]).astype(float)
    estimator = Ridge().fit(X, targets)
    artifact = export_model(estimator, tmp_path / "r", "r")
    assert_scores_equal(estimator.predict(X), artifact.predict(X))


def test_metadata_describes_the_model_and_its_labels_dtype(digits, tmp_path):
    X, y = digits
    export_model(fit(LogisticRegression(max_iter=100), X, y), tmp_path / "m", "digits", "3")
    metadata = json.loads((tmp_path / "m.json").read_text())
    assert metadata["classes"] == [str(c) for c in range(10)]
    assert (metadata["name"], metadata["version"], metadata["kind"]) == ("digits", "3", "classifier")
    assert (metadata["n_features"], metadata["n_outputs"], metadata["classes_dtype"]) == (64, 10, "int64")
    assert "layouts" not in metadata  # the HE layouts are derived at serving, never stored


def test_tampered_weights_are_detected(digits, tmp_path):
    X, y = digits
    export_model(fit(LogisticRegression(max_iter=100), X, y), tmp_path / "m", "m")
    npz, _ = artifact_paths(tmp_path / "m")
    np.savez(npz, weights=np.zeros((10, 64)), bias=np.zeros(10))
    with pytest.raises(DataLoss, match="sha256"):
        load_model(tmp_path / "m")


def _rewrite_with(tmp_path, **arrays):
    """An artifact whose .npz is replaced by `arrays`, with a matching sha256 (a consistent forgery)."""
    import hashlib

    npz, js = artifact_paths(tmp_path / "m")
    np.savez(npz, **arrays)
    metadata = json.loads(js.read_text())
    metadata["sha256"] = hashlib.sha256(npz.read_bytes()).hexdigest()
    js.write_text(json.dumps(metadata))


def test_object_arrays_are_refused_without_unpickling(digits, tmp_path):
    X, y = digits
    export_model(fit(LogisticRegression(max_iter=100), X, y), tmp_path / "m", "m")
    weights = np.empty((10, 64), dtype=object)
    weights[:] = 0.0
    _rewrite_with(tmp_path, weights=weights, bias=np.zeros(10))
    with pytest.raises(InvalidArgument, match="pickle"):
        load_model(tmp_path / "m")


def test_weights_of_the_wrong_shape_are_refused(digits, tmp_path):
    X, y = digits
    export_model(fit(LogisticRegression(max_iter=100), X, y), tmp_path / "m", "m")
    _rewrite_with(tmp_path, weights=np.zeros((10, 63)), bias=np.zeros(10))
    with pytest.raises(InvalidArgument, match="do not match"):
        load_model(tmp_path / "m")


def test_missing_artifact_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        load_model(tmp_path / "absent")


def test_metadata_that_is_not_json_is_invalid(tmp_path):
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="JSON"):
        load_model(tmp_path / "m")


def test_cli_exports_a_pickle_and_reports_it(digits, tmp_path, capsys):
    import joblib

    from encinfer.cli import main

    X, y = digits
    estimator = fit(make_pipeline(StandardScaler(), LogisticRegression(max_iter=100)), X, y)
    joblib.dump(estimator, tmp_path / "model.pkl")
    assert main(["model", "export", "--pickle", str(tmp_path / "model.pkl"), "--out", str(tmp_path / "m"),
                 "--name", "digits"]) == 0
    assert "trust" in capsys.readouterr().err
    assert_scores_equal(estimator.decision_function(X), load_model(tmp_path / "m").decision_function(X))


def test_cli_info_fails_cleanly_on_a_tampered_artifact(digits, tmp_path, capsys):
    from encinfer.cli import main

    X, y = digits
    export_model(fit(LogisticRegression(max_iter=100), X, y), tmp_path / "m", "m")
    with open(tmp_path / "m.npz", "ab") as f:
        f.write(b"x")
    assert main(["model", "info", str(tmp_path / "m")]) == 2
    assert "sha256" in capsys.readouterr().err
