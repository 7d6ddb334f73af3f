"""`EncryptedClassifier`: scikit-learn's predict/decision_function, computed on
encrypted inputs by a remote encinfer service.

The secret key never leaves this process (it is saved with mode 0600 so later runs
reuse it); only public keys are uploaded. A client that remembers its key id (the
.json next to the secret) predicts at once, without asking the key store first, so
it keeps working while the key store is down and inference has the key cached; when
the service says the key is gone (NOT_FOUND: expired, deleted) or corrupted
(DATA_LOSS), the public keys are uploaded again once and the call is retried once.

Inputs are checked before anything is sent (`ValueError` naming the sample, the
value and the model's input range); every failure from a service is an
`encinfer.common.errors.EncinferError` (its `code` is the gRPC status code's name,
its `message` the server's words), never a grpc type.

Example::

    from encinfer.client import EncryptedClassifier
    with EncryptedClassifier(inference="127.0.0.1:50052", keystore="127.0.0.1:50051",
                             model="mnist", token="alice-token") as clf:
        digits = clf.predict(X_test[:10])        # X in [0, 1], shape (n, 784)
        scores = clf.decision_function(X_test[:10])
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from encinfer.client.keystore import KeyStoreClient, error_from_rpc
from encinfer.common import errors
from encinfer.common.auth import auth_metadata
from encinfer.common.files import write_atomic
from encinfer.common.routing import client_options, key_id_metadata
from encinfer.common.rpc import TlsFiles, channel
from encinfer.he.batch import BatchLayout, decrypt_batch, encrypt_batch
from encinfer.he.coeff import CoeffLayout, decrypt_coeff, encrypt_coeff
from encinfer.he.latency import LatencyLayout, decrypt_latency, encrypt_latency
from encinfer.he.secret import SecretKeys
from encinfer.modelinfo import Layout, ModelDescription
from encinfer.v1 import inference_pb2 as pb
from encinfer.v1 import inference_pb2_grpc

log = logging.getLogger(__name__)

# Re-upload keys that would expire within this margin.
EXPIRY_MARGIN_SECONDS = 3600
# From this many samples on, the batch layout wins: a batch costs about the same
# (0.1 s of server time, 21 MB up for the default MNIST model) however few samples
# it holds, against 2.6 ms and 96 KB per image in the latency layout; time breaks
# even near 40 images, bytes near 220.
AUTO_BATCH_FROM = 200
# Deadlines when the caller gives none: predictions (a stream of many images), and
# everything small (GetModelInfo, StatKeys).
PREDICT_TIMEOUT = 600.0
SMALL_TIMEOUT = 30.0

# One-sample layouts: (encrypt, decrypt, wire enum). "coeff" is used whenever the model offers it.
SINGLE_SAMPLE: dict[str, tuple[Callable[..., bytes], Callable[..., np.ndarray], pb.Layout]] = {
                 "coeff": (encrypt_coeff, decrypt_coeff, pb.LAYOUT_COEFF),
                 "latency": (encrypt_latency, decrypt_latency, pb.LAYOUT_LATENCY)}


class PredictionError(errors.EncinferError):
    """The service refused one input: its status code's name, the server's message and the request id.

    Each is also an instance of the error class of its code, so `except errors.NotFound`
    catches a refused item whose key is gone as well as a refused call."""

    def __init__(self, request_id: str, code: str, message: str) -> None:
        super().__init__(f"request {request_id}: {message}", code=code)
        self.request_id, self.message = request_id, message


@functools.cache
def _prediction_error_class(code: str) -> type[PredictionError]:
    base = type(errors.from_status(code))
    if base is errors.EncinferError:
        return PredictionError
    return type("PredictionError", (PredictionError, base), {"__module__": __name__})


def prediction_error(answer: pb.PredictResponse) -> PredictionError:
    """The error for an answer whose item status is not OK."""
    code = next((c.name for c in grpc.StatusCode if c.value[0] == answer.status.code), "UNKNOWN")
    return _prediction_error_class(code)(answer.request_id, code, answer.status.message)


def from_service(e: errors.EncinferError) -> errors.EncinferError:
    """Marks an error as the service's answer (not this process's own, e.g. a failed decryption)."""
    e.from_service = True
    return e


def stream_error(e: grpc.RpcError, failed: list[BaseException]) -> BaseException:
    """What a failed stream call raises: the request side's own error first (it ended the
    call: a bad sample, an encryption that failed), else the service's."""
    return failed[0] if failed else from_service(error_from_rpc(e))


