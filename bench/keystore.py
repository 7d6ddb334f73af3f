"""Key store throughput and memory: a ~50 MB key up and down through the service to MinIO.

Starts a real MinIO and the key store as a subprocess (S3 backend) on loopback,
uploads a real public key bundle (N=16384, eight moduli, one seeded Galois key per
rotation step: ~6 MB each), downloads it, and reports MB/s both ways (median of
--runs, the key deleted between uploads so every upload stores) and the key
store's peak RSS (VmHWM from /proc). Prints one JSON object.

    python -m bench.keystore                 # ~54 MB key, 3 runs
    python -m bench.keystore --steps 3 --runs 1   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from encinfer.stack import free_port

MINIO_BIN = os.environ.get("ENCINFER_MINIO_BIN", os.path.expanduser("~/.cache/encinfer/bin/minio"))
TOKEN = "bench-" + secrets.token_hex(8)


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def make_bundle(path: Path, steps: int) -> dict:
    from encinfer.he.params import CkksParams
    from encinfer.he.secret import SecretKeys

    params = CkksParams(poly_modulus_degree=16384, coeff_modulus_bits=(60, 40, 40, 40, 40, 40, 40, 60),
                        input_scale_bits=40, output_scale_bits=40,
                        galois_steps=tuple(1 << i for i in range(steps)))
    t = time.perf_counter()
    path.write_bytes(SecretKeys.generate(params).public_bundle())
    return {"keygen_seconds": round(time.perf_counter() - t, 2), "poly_modulus_degree": 16384,
            "coeff_modulus_bits": list(params.coeff_modulus_bits), "galois_steps": list(params.galois_steps)}


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def settled_rss_kib(pid: int, timeout: float = 15.0) -> int:
    """RSS once the key store has finished warming up (its parser loads in the background)."""
    last, stable_since, deadline = -1, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        rss = vm_kib(pid, "VmRSS")
        if abs(rss - last) > 512:
            last, stable_since = rss, time.monotonic()
        elif time.monotonic() - stable_since > 1.0:
            break
        time.sleep(0.1)
    return last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=9, help="Galois keys in the bundle (~6 MB each)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    if not os.access(MINIO_BIN, os.X_OK):
        print(json.dumps({"error": f"MinIO binary not found at {MINIO_BIN}; run `make minio-bin`"}))
        return 1

    from encinfer.client.keystore import KeyStoreClient

    work = Path(tempfile.mkdtemp(prefix="encinfer-bench-ks-"))
    minio = keystore = None
    try:
        bundle = work / "keys.bin"
        info = make_bundle(bundle, args.steps)
        size = bundle.stat().st_size

        port, user, password = free_port(), "bench", secrets.token_urlsafe(18)
        (work / "minio").mkdir()
        minio = subprocess.Popen(
            [MINIO_BIN, "server", "--quiet", "--address", f"127.0.0.1:{port}",
             "--console-address", f"127.0.0.1:{free_port()}", str(work / "minio")],
            env={**os.environ, "MINIO_ROOT_USER": user, "MINIO_ROOT_PASSWORD": password, "MINIO_BROWSER": "off"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def minio_ready() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/minio/health/ready", timeout=1).status == 200
            except OSError:
                return False
        wait(minio_ready, 30, "MinIO")

        log_path = work / "keystore.log"
        env = {**os.environ, "ENCINFER_KEYSTORE_ADDRESS": "127.0.0.1:0", "ENCINFER_KEYSTORE_BACKEND": "s3",
               "ENCINFER_KEYSTORE_DATA_DIR": str(work / "ks"), "ENCINFER_S3_ENDPOINT": f"127.0.0.1:{port}",
               "ENCINFER_S3_ACCESS_KEY": user, "ENCINFER_S3_SECRET_KEY": password,
               "ENCINFER_S3_BUCKET": "bench-keys", "ENCINFER_TOKENS": f"{TOKEN}=bench:tenant",
               "ENCINFER_LOG_LEVEL": "INFO"}
        with open(log_path, "wb") as log:
            keystore = subprocess.Popen([sys.executable, "-m", "encinfer.keystore.server"], env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
        target = ""

        def listening() -> bool:
            nonlocal target
            for line in log_path.read_text(errors="replace").splitlines():
                if '"key store listening"' in line:
                    target = json.loads(line)["address"]
                    return True
            if keystore.poll() is not None:
                raise RuntimeError(f"key store exited:\n{log_path.read_text()[-2000:]}")
            return False
        wait(listening, 60, "the key store")
        baseline_kib = settled_rss_kib(keystore.pid)

        ups, downs = [], []
        with KeyStoreClient(target, token=TOKEN) as client:
            for _ in range(args.runs):
                t = time.perf_counter()
                record = client.put(bundle)
                ups.append(size / (time.perf_counter() - t) / 1e6)
                t = time.perf_counter()
                client.get(record.key_id, dest=work / "copy.bin")
                downs.append(size / (time.perf_counter() - t) / 1e6)
                (work / "copy.bin").unlink()
                client.delete(record.key_id)
        peak_kib = vm_kib(keystore.pid, "VmHWM")
        stages: dict[str, list[float]] = {}
        for line in log_path.read_text(errors="replace").splitlines():
            if '"key stored"' in line or '"key read and verified"' in line:
                entry = json.loads(line)
                for k in ("receive_ms", "parse_ms", "store_ms", "read_ms"):
                    if k in entry:
                        stages.setdefault(k, []).append(entry[k])
        result = {
            "benchmark": "keystore", "key_bytes": size, **info,
            "upload_mb_s": round(statistics.median(ups), 1), "download_mb_s": round(statistics.median(downs), 1),
            "upload_runs_mb_s": [round(x, 1) for x in ups], "download_runs_mb_s": [round(x, 1) for x in downs],
            "keystore_idle_rss_bytes": baseline_kib * 1024, "keystore_peak_rss_bytes": peak_kib * 1024,
            "peak_rss_over_key_size": round(peak_kib * 1024 / size, 2),
            "keystore_stage_ms_median": {k: round(statistics.median(v), 1) for k, v in stages.items()},
            "load_average_1m": round(os.getloadavg()[0], 2),
            "targets": {"mb_s_each_way": 100, "peak_rss_over_key_size_below": 3},
            "note": ("MB = 10^6 bytes; client, key store and MinIO share this machine's cores. Upload = receive "
                     "(spool + SHA-256), then parse and S3 multipart write in parallel; download = read from S3 "
                     "and verify the whole key, then stream it"),
        }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        for proc in (keystore, minio):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
