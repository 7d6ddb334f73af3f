"""`encinfer predict`: classify images from IDX files or a .npy array, encrypted."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from encinfer.client import connection


def load_inputs(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray | None]:
    from encinfer import datasets

    if args.npy:
        X = np.load(args.npy, allow_pickle=False)
        if X.ndim == 3:  # images (n, 28, 28)
            X = X.reshape(len(X), -1)
        if X.dtype == np.uint8:  # raw pixels: the models take [0, 1]
            X = X / 255.0
        return X.astype(np.float64), None
    X, y = datasets.load_mnist(args.idx_dir, split="test")
    return X, y


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images (IDX files or .npy) on encrypted inputs")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--idx-dir", help="directory with t10k-images-idx3-ubyte[.gz] (labels used if present)")
    src.add_argument("--npy", help=".npy array: (n, features) in [0, 1], or uint8 images")
    p.add_argument("-n", type=int, default=None, help="only the first n samples")
    p.add_argument("--model", default="mnist")
    connection.add_arguments(p)
    p.add_argument("--layout", choices=("auto", "coeff", "latency", "batch"), default="auto")
    p.add_argument("--key-dir",
                   help="where the secret key is kept (default $ENCINFER_KEY_DIR or ~/.local/share/encinfer/keys)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Failures (a service down, inputs out of range) raise; `encinfer.cli.main` prints one line."""
    from tqdm import tqdm

    from encinfer.client.classifier import AUTO_BATCH_FROM, EncryptedClassifier

    X, y = load_inputs(args)
    if args.n:
        X, y = X[:args.n], (y[:args.n] if y is not None else None)
    tls = connection.tls_from(args)
    with EncryptedClassifier(inference=args.inference, keystore=args.keystore, model=args.model, token=args.token,
                             layout=args.layout, key_dir=args.key_dir, tls=tls) as clf:
        layout = args.layout if args.layout != "auto" else (
            "batch" if len(X) >= AUTO_BATCH_FROM else clf.single_sample_layout())
        clf.check_samples(X, layout)  # refused before any key is made or sent
        # The bar only for a person at a terminal, and only once the inference service answered.
        with tqdm(total=len(X), unit="img", desc="encrypted predict", file=sys.stderr, disable=None,
                  leave=False) as bar:
            predicted = clf.predict(X, progress=bar.update)
        stats = clf.stats
    result: dict[str, Any] = {"n": len(X), "predictions": [str(p) for p in predicted],
              "seconds": round(stats.wall_s, 3), "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down}
    if y is not None:
        result["accuracy"] = float(np.mean(predicted.astype(str) == y.astype(str)))
    if args.json:
        print(json.dumps(result))
    else:
        print(" ".join(result["predictions"]))
        if "accuracy" in result:
            print(f"accuracy {result['accuracy']:.4f} on {len(X)} images in {stats.wall_s:.2f} s", file=sys.stderr)
    return 0
