"""The scaled topology's tests: `encinfer stack` with replicas, a real proxy and (in a network
namespace of the test's own) distributed MinIO, all real processes.

One topology per module (they take 20-40 s to start on 2 cores); a module's scenarios run
in order, each leaving the topology as the next one expects (the file says how).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_until

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/conftest.py's helpers (MINIO_BIN)

from conftest import MINIO_BIN

from encinfer.client import EncryptedClassifier
from encinfer.scaling import ScaleError, proxy_binary

CALL_TIMEOUT = 30.0
N_FEATURES = 784


def need_binaries(proxy: str = "haproxy") -> None:
    if not os.access(MINIO_BIN, os.X_OK):
        pytest.skip(f"no MinIO binary at {MINIO_BIN} (make minio-bin)")
    try:
        proxy_binary(proxy)
    except ScaleError as exc:
        pytest.skip(str(exc))


def key_fetches(log_path: Path) -> dict[str, int]:
    """key id -> how often this inference replica fetched it from the key store (its 'key fetched' lines)."""
    counts: dict[str, int] = {}
    if not log_path.exists():
        return counts
    for line in log_path.read_text(errors="replace").splitlines():
        if '"key fetched"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        key_id = record.get("key_id") or record.get("fields", {}).get("key_id")
        if key_id:
            counts[key_id] = counts.get(key_id, 0) + 1
    return counts


def fetches_by_replica(stack) -> dict[str, dict[str, int]]:
    return {r: key_fetches(stack.log_path(r)) for r in stack.replicas("inference")}


def owners(fetches: dict[str, dict[str, int]], key_id: str) -> dict[str, int]:
    """replica -> fetches of key_id, for the replicas that fetched it at all."""
    return {r: f[key_id] for r, f in fetches.items() if key_id in f}


def metric(address: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples whose labels include `labels`."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def tenant(stack, key_dir: Path, **kw) -> EncryptedClassifier:
    """A tenant: its own key dir (so its own key), talking to the proxy for both services."""
    address = stack.client_address
    return EncryptedClassifier(inference=address, keystore=address, model="mnist", token=stack.token("demo"),
                               key_dir=key_dir, layout="latency", timeout=CALL_TIMEOUT, **kw)


def sample(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(N_FEATURES)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """The suite's bounded wait (tests/conftest.py), polling less often: these checks read /proc and logs."""
    return wait_until(predicate, timeout=timeout, interval=interval)


def have_unshare() -> bool:
    return shutil.which("unshare") is not None and shutil.which("ip") is not None and os.geteuid() == 0