def key_lost(e: errors.EncinferError) -> bool:
    """The service says the key itself is gone (expired, deleted) or corrupted: upload it again."""
    return (getattr(e, "from_service", False) and e.code in ("NOT_FOUND", "DATA_LOSS")
            and "key" in (e.message or str(e)).lower())


@dataclass
class CallStats:
    """What the last call cost: for the demo, the CLI and benchmarks."""

    n_samples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    encrypt_s: float = 0.0
    decrypt_s: float = 0.0
    wall_s: float = 0.0
    server_ms: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)


def default_key_dir() -> Path:
    return Path(os.environ.get("ENCINFER_KEY_DIR", Path.home() / ".local" / "share" / "encinfer" / "keys"))


# ---------------------------------------------------------------- input checks

def as_samples(X: Any, n_features: int, first_index: int = 0) -> np.ndarray:
    """X as a float (n_samples, n_features) array; ValueError saying what is wrong with its shape."""
    try:
        arr = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"samples must be numbers ({e})") from None
    if arr.ndim == 1 and arr.shape[0] == n_features:
        return arr[None, :]
    if arr.ndim == 2 and arr.shape[1] == n_features:
        return arr
    where = f"sample {first_index}: " if first_index else ""
    message = f"{where}expected {n_features} features per sample; got an array of shape {arr.shape}"
    if arr.ndim >= 2 and int(np.prod(arr.shape[1:])) == n_features:
        message += ": flatten images with X.reshape(len(X), -1)"
    elif arr.ndim >= 2 and int(np.prod(arr.shape)) == n_features:
        message += ": one image? flatten it with x.reshape(1, -1)"
    raise ValueError(message)


def check_values(X: np.ndarray, input_range: tuple[float, float] | None, layout: str,
                 first_index: int = 0) -> None:
    """ValueError naming the first sample and feature that is not finite or outside the model's input range."""
    lo, hi = input_range if input_range is not None else (-np.inf, np.inf)
    span = f"[{lo:g}, {hi:g}]" if input_range is not None else "finite"
    bad = ~np.isfinite(X)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"sample {first_index + i}, feature {j} is {X[i, j]}: inputs must be finite numbers "
                         f"in {span} ({int(bad.sum())} values are NaN or infinite)")
    if input_range is None:
        return
    outside = (X < lo) | (X > hi)
    if outside.any():
        i, j = (int(v) for v in np.argwhere(outside)[0])
        hint = ""
        if hi <= 1.0 and 1.0 < X.max() <= 255.0:
            hint = "; raw 0..255 pixels? divide them by 255"
        raise ValueError(f"sample {first_index + i}, feature {j} is {X[i, j]:g}, outside {span}, the input range "
                         f"the model's {layout} layout is sized for ({int(outside.sum())} values outside){hint}")


