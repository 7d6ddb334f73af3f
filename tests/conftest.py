"""Shared fixtures: a real MinIO server, free ports, key stores on either backend, key bundles.

Other test files use these too:
    from conftest import free_port, MinioServer
    def test_x(minio_server, keystore_factory): ...
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MINIO_BIN = os.environ.get("ENCINFER_MINIO_BIN", "/root/.cache/encinfer/bin/minio")
REPO = Path(__file__).resolve().parent.parent

from encinfer.stack import free_port  # shared with the tests that import it from here


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05) -> bool:
    """Polls predicate until true or timeout (a bounded wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@dataclass
class MinioServer:
    """A real MinIO on 127.0.0.1 with a private data dir and generated root credentials.

    stop()/start() keep the port and data, so a test can take storage away mid-run
    and bring it back; pause()/resume() freeze it (SIGSTOP) to test deadlines.
    """

    binary: str
    data_dir: Path
    port: int = field(default_factory=free_port)
    access_key: str = field(default_factory=lambda: "test-" + secrets.token_hex(4))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, bucket: str) -> dict[str, str]:
        """Key-store environment variables that point at this server."""
        return {"ENCINFER_KEYSTORE_BACKEND": "s3", "ENCINFER_S3_ENDPOINT": self.endpoint,
                "ENCINFER_S3_ACCESS_KEY": self.access_key, "ENCINFER_S3_SECRET_KEY": self.secret_key,
                "ENCINFER_S3_BUCKET": bucket, "ENCINFER_S3_SECURE": "false"}

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/minio/health/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        env = {**os.environ, "MINIO_ROOT_USER": self.access_key, "MINIO_ROOT_PASSWORD": self.secret_key,
               "MINIO_BROWSER": "off", "MINIO_UPDATE": "off"}
        self.log = open(self.data_dir.parent / "minio.log", "ab")
        self.process = subprocess.Popen(
            [self.binary, "server", "--quiet", "--address", self.endpoint,
             "--console-address", f"127.0.0.1:{free_port()}", str(self.data_dir)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_until(self.ready, timeout=30):
            self.stop()
            raise RuntimeError(f"MinIO did not become ready on {self.endpoint}; see {self.log.name}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        self.log.close()

    def pause(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)


@pytest.fixture(scope="session")
def minio_server():
    """One MinIO for the whole session (tests isolate themselves with their own bucket)."""
    if not (os.path.isfile(MINIO_BIN) and os.access(MINIO_BIN, os.X_OK)):
        pytest.skip(f"MinIO binary not found at {MINIO_BIN} (set ENCINFER_MINIO_BIN or run `make minio-bin`)")
    root = Path(tempfile.mkdtemp(prefix="encinfer-minio-"))
    (root / "data").mkdir()
    server = MinioServer(binary=MINIO_BIN, data_dir=root / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def unique_bucket(prefix: str = "t") -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


# ------------------------------------------------------------------ key stores


@pytest.fixture
def keystore_factory(tmp_path, request):
    """Starts in-process key stores (BackgroundKeyStore) and stops them after the test.

        ks = keystore_factory(backend="s3", minio=minio_server, tokens="t1=alice:tenant",
                              inspect=fake_inspect, max_keys_per_owner=3)
        KeyStoreClient(ks.target, token="t1")
    Extra keyword arguments override KeyStoreConfig fields.
    """
    from encinfer.common.auth import TokenTable, parse_spec
    from encinfer.keystore.config import KeyStoreConfig, S3Settings
    from encinfer.keystore.server import BackgroundKeyStore
    from encinfer.keystore.storage import open_backend
    from encinfer.keystore.store import KeyStore

    started: list[BackgroundKeyStore] = []

    def make(backend: str = "fs", *, minio: MinioServer | None = None, tokens: str | None = None,
             inspect=None, clock=None, bucket: str | None = None, **overrides) -> BackgroundKeyStore:
        fields = dict(address="127.0.0.1:0", backend=backend, data_dir=tmp_path / f"ks{len(started)}",
                      tokens=TokenTable(parse_spec(tokens) if tokens else None), health_interval=0.2,
                      backend_timeout=2.0)
        if backend == "s3":
            assert minio is not None, "pass minio=minio_server for the s3 backend"
            fields["s3"] = S3Settings(endpoint=minio.endpoint, access_key=minio.access_key,
                                      secret_key=minio.secret_key, bucket=bucket or unique_bucket())
        fields.update(overrides)
        config = KeyStoreConfig(**fields)

        def store(cfg: KeyStoreConfig) -> KeyStore:
            kwargs = {"inspect": inspect} if inspect else {}
            if clock:
                kwargs["clock"] = clock
            return KeyStore(open_backend(cfg), cfg, **kwargs)

        ks = BackgroundKeyStore(config, store)
        started.append(ks)
        return ks

    yield make
    for ks in started:
        ks.stop()


@dataclass
class KeyStoreProcess:
    """A key store run as `python -m encinfer.keystore.server` (the most realistic setup)."""

    process: subprocess.Popen
    address: str
    log_path: Path

    @property
    def target(self) -> str:
        return self.address

    def log_lines(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


# Runs the key store with key parsing replaced by fake_inspect (storage-only tests).
_FAKE_PARSER_MAIN = (
    "import sys; sys.path.insert(0, {tests!r}); import conftest; from encinfer.he import keys; "
    "keys.inspect_key_bundle = conftest.fake_inspect; from encinfer.keystore.server import main; sys.exit(main())")


def start_keystore_process(env: dict[str, str], log_path: Path, timeout: float = 30, *,
                           fake_parser: bool = False, command: list[str] | None = None) -> KeyStoreProcess:
    """Starts a key store subprocess on a free port and waits for its 'listening' log line.

    Default command: `python -m encinfer.keystore.server`; fake_parser=True swaps in
    fake_inspect; `command` runs anything else (e.g. the `encinfer keystore serve` script).
    """
    full_env = {**os.environ, "ENCINFER_KEYSTORE_ADDRESS": "127.0.0.1:0", **env}
    if command is None:
        command = [sys.executable, "-m", "encinfer.keystore.server"]
        if fake_parser:
            command = [sys.executable, "-c", _FAKE_PARSER_MAIN.format(tests=str(Path(__file__).parent))]
    log = open(log_path, "wb")
    process = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                               cwd=str(log_path.parent))
    log.close()
    handle = KeyStoreProcess(process=process, address="", log_path=log_path)

    def listening() -> bool:
        for entry in handle.log_lines():
            if entry.get("message") == "key store listening":
                handle.address = entry["address"]
                return True
        return process.poll() is not None

    wait_until(listening, timeout=timeout)
    if not handle.address:
        handle.stop(signal.SIGKILL)
        raise RuntimeError(f"key store did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
    return handle


@pytest.fixture
def keystore_process(tmp_path):
    """Starts key-store subprocesses (`keystore_process(env, fake_parser=True)`), stops them after the test."""
    started: list[KeyStoreProcess] = []

    def make(env: dict[str, str], **kwargs) -> KeyStoreProcess:
        env = {"ENCINFER_KEYSTORE_DATA_DIR": str(tmp_path / f"ksp{len(started)}"), **env}
        handle = start_keystore_process(env, tmp_path / f"keystore{len(started)}.log", **kwargs)
        started.append(handle)
        return handle

    yield make
    for handle in started:
        handle.stop()


# ------------------------------------------------------------------ key bundles


@pytest.fixture(scope="session")
def small_bundle() -> bytes:
    """A real public key bundle (N=4096, two Galois steps): valid upload bytes."""
    from encinfer.he.params import CkksParams
    from encinfer.he.secret import SecretKeys
    params = CkksParams(poly_modulus_degree=4096, coeff_modulus_bits=(40, 29, 40), input_scale_bits=29,
                        output_scale_bits=29, galois_steps=(1, 2))
    return SecretKeys.generate(params).public_bundle()


# ------------------------------------------------------------------ storage-only fakes

FAKE_MAGIC = b"FAKEKEY1"


def fake_key(size: int = 4096) -> bytes:
    """Random bytes that `fake_inspect` accepts: for tests of storage, not of key parsing."""
    return FAKE_MAGIC + os.urandom(max(0, size - len(FAKE_MAGIC)))


def fake_inspect(path):
    """Stands in for encinfer.he.keys.inspect_key_bundle where only storage behaviour matters."""
    from encinfer.common.errors import InvalidArgument
    from encinfer.he.keys import KeyInfo
    with open(path, "rb") as f:
        if f.read(len(FAKE_MAGIC)) != FAKE_MAGIC:
            raise InvalidArgument("not an encinfer key bundle")
    return KeyInfo(poly_modulus_degree=4096, coeff_modulus_bits=(40, 29, 40), has_public_key=True,
                   has_relin_keys=False, galois_steps=(2, 1), has_conjugation_key=False)


class FakeClock:
    """A clock a test moves forward by hand: `clock.advance(8 * 86400)`."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
