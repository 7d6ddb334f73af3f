"""What key-id affinity buys: 3 inference replicas, 30 tenants each with its own key, sending Predict,
through HAProxy hashing on x-encinfer-key-id against the same HAProxy balancing round robin,
same replicas, same run (`make bench-scale`).

The stack is `encinfer stack up --inference-replicas 3 --proxy haproxy` (compose's
services, 2 workers per replica); a second HAProxy with `balance roundrobin`, rendered
from the same description, fronts the same replicas. Each phase has its own 30 tenants
(fresh keys, so both start cold), uploaded before the clock starts; each tenant then
sends REQUESTS Predicts of one pre-encrypted image, TENANTS_IN_FLIGHT tenants at a time.

Measured per phase: key-store fetches per key id (the replicas' 'key fetched' log lines),
the key-cache hit rate (encinfer_key_cache_events on every replica's /metrics: the
server's key-bytes cache and each worker's deserialized-key cache), p50/p99 of each
tenant's first Predict (its key fetched and deserialized on the way) and of the rest,
and throughput (the client runs on the same 2 cores: a floor, not a capacity).

    python -m bench.scale                 # writes BENCHMARKS.md's section and bench/scale.png
    python -m bench.scale --tenants 6 --requests 4 --no-write   # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from encinfer.client import EncryptedClassifier
from encinfer.common.auth import auth_metadata
from encinfer.common.routing import client_options, key_id_metadata
from encinfer.common.rpc import channel
from encinfer.he.latency import encrypt_latency
from encinfer.scaling import Scale, proxy_argv, proxy_config
from encinfer.stack import Stack, free_port
from encinfer.v1 import inference_pb2 as pb
from encinfer.v1 import inference_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
REPLICAS = 3
TENANTS_IN_FLIGHT = 4
MODEL = "mnist"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def scrape(address: str) -> dict[str, float]:
    """hit and miss counts of every key cache on one replica."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out = {"hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        if line.startswith("encinfer_key_cache_events_total{"):
            head, _, value = line.rpartition(" ")
            for event in out:
                if f'event="{event}"' in head:
                    out[event] += float(value)
    return out


def metric_sum(address: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if line.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def keystore_calls(stack: Stack) -> dict[str, float]:
    """RPCs the key store answered, by method (its /metrics)."""
    address = stack.address("keystore", 9101)
    return {m: metric_sum(address, "encinfer_rpcs_total", method=f"/encinfer.v1.KeyStore/{m}")
            for m in ("PutKeys", "StatKeys", "GetKeys")}


def cache_bytes(stack: Stack) -> float:
    return sum(metric_sum(stack.address(r, 9102), "encinfer_key_cache_bytes") for r in stack.replicas("inference"))


def cache_events(stack: Stack) -> dict[str, float]:
    total = {"hit": 0.0, "miss": 0.0}
    for r in stack.replicas("inference"):
        for k, v in scrape(stack.address(r, 9102)).items():
            total[k] += v
    return total


def key_fetches(stack: Stack) -> dict[str, int]:
    """key id -> fetches from the key store, over all replicas."""
    counts: dict[str, int] = {}
    for r in stack.replicas("inference"):
        for line in stack.log_path(r).read_text(errors="replace").splitlines():
            if '"key fetched"' in line:
                kid = json.loads(line).get("key_id")
                counts[kid] = counts.get(kid, 0) + 1
    return counts


class Tenant:
    """One tenant: its key uploaded, one encrypted image ready to send again and again."""

    def __init__(self, stack: Stack, key_dir: Path, x: np.ndarray, address: str) -> None:
        with EncryptedClassifier(inference=address, keystore=stack.client_address, model=MODEL,
                                 token=stack.token("demo"), key_dir=key_dir, layout="latency") as clf:
            secret, self.key_id = clf.keys("latency")
            self.ciphertext = encrypt_latency(secret, x, clf.layout_info("latency"))
        self.metadata = [*auth_metadata(stack.token("demo")), *key_id_metadata(self.key_id)]


def run_phase(address: str, tenants: list[Tenant], requests: int) -> dict:
    firsts: list[float] = []
    rest: list[float] = []
    errors = [0]
    lock = threading.Lock()
    with channel(address, options=client_options()) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)

        def one(t: Tenant) -> None:
            for i in range(requests):
                start = time.perf_counter()
                try:
                    stub.Predict(pb.PredictRequest(model=MODEL, key_id=t.key_id, ciphertext=t.ciphertext),
                                 metadata=t.metadata, timeout=60)
                except grpc.RpcError:
                    with lock:
                        errors[0] += 1
                    continue
                ms = (time.perf_counter() - start) * 1000
                with lock:
                    (firsts if i == 0 else rest).append(ms)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(TENANTS_IN_FLIGHT) as pool:
            list(pool.map(one, tenants))
        wall = time.perf_counter() - t0
    n = len(firsts) + len(rest)
    return {"calls": n, "errors": errors[0], "seconds": round(wall, 2), "calls_per_s": round(n / wall, 1),
            "first_p50_ms": round(percentile(firsts, 50), 1), "first_p99_ms": round(percentile(firsts, 99), 1),
            "warm_p50_ms": round(percentile(rest, 50), 2), "warm_p99_ms": round(percentile(rest, 99), 2)}


