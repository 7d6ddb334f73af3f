"""The encinfer client library: `EncryptedClassifier` and `KeyStoreClient`.

    from encinfer.client import EncryptedClassifier

Imported lazily, so the `encinfer` command starts without loading TenSEAL.
"""
from __future__ import annotations

from typing import Any

__all__ = ["EncryptedClassifier", "KeyStoreClient", "PredictionError"]


def __getattr__(name: str) -> Any:
    if name in ("EncryptedClassifier", "PredictionError"):
        from encinfer.client import classifier
        return getattr(classifier, name)
    if name == "KeyStoreClient":
        from encinfer.client.keystore import KeyStoreClient
        return KeyStoreClient
    raise AttributeError(name)
