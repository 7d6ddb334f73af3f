"""The safe model artifact: a linear model as plain arrays plus JSON, never a pickle.

Any fitted scikit-learn linear classifier or regressor (`coef_`, `intercept_`), or a
Pipeline whose steps before it are affine, is folded (encinfer.inference.fold) into one
weight matrix W (n_outputs x n_features) and bias b, scores = X @ W.T + b.

On disk, for a path stem `models/mnist`:
- `models/mnist.npz`: arrays `weights` (float64, n_outputs x n_features) and `bias`
  (float64, n_outputs), read with `np.load(..., allow_pickle=False)`;
- `models/mnist.json`: name, version, kind, classes (as strings, with their dtype), sizes,
  the sha256 of the .npz (checked on every load) and provenance.

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
from encinfer.inference.fold import check_fold, describe_steps, flatten, fold, kind_of

log = logging.getLogger(__name__)

FORMAT = "encinfer-linear-model"
FORMAT_VERSION = 1
KINDS = ("classifier", "regressor")


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
    kind = kind_of(estimator)
    W, b = fold(estimator)
    n_features = getattr(estimator, "n_features_in_", W.shape[1])
    if W.shape[1] != n_features:
        raise InvalidArgument(f"folded weights take {W.shape[1]} features, the estimator {n_features}")
    final = flatten(estimator)[1]
    raw_coef = np.asarray(final.coef_.toarray() if hasattr(final.coef_, "toarray") else final.coef_)
    squeeze = kind == "regressor" and raw_coef.ndim == 1
    check_fold(estimator, kind, W, b, squeeze)
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
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "sklearn_version": sklearn.__version__,
        "source": {"estimator": type(estimator).__name__, "steps": describe_steps(estimator)},
    }
    _atomic_write(json_path, (json.dumps(metadata, indent=2) + "\n").encode())
    log.info("exported model", extra={"fields": {
        "model": name, "version": str(version), "path": str(npz_path),
        "outputs": int(W.shape[0]), "features": int(W.shape[1])}})
    return ModelArtifact(name=name, version=str(version), kind=kind, classes=class_names, weights=W, bias=b,
                         metadata=metadata, sha256=metadata["sha256"])


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
