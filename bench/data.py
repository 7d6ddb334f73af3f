"""Where benchmarks and optional tests find the full MNIST test set.

The team keeps a copy at ../shared/data/mnist next to the repository. Only the
benchmarks and tests look there (and skip or fall back when it is missing): the
project itself never needs it; users pass --idx-dir.
"""
from __future__ import annotations

from pathlib import Path

from encinfer.datasets import has_idx

REPO = Path(__file__).resolve().parent.parent


def shared_mnist_dir() -> Path | None:
    """../shared/data/mnist next to the repository, if it holds the t10k files."""
    candidate = REPO.parent / "shared" / "data" / "mnist"
    return candidate if has_idx(candidate) else None