def measure(tenants_per_phase: int, requests: int, workdir: Path) -> dict:
    rng = np.random.default_rng(0)
    x = rng.random(784)
    with Stack(workdir, free_ports=True, scale=Scale(inference=REPLICAS, proxy="haproxy"),
               start_timeout=180) as stack:
        # The baseline: the same proxy, rendered from the same description, balancing round robin.
        runtime = workdir / "proxy-rr"
        (runtime / "run").mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = runtime / "haproxy.cfg"
        config.write_text(proxy_config(
            "haproxy", listen=f"127.0.0.1:{port}",
            inference=[stack.address(r, 50052) for r in stack.replicas("inference")],
            keystore=[stack.address("keystore", 50051)], runtime_dir=runtime / "run", affinity=False))
        rr = subprocess.Popen(proxy_argv("haproxy", config, runtime / "run"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            phases = {"affinity": stack.client_address, "round robin": f"127.0.0.1:{port}"}
            t0 = time.perf_counter()
            calls_before = keystore_calls(stack)
            groups = {name: [Tenant(stack, workdir / "tenants" / f"{name[:2]}{i}", x, address)
                             for i in range(tenants_per_phase)] for name, address in phases.items()}
            setup_s = time.perf_counter() - t0
            calls_after = keystore_calls(stack)
            per_tenant = {m: round((calls_after[m] - calls_before[m]) / (2 * tenants_per_phase), 2)
                          for m in calls_after}
            results: dict = {}
            for name, address in phases.items():
                before_events, before_fetches = cache_events(stack), key_fetches(stack)
                before_calls, before_bytes = keystore_calls(stack), cache_bytes(stack)
                result = run_phase(address, groups[name], requests)
                after_events, after_fetches = cache_events(stack), key_fetches(stack)
                after_calls, after_bytes = keystore_calls(stack), cache_bytes(stack)
                result["keystore_getkeys"] = int(after_calls["GetKeys"] - before_calls["GetKeys"])
                result["cache_bytes_added"] = int(after_bytes - before_bytes)
                hits = after_events["hit"] - before_events["hit"]
                misses = after_events["miss"] - before_events["miss"]
                per_key = [after_fetches.get(t.key_id, 0) - before_fetches.get(t.key_id, 0) for t in groups[name]]
                result.update({
                    "fetches_per_key": round(statistics.mean(per_key), 2), "fetches_max": max(per_key),
                    "cache_hit_rate": round(hits / (hits + misses), 3) if hits + misses else None,
                    "cache_hits": int(hits), "cache_misses": int(misses)})
                results[name] = result
        finally:
            rr.terminate()
            rr.wait(timeout=10)
    return {"replicas": REPLICAS, "workers_per_replica": 2, "tenants_per_phase": tenants_per_phase,
            "requests_per_tenant": requests, "tenants_in_flight": TENANTS_IN_FLIGHT,
            "keygen_and_upload_s_per_tenant": round(setup_s / (2 * tenants_per_phase), 2),
            "keystore_calls_per_new_tenant": per_tenant,
            "cache_bytes_per_key_affinity": int(results["affinity"]["cache_bytes_added"] / tenants_per_phase),
            "cores": os.cpu_count(), "phases": results}


def markdown(r: dict) -> str:
    a, b = r["phases"]["affinity"], r["phases"]["round robin"]
    rows = [("key-store fetches per key id (mean / max)", f"{a['fetches_per_key']} / {a['fetches_max']}",
             f"{b['fetches_per_key']} / {b['fetches_max']}"),
            ("key-cache hit rate (all caches)", f"{a['cache_hit_rate']:.1%}", f"{b['cache_hit_rate']:.1%}"),
            ("cache hits / misses", f"{a['cache_hits']} / {a['cache_misses']}",
             f"{b['cache_hits']} / {b['cache_misses']}"),
            ("tenant's first Predict p50 / p99 ms", f"{a['first_p50_ms']} / {a['first_p99_ms']}",
             f"{b['first_p50_ms']} / {b['first_p99_ms']}"),
            ("later Predicts p50 / p99 ms", f"{a['warm_p50_ms']} / {a['warm_p99_ms']}",
             f"{b['warm_p50_ms']} / {b['warm_p99_ms']}"),
            ("throughput, calls/s (2 cores, client included)", f"{a['calls_per_s']}", f"{b['calls_per_s']}"),
            ("key store GetKeys answered", f"{a['keystore_getkeys']}", f"{b['keystore_getkeys']}"),
            ("key-cache bytes added (all replicas)", f"{a['cache_bytes_added'] / 1e6:.1f} MB",
             f"{b['cache_bytes_added'] / 1e6:.1f} MB"),
            ("calls / errors", f"{a['calls']} / {a['errors']}", f"{b['calls']} / {b['errors']}")]
    lines = [BEGIN,
             f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `make bench-scale`: "
             f"{r['replicas']} inference "
             f"replicas ({r['workers_per_replica']} workers each), one key store, MinIO, all on this machine's "
             f"{r['cores']} cores with the client; {r['tenants_per_phase']} tenants per phase, each with its own key, "
             f"{r['requests_per_tenant']} Predicts each, {r['tenants_in_flight']} tenants in flight. Same HAProxy "
             "config description, hashing on `x-encinfer-key-id` (affinity) or `balance roundrobin`, in front of "
             "the same replicas; each phase with fresh keys.",
             "", "| | affinity (hash on key id) | round robin |", "|---|--:|--:|"]
    lines += [f"| {name} | {x} | {y} |" for name, x, y in rows]
    lines += ["", "The cache and fetch figures are the result; the throughput is capped by the 2 cores, "
              "which the client shares (it is a floor, not the replicas' capacity). Keygen and upload, before "
              f"the clock: {r['keygen_and_upload_s_per_tenant']} s per tenant; key-store calls per new tenant: "
              + ", ".join(f"{m} {v}" for m, v in r["keystore_calls_per_new_tenant"].items())
              + f"; key-cache bytes per key with affinity: {r['cache_bytes_per_key_affinity'] / 1e6:.2f} MB "
              "(the server's copy of the key bytes and each worker's deserialized keys).", "",
              "![affinity against round robin](bench/scale.png)", END]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Scaling out: key-id affinity (`make bench-scale`)\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["affinity", "round robin"]
    phases = [r["phases"][n] for n in names]
    colors = ["#2b7bba", "#d95f02"]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    panels = [("key-store fetches per key id", [p["fetches_per_key"] for p in phases], "{:.2f}"),
              ("key-cache hit rate", [100 * p["cache_hit_rate"] for p in phases], "{:.1f} %"),
              ("tenant's first Predict, p99 ms", [p["first_p99_ms"] for p in phases], "{:.0f}"),
              ("throughput, calls/s (2 cores)", [p["calls_per_s"] for p in phases], "{:.0f}")]
    for ax, (title, values, fmt) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color=colors)
        ax.set_title(title, fontsize=10)
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
        ax.margins(y=0.2)
    axes[2].bar(names, [p["first_p50_ms"] for p in phases], color="white", edgecolor="black", width=0.4,
                label="p50")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{r['replicas']} inference replicas, {r['tenants_per_phase']} tenants per phase, "
                 "HAProxy hash on x-encinfer-key-id vs round robin", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenants", type=int, default=30, help="tenants per phase (default 30)")
    p.add_argument("--requests", type=int, default=20, help="Predicts per tenant (default 20)")
    p.add_argument("--no-write", action="store_true", help="print the JSON only")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="encinfer-bench-scale-") as tmp:
        result = measure(args.tenants, args.requests, Path(tmp))
    print(json.dumps(result, indent=2))
    if not args.no_write:
        (ROOT / "bench" / "scale.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        plot(result, ROOT / "bench" / "scale.png")
        write_section(ROOT / "BENCHMARKS.md", markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