class EncryptedClassifier:
    """A remote linear model that only ever sees ciphertexts.

    layout: "auto" (batch from AUTO_BATCH_FROM samples on; below, one sample per request
    in the coefficient layout when GetModelInfo offers it, else the rotation layout),
    "coeff" or "latency" (one sample per request in that layout; "latency" is the
    rotation layout), or "batch".
    timeout: the deadline of every call this client makes, in seconds; None gives
    predictions PREDICT_TIMEOUT, small calls SMALL_TIMEOUT and key uploads a
    deadline that grows with the key's size.
    routing: "default" (one connection, e.g. to a proxy that hashes on the key id), or
    "ring_hash": grpcio's ring hash on the key id over several addresses, no proxy
    (inference="ipv4:10.0.0.1:50052,10.0.0.2:50052" or a DNS name with many records;
    docs/scaling.md). Idempotent calls are retried on UNAVAILABLE either way.
    """

    def __init__(self, inference: str = "127.0.0.1:50052", keystore: str = "127.0.0.1:50051",
                 model: str = "mnist", token: str | None = None, *, layout: str = "auto",
                 key_dir: str | os.PathLike | None = None, tls: TlsFiles | None = None,
                 keystore_tls: TlsFiles | None = None, timeout: float | None = None,
                 routing: str = "default") -> None:
        if layout not in ("auto", "coeff", "latency", "batch"):
            raise ValueError("layout must be 'auto', 'coeff', 'latency' or 'batch'")
        self.model, self.layout = model, layout
        self.timeout = PREDICT_TIMEOUT if timeout is None else timeout
        self._small_timeout = SMALL_TIMEOUT if timeout is None else min(timeout, SMALL_TIMEOUT)
        self._metadata = auth_metadata(token)
        # Which tenant a remembered key id was uploaded by (a fingerprint, not the token).
        self._tenant = hashlib.sha256((token or "").encode()).hexdigest()[:16]
        self._channel = channel(inference, tls, options=client_options(routing))
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._keystore = KeyStoreClient(keystore, token=token, tls=keystore_tls or tls,
                                        timeout=self._small_timeout, transfer_timeout=timeout)
        self.key_dir = Path(key_dir) if key_dir else default_key_dir()
        self._info: pb.ModelInfo | None = None
        self._description: ModelDescription | None = None
        self._secrets: dict[str, tuple[SecretKeys, str]] = {}
        self._generation: dict[str, int] = {}  # uploads per layout: a heal is done once per failure
        self._refresh: set[str] = set()         # layouts whose key expires soon (or is gone)
        self._keys_lock = threading.RLock()
        self.stats = CallStats()
        # ring_hash connects lazily: a first call must wait for its replica's connection.
        self._wait_for_ready = routing == "ring_hash"

    def _keyed(self, key_id: str) -> list[tuple[str, str]]:
        """The call's metadata with its key id, for routing (encinfer.common.routing)."""
        return [*self._metadata, *key_id_metadata(key_id)]

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> EncryptedClassifier:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()
        self._keystore.close()

    # ------------------------------------------------------------ model and keys
    @property
    def info(self) -> pb.ModelInfo:
        """GetModelInfo, asked once: the parameters every key and input is built from."""
        if self._info is None:
            try:
                self._info = self._stub.GetModelInfo(pb.GetModelInfoRequest(model=self.model),
                                                     metadata=self._metadata, timeout=self._small_timeout)
            except grpc.RpcError as e:
                raise error_from_rpc(e) from None
        return self._info

    @property
    def description(self) -> ModelDescription:
        """GetModelInfo as the model's description (built once: every key, input and check uses it)."""
        if self._description is None:
            self._description = ModelDescription.from_pb(self.info)
        return self._description

    @property
    def classes_(self) -> np.ndarray:
        """The class labels in the dtype the model was trained with, as scikit-learn gives them."""
        return self.description.labels()

    def layout_info(self, layout: str) -> Layout:
        """The layout as GetModelInfo describes it."""
        return self.description.layout(layout)

    def single_sample_layout(self) -> str:
        """The wire layout for one sample per request, from GetModelInfo: "coeff" when offered."""
        if self.layout == "latency":
            return "latency"
        if self.layout == "coeff" or "coeff" in self.description.layouts:
            return "coeff"
        return "latency"

    def _manifest(self, layout: str) -> str:
        return self.description.manifests[layout]

    def _paths(self, layout: str) -> tuple[Path, Path]:
        secret_path = self.key_dir / f"{self.model}-{layout}-{self._manifest(layout)[:16]}.secret"
        return secret_path, secret_path.with_suffix(".json")

    def keys(self, layout: str, progress: Callable[[int], None] | None = None) -> tuple[SecretKeys, str]:
        """The secret key for this layout (made once, kept on disk) and its uploaded key id.

        A remembered key id is checked with StatKeys (briefly: a key store that cannot be
        asked leaves it as it is) and the public keys uploaded again when the key is
        missing or expires soon. Predictions do not wait for that check: they use a
        remembered key id at once and upload again only when the service says it is lost.
        """
        secret, key_id, _ = self._current(layout, progress, verify=True)
        return secret, key_id

    def _current(self, layout: str, progress: Callable[[int], None] | None = None,
                 verify: bool = False) -> tuple[SecretKeys, str, int]:
        with self._keys_lock:
            if layout in self._secrets and layout not in self._refresh:
                return (*self._secrets[layout], self._generation.get(layout, 0))
            if layout in self._secrets:  # expires soon: renew, but a key store that is down must not block
                self._refresh.discard(layout)
                secret, key_id = self._secrets[layout]
                try:
                    self._upload(layout, secret, progress)
                except (errors.Unavailable, errors.DeadlineExceeded) as e:
                    log.info("could not renew the public keys; using the remembered key id",
                             extra={"fields": {"key_id": key_id, "error": f"{e.code}: {e}"}})
                return (*self._secrets[layout], self._generation.get(layout, 0))
            self.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            secret_path, meta_path = self._paths(layout)
            if secret_path.exists():
                secret = SecretKeys.load(secret_path)
            else:
                secret = SecretKeys.generate(self.layout_info(layout).params)
                secret.save(secret_path)
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            key_id = meta.get("key_id", "")
            self._generation[layout] = 0
            checked = bool(key_id) and (verify or meta.get("tenant") != self._tenant)
            if checked:  # asked for, or remembered for another tenant (or by an older client)
                key_id = self._verified(key_id)
                if key_id and meta.get("tenant") != self._tenant:
                    self._remember(layout, key_id)
            if key_id:
                self._secrets[layout] = (secret, key_id)
                if not checked:
                    self._check_expiry_in_background(layout, key_id)
            else:
                self._upload(layout, secret, progress)
            return (*self._secrets[layout], self._generation.get(layout, 0))

    def _verified(self, key_id: str) -> str:
        """key_id when the key store holds it for this tenant and not about to expire (or
        cannot be asked within a few seconds), else '' (upload again)."""
        try:
            record = self._keystore.stat(key_id, timeout=min(self._small_timeout, 5.0))
        except (errors.Unavailable, errors.DeadlineExceeded):
            return key_id
        except errors.DataLoss:
            return ""
        return key_id if record is not None and record.expires_in() >= EXPIRY_MARGIN_SECONDS else ""

    def _upload(self, layout: str, secret: SecretKeys, progress: Callable[[int], None] | None = None) -> str:
        """Uploads public keys made from the secret (caller holds the keys lock).

        Galois keys are randomized, so each latency upload is new bytes under a new key id
        (a batch key is the parameters only: the same bytes, stored again); the secret key
        stays, so nothing the caller holds is invalidated. A store that kept other bytes
        than were sent (DataLoss) gets one more bundle."""
        labels = {"model": self.model, "layout": layout}
        try:
            record = self._keystore.put(secret.public_bundle(), labels=labels, progress=progress)
        except errors.DataLoss as e:
            log.warning("the key store kept other bytes than were sent; uploading fresh public keys",
                        extra={"fields": {"layout": layout, "error": str(e)}})
            record = self._keystore.put(secret.public_bundle(), labels=labels, progress=progress)
        self._remember(layout, record.key_id)
        self._secrets[layout] = (secret, record.key_id)
        self._generation[layout] = self._generation.get(layout, 0) + 1
        log.info("public keys uploaded", extra={"fields": {"key_id": record.key_id, "bytes": record.size_bytes}})
        return record.key_id

    def _remember(self, layout: str, key_id: str) -> None:
        """Writes the key id next to the secret (atomically), with the tenant it belongs to."""
        meta_path = self._paths(layout)[1]
        write_atomic(meta_path, json.dumps({"key_id": key_id, "model": self.model, "layout": layout,
                                            "tenant": self._tenant}), mode=0o600)

    def _heal(self, layout: str, generation: int, cause: errors.EncinferError) -> None:
        """The service said the key is lost: upload it again, unless another call already did."""
        with self._keys_lock:
            if self._generation.get(layout) != generation:
                return
            secret, key_id = self._secrets[layout]
            log.info("the service lost the key; uploading it again",
                     extra={"fields": {"key_id": key_id, "error": f"{cause.code}: {cause.message}"}})
            self._refresh.discard(layout)
            self._upload(layout, secret)

    def _check_expiry_in_background(self, layout: str, key_id: str) -> None:
        """Asks the key store whether the remembered key expires soon; the next call renews it if so.

        In the background: an unreachable key store must neither block nor fail a prediction."""
        generation = self._generation[layout]

        def check() -> None:
            try:
                record = self._keystore.stat(key_id)
            except errors.DataLoss:
                record = None
            except Exception as e:  # noqa: BLE001 - a failed check only means no early renewal
                log.debug("key expiry not checked", extra={"fields": {"key_id": key_id, "error": repr(e)}})
                return
            if record is None or record.expires_in() < EXPIRY_MARGIN_SECONDS:
                with self._keys_lock:
                    if self._generation.get(layout) == generation:
                        self._refresh.add(layout)

        threading.Thread(target=check, name="encinfer-key-check", daemon=True).start()

    # ------------------------------------------------------------ input checks
    def check_samples(self, X: Any, layout: str, first_index: int = 0) -> np.ndarray:
        """X as (n_samples, n_features) floats, or ValueError naming the sample, the value and the model's range."""
        arr = as_samples(X, self.info.n_features, first_index)
        check_values(arr, self.layout_info(layout).input_range, layout, first_index)
        return arr

    # ------------------------------------------------------------ sklearn-style API
    def predict(self, X: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray:
        scores = self.decision_function(X, progress=progress)
        if scores.ndim == 1:  # a regressor
            return scores
        return self.classes_[scores.argmax(axis=1)]

    def decision_function(self, X: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Decrypted scores, one row per sample (n_samples x n_outputs)."""
        X = as_samples(X, self.info.n_features)
        layout = self.layout
        if layout == "auto":
            layout = "batch" if len(X) >= AUTO_BATCH_FROM else self.single_sample_layout()
        check_values(X, self.layout_info(layout).input_range, layout)
        self.stats = CallStats(n_samples=len(X))
        start = time.perf_counter()
        out = self._batch_retried(X, progress) if layout == "batch" else self._latency(X, progress)
        self.stats.wall_s = time.perf_counter() - start
        return out

    # ------------------------------------------------------------ latency layout
    def predict_stream(self, samples: Iterable[np.ndarray], window: int = 2) -> Iterator[tuple[int, np.ndarray]]:
        """Streams samples up and yields (index, scores) as answers arrive, in any order.

        At most `window` samples are in flight: with a window of 2, two worker processes
        stay busy (3.5 ms per image here, against 3.2 ms with 4 in flight) while each
        answer's latency stays compute, not queueing (p50 4.9 ms, against 8 ms).
        An array or list is checked whole before anything is sent; the samples of any
        other iterable each before it is sent (a bad one ends the stream with its ValueError).
        """
        name = self.single_sample_layout()
        layout = self.layout_info(name)
        assert isinstance(layout, (LatencyLayout, CoeffLayout))  # single_sample_layout() names one of these
        if isinstance(samples, (np.ndarray, list, tuple)):
            X = self.check_samples(samples, name) if len(samples) else np.zeros((0, self.info.n_features))
            source: Iterator[tuple[int, np.ndarray]] = enumerate(X)
            check = None
        else:
            source = enumerate(samples)

            def check(x: Any, i: int) -> np.ndarray:
                arr = as_samples(x, self.info.n_features, i)
                if len(arr) != 1:
                    raise ValueError(f"sample {i}: expected one sample of {self.info.n_features} features; "
                                     f"got an array of shape {np.shape(x)}")
                check_values(arr, layout.input_range, name, i)
                return arr[0]
        return self._stream(name, source, check, layout, window)

    def _stream(self, name: str, source: Iterator[tuple[int, np.ndarray]], check: Callable | None,
                layout: LatencyLayout | CoeffLayout,
                window: int) -> Iterator[tuple[int, np.ndarray]]:
        # Samples taken from the source and not yet answered: after the key is uploaded
        # again they are sent again on a new call (the source cannot be rewound).
        unanswered: dict[int, np.ndarray] = {}
        take = threading.Lock()
        if check is not None:  # the first sample is checked before any call is made
            first = next(source, None)
            if first is None:
                return
            unanswered[first[0]] = check(first[1], first[0])
        for attempt in itertools.count():
            secret, key_id, generation = self._current(name)
            with take:
                resend = sorted(unanswered.items(), key=lambda item: item[0])
            try:
                yield from self._stream_call(name, secret, key_id, source, check, layout, window, unanswered,
                                             resend, take)
                return
            except errors.EncinferError as e:
                if attempt or not key_lost(e):
                    raise
                self._heal(name, generation, e)

    def _stream_call(self, name: str, secret: SecretKeys, key_id: str, source, check,
                     layout: LatencyLayout | CoeffLayout, window: int,
                     unanswered: dict[int, np.ndarray], resend: list[tuple[int, np.ndarray]],
                     take: threading.Lock) -> Iterator[tuple[int, np.ndarray]]:
        encrypt, decrypt, wire_layout = SINGLE_SAMPLE[name]
        sent: dict[str, float] = {}
        stats = self.stats
        slots = threading.Semaphore(window)
        stopped = threading.Event()
        failed: list[BaseException] = []  # raised while making requests: re-raised as itself
        again = iter(resend)

        def next_sample() -> tuple[int, np.ndarray] | None:
            with take:  # one taker at a time, and nothing taken once this call stopped
                if stopped.is_set():
                    return None
                item = next(again, None)
                if item is not None:
                    return item
                item = next(source, None)
                if item is None:
                    return None
                i, x = item
                x = check(x, i) if check else x
                unanswered[i] = x
                return i, x

        def requests() -> Iterator[pb.PredictStreamRequest]:
            yield pb.PredictStreamRequest(header=pb.StreamHeader(model=self.model, key_id=key_id,
                                                                 layout=wire_layout))
            try:
                while not stopped.is_set():
                    if not slots.acquire(timeout=self.timeout):
                        raise errors.DeadlineExceeded(f"no answer for {window} samples in {self.timeout:g} s")
                    item = next_sample()
                    if item is None:
                        return
                    i, x = item
                    t = time.perf_counter()
                    ct = encrypt(secret, x, layout)
                    stats.encrypt_s += time.perf_counter() - t
                    stats.bytes_up += len(ct)
                    sent[str(i)] = time.perf_counter()
                    yield pb.PredictStreamRequest(item=pb.PredictRequest(request_id=str(i), ciphertext=ct))
            except Exception as e:  # noqa: BLE001 - ends the requests; the reader raises it
                failed.append(e)

        call = self._stub.PredictStream(requests(), metadata=self._keyed(key_id), timeout=self.timeout)
        try:
            try:
                for answer in call:
                    slots.release()
                    if answer.status.code:
                        raise from_service(prediction_error(answer))
                    stats.latencies_ms.append((time.perf_counter() - sent[answer.request_id]) * 1000)
                    stats.server_ms.append(answer.server_ms)
                    stats.bytes_down += sum(len(c) for c in answer.ciphertexts)
                    t = time.perf_counter()
                    scores = decrypt(secret, answer.ciphertexts[0], layout)
                    stats.decrypt_s += time.perf_counter() - t
                    unanswered.pop(int(answer.request_id), None)
                    yield int(answer.request_id), scores
                    if failed:
                        raise failed[0]
            except grpc.RpcError as e:
                raise stream_error(e, failed) from None
            if failed:
                raise failed[0]
        finally:
            # On an error, or a caller that stops reading: end the call (the server frees its
            # work) and wake the request thread waiting for a slot, which then returns.
            stopped.set()
            call.cancel()
            slots.release()

    def _latency(self, X: np.ndarray, progress: Callable[[int], None] | None) -> np.ndarray:
        out = np.zeros((len(X), self.info.n_outputs))
        name = self.single_sample_layout()
        layout = self.layout_info(name)
        assert isinstance(layout, (LatencyLayout, CoeffLayout))  # single_sample_layout() names one of these
        for i, scores in self._stream(name, enumerate(X), None, layout, 2):
            out[i] = scores
            if progress:
                progress(1)
        return out

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        """One sample over the unary Predict call (the simplest path, as ghz uses it)."""
        name = self.single_sample_layout()
        encrypt, decrypt, wire_layout = SINGLE_SAMPLE[name]
        layout = self.layout_info(name)
        arr = self.check_samples(x, name)
        if len(arr) != 1:
            raise ValueError(f"predict_one takes one sample; got an array of shape {np.shape(x)} "
                             "(use predict or predict_stream for many)")
        for attempt in itertools.count():
            secret, key_id, generation = self._current(name)
            ct = encrypt(secret, arr[0], layout)
            try:
                reply = self._stub.Predict(pb.PredictRequest(model=self.model, key_id=key_id, ciphertext=ct,
                                                             layout=wire_layout),
                                           metadata=self._keyed(key_id), timeout=self.timeout,
                                           wait_for_ready=self._wait_for_ready)
            except grpc.RpcError as e:
                err = from_service(error_from_rpc(e))
                if attempt or not key_lost(err):
                    raise err from None
                self._heal(name, generation, err)
                continue
            if reply.status.code:
                raise prediction_error(reply)
            return decrypt(secret, reply.ciphertexts[0], layout)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ batch layout
    def _batch_retried(self, X: np.ndarray, progress: Callable[[int], None] | None) -> np.ndarray:
        """_batch, once more when the service answered UNAVAILABLE (a worker or replica died).

        A stream cannot be retried by gRPC's policy (its requests are not buffered), and
        every batch in it is independent: sending the whole call again is safe.
        """
        try:
            return self._batch(X, progress)
        except errors.Unavailable as e:  # a refused batch (PredictionError) or the whole call
            reason = e.message or str(e)
        log.warning("batch stream retried once", extra={"fields": {"reason": reason[:200]}})
        self.stats = CallStats(n_samples=len(X))
        return self._batch(X, progress)

    def _batch(self, X: np.ndarray, progress: Callable[[int], None] | None) -> np.ndarray:
        for attempt in itertools.count():
            secret, key_id, generation = self._current("batch")
            try:
                return self._batch_call(secret, key_id, X, progress)
            except errors.EncinferError as e:
                if attempt or not key_lost(e):
                    raise
                self._heal("batch", generation, e)
        raise AssertionError("unreachable")

    def _batch_call(self, secret: SecretKeys, key_id: str, X: np.ndarray,
                    progress: Callable[[int], None] | None) -> np.ndarray:
        layout = self.layout_info("batch")
        assert isinstance(layout, BatchLayout)
        stats = self.stats
        chunks = [(str(i), X[s:s + layout.max_samples])
                  for i, s in enumerate(range(0, len(X), layout.max_samples))]
        # Interleave the parts of up to `window` batches so every server worker has one,
        # within the server's open-batch limit (0: not stated).
        window = min(4, self.info.limits.max_open_batches or 4)
        n_parts = len(layout.feature_indices)
        failed: list[BaseException] = []  # raised while making requests: re-raised as itself

        def requests() -> Iterator[pb.PredictStreamRequest]:
            yield pb.PredictStreamRequest(header=pb.StreamHeader(model=self.model, key_id=key_id,
                                                                 layout=pb.LAYOUT_BATCH))
            try:
                for group_start in range(0, len(chunks), window):
                    group = chunks[group_start:group_start + window]
                    streams = []
                    for rid, chunk in group:
                        t = time.perf_counter()
                        streams.append((rid, len(chunk), encrypt_batch(secret, chunk, layout)))
                        stats.encrypt_s += time.perf_counter() - t
                    for position in range(n_parts):
                        for rid, n, parts in streams:
                            t = time.perf_counter()
                            ct = next(parts)
                            stats.encrypt_s += time.perf_counter() - t
                            stats.bytes_up += len(ct)
                            yield pb.PredictStreamRequest(batch_part=pb.BatchPart(
                                request_id=rid, position=position, n_samples=n, ciphertext=ct))
                    if done_groups.get() is None:  # wait until this group is answered: bounded memory
                        return
            except Exception as e:  # noqa: BLE001 - ends the requests; the reader raises it
                failed.append(e)

        done_groups: queue.Queue = queue.Queue()
        results: dict[str, np.ndarray] = {}
        sizes = dict((rid, len(chunk)) for rid, chunk in chunks)
        group_of = {rid: i // window for i, (rid, _) in enumerate(chunks)}
        pending = {g: sum(1 for r in group_of if group_of[r] == g) for g in set(group_of.values())}
        call = self._stub.PredictStream(requests(), metadata=self._keyed(key_id), timeout=self.timeout)
        try:
            try:
                for answer in call:
                    if answer.status.code:
                        raise from_service(prediction_error(answer))
                    stats.server_ms.append(answer.server_ms)
                    stats.bytes_down += sum(len(c) for c in answer.ciphertexts)
                    t = time.perf_counter()
                    results[answer.request_id] = decrypt_batch(secret, list(answer.ciphertexts),
                                                               sizes[answer.request_id], layout)
                    stats.decrypt_s += time.perf_counter() - t
                    if progress:
                        progress(sizes[answer.request_id])
                    g = group_of[answer.request_id]
                    pending[g] -= 1
                    if pending[g] == 0:
                        done_groups.put(g)
            except grpc.RpcError as e:
                raise stream_error(e, failed) from None
            if failed:
                raise failed[0]
        finally:
            # On any error: end the call, and release the request thread if it waits for a group.
            call.cancel()
            done_groups.put(None)
        missing = [rid for rid, _ in chunks if rid not in results]
        if missing:
            raise errors.DataLoss(f"the service ended the stream without answering batches {missing}")
        return np.concatenate([results[rid] for rid, _ in chunks]) if chunks else np.zeros((0, self.info.n_outputs))
