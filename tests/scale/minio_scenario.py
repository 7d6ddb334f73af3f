"""Distributed MinIO (4 nodes, EC:2) losing one node, then a second, under load; prints one JSON line.

Run by tests/scale/test_minio_nodes.py inside a network namespace the test creates
(`unshare -n`, lo up with 10.77.0.1 on it): MinIO refuses loopback endpoints on a machine
with /.dockerenv, so its nodes listen on 10.77.0.1, everything else on 127.0.0.1, and no
traffic leaves the namespace.

    python tests/scale/minio_scenario.py WORKDIR MINIO_HOST [nginx|haproxy]
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from encinfer.client import EncryptedClassifier
from encinfer.client.keystore import KeyStoreClient
from encinfer.common import errors
from encinfer.he.secret import SecretKeys
from encinfer.scaling import Scale
from encinfer.stack import Stack

TIMEOUT = 30.0
READ_WATCH_SECONDS = 6.0


def main(workdir: Path, host: str, proxy: str = "haproxy") -> dict:
    out: dict = {}
    scale = Scale(minio=4, proxy=proxy, minio_host=host)
    # The key store's storage deadline: compose's 5 s once proved shorter than MinIO's stall
    # right after a node died, on a loaded machine (docs/scaling.md).
    env = {"inference": {"ENCINFER_WORKERS": "1"}, "keystore": {"ENCINFER_KEYSTORE_BACKEND_TIMEOUT": "10"}}
    with Stack(workdir, free_ports=True, scale=scale, env=env,
               start_timeout=180, stop_grace=10) as stack:
        out["minio_nodes"] = [stack.address(n) for n in stack.replicas("minio")]
        address, token = stack.client_address, stack.token("demo")

        def classifier(name: str) -> EncryptedClassifier:
            return EncryptedClassifier(inference=address, keystore=address, token=token, layout="latency",
                                       key_dir=workdir / "tenants" / name, timeout=TIMEOUT)

        rng = np.random.default_rng(0)
        x = rng.random(784)
        clf = classifier("steady")
        clf.predict_one(x)
        params = clf.layout_info("latency").params
        bundles = [SecretKeys.generate(params).public_bundle() for _ in range(10)]
        # A tenant whose key is stored but was never used: predicting later makes inference read it.
        later = classifier("later")
        later.keys("latency")
        ks = KeyStoreClient(address, token=token, timeout=TIMEOUT, transfer_timeout=TIMEOUT)

        # ---- one node of four killed mid-load: nothing fails
        failures: list[str] = []
        counts = {"uploads": 0, "predictions": 0}
        stop = threading.Event()
        uploaded: list[str] = []
        upload_seconds: list[float] = []

        def uploads() -> None:
            for b in bundles[:6]:
                if stop.is_set():
                    return
                t0 = time.monotonic()
                try:
                    uploaded.append(ks.put(b).key_id)
                    counts["uploads"] += 1
                except Exception as exc:  # noqa: BLE001 - reported
                    failures.append(f"upload: {exc}")
                upload_seconds.append(round(time.monotonic() - t0, 2))
                time.sleep(0.5)

        def predictions() -> None:
            for _ in range(5000):  # bounded
                if stop.is_set():
                    return
                try:
                    clf.predict_one(x)
                    counts["predictions"] += 1
                except Exception as exc:  # noqa: BLE001 - reported
                    failures.append(f"predict: {exc}")

        threads = [threading.Thread(target=uploads), threading.Thread(target=predictions)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        stack.kill("minio-4", signal.SIGKILL)
        at_kill = dict(counts)
        time.sleep(5.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        out["one_down"] = {"failures": failures, **counts, "uploaded": len(uploaded),
                           "after_kill": {k: counts[k] - at_kill[k] for k in counts},
                           "upload_seconds": upload_seconds}

        # ---- a second node killed: writes lose quorum, reads and predictions go on
        stack.kill("minio-3", signal.SIGKILL)
        killed = time.monotonic()
        # Reads every 0.3 s for a while: until MinIO marks the node offline, a read can fail too.
        read_log = []
        while time.monotonic() - killed < READ_WATCH_SECONDS:
            t = round(time.monotonic() - killed, 2)
            try:
                ks.get(uploaded[-1])
                read_log.append((t, "ok"))
            except errors.EncinferError as exc:
                read_log.append((t, f"{exc.code}: {exc}"))
            time.sleep(0.3)
        failed = [t for t, r in read_log if r != "ok"]
        out["two_down_read_watch"] = {"reads": len(read_log), "failed": len(failed),
                                      "last_failure_s": max(failed) if failed else None,
                                      "failures": sorted({r for _, r in read_log if r != "ok"})[:3]}
        attempts = []
        for b in bundles[8:9]:  # after the read watch: MinIO has had time to notice
            t0 = time.monotonic()
            try:
                ks.put(b)
                attempt = {"code": "OK"}
            except errors.EncinferError as exc:
                attempt = {"code": exc.code, "message": str(exc)}
            attempts.append({**attempt, "seconds": round(time.monotonic() - t0, 2)})
        out["two_down_uploads"] = attempts
        reads = {}
        for kid in uploaded[:3]:
            try:
                data = ks.get(kid)
                reads[kid] = "ok" if len(data) > 0 else "empty"
            except errors.EncinferError as exc:
                reads[kid] = f"{exc.code}: {exc}"
        out["two_down_reads"] = reads
        try:
            out["two_down_stat"] = ks.stat(uploaded[0]) is not None if uploaded else "nothing uploaded"
        except errors.EncinferError as exc:
            out["two_down_stat"] = f"{exc.code}: {exc}"
        predicted = {}
        for name, c in (("cached", clf), ("fetched", later)):
            try:
                c.predict_one(x)
                predicted[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - reported
                predicted[name] = str(exc)
        out["two_down_predictions"] = predicted
        for c in (clf, later, ks):
            c.close()
    return out


if __name__ == "__main__":
    result = main(Path(sys.argv[1]), sys.argv[2], *sys.argv[3:4])
    print(json.dumps(result), flush=True)
