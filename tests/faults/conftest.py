"""The fault suite's topology: real MinIO, the key store on S3 and inference with two
workers, each its own process, tokens on (compose's topology without containers).

Every scenario gets a fresh topology (faults break things), started under the test's
tmp_path, and stopped afterwards even when the test failed. The checks a scenario
ends with live here too: which processes of a service are left, which ports still
listen.

    def test_x(topology, tmp_path):
        with topology.classifier(tmp_path / "keys") as clf:
            clf.predict_one(x)
        topology.keystore_freeze()
        ...
        topology.assert_nothing_left()
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import MINIO_BIN, MinioServer, free_port, unique_bucket, wait_until
from service_procs import ServiceProcess, ServiceProcs

ALICE, BOB, SERVICE = "alice-token", "bob-token", "inference-service-token"
TOKEN_SPEC = f"{ALICE}=alice:tenant,{BOB}=bob:tenant,{SERVICE}=inference:service"
MODEL = "mnist"
CALL_TIMEOUT = 20.0   # every client call in the suite is bounded
EXIT_BOUND = 30.0     # a process that must exit does so within this (generous on 2 busy cores)


# ---------------------------------------------------------------- process checks

def process_group(pgid: int) -> list[tuple[int, str, str]]:
    """(pid, state, command line) of every process in group `pgid`, zombies included."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after ')'.
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            found.append((int(entry), fields[0], cmd))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return found


def children_of(pid: int) -> list[tuple[int, str, str]]:
    """(pid, state, command line) of the direct children of `pid`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().decode(errors="replace").rsplit(")", 1)[1].split()
            if int(fields[1]) != pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            out.append((int(entry), fields[0], cmd))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return out


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def exits_within(proc: ServiceProcess, timeout: float = EXIT_BOUND) -> int | None:
    """The exit code of the service's main process, or None if it is still running after timeout."""
    try:
        return proc.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def assert_group_gone(proc: ServiceProcess, timeout: float = 10.0) -> None:
    """No process of the service's group is left (workers, orphans, zombies)."""
    wait_until(lambda: not process_group(proc.pid), timeout=timeout, interval=0.1)
    left = process_group(proc.pid)
    assert not left, f"{proc.name} left processes behind: {left}"


# ---------------------------------------------------------------- the topology

@dataclass
class Topology:
    """MinIO + key store (s3) + inference (2 workers) as processes; see the module docstring."""

    workdir: Path
    model_stem: Path
    minio: MinioServer
    procs: ServiceProcs
    bucket: str = field(default_factory=lambda: unique_bucket("fault"))
    keystore_port: int = field(default_factory=free_port)
    keystore: ServiceProcess | None = None
    inference: ServiceProcess | None = None
    keystore_env: dict[str, str] = field(default_factory=dict)
    inference_env: dict[str, str] = field(default_factory=dict)

    # -------------------------------------------------------- start and stop
    def start_keystore(self, **env: str) -> ServiceProcess:
        """The key store on S3, always on the same port (so inference finds it after a restart)."""
        self.keystore_env = {**self.keystore_env, **env}
        self.keystore = self.procs.keystore({
            **self.minio.env(self.bucket), "ENCINFER_TOKENS": TOKEN_SPEC,
            "ENCINFER_KEYSTORE_ADDRESS": f"127.0.0.1:{self.keystore_port}",
            "ENCINFER_KEYSTORE_BACKEND_TIMEOUT": "5", "ENCINFER_KEYSTORE_HEALTH_INTERVAL": "0.5",
            **self.keystore_env})
        return self.keystore

    def start_inference(self, **env: str) -> ServiceProcess:
        self.inference_env = {**self.inference_env, **env}
        self.inference = self.procs.inference(self.model_stem, f"127.0.0.1:{self.keystore_port}", {
            "ENCINFER_TOKENS": TOKEN_SPEC, "ENCINFER_KEYSTORE_TOKEN": SERVICE, "ENCINFER_WORKERS": "2",
            "ENCINFER_GRACE_SECONDS": "5", **self.inference_env})
        return self.inference

    def restart_keystore(self) -> ServiceProcess:
        if self.keystore is not None:
            self.keystore.stop(signal.SIGKILL, timeout=10)
        return self.start_keystore()

    # -------------------------------------------------------- faults
    def keystore_kill(self) -> None:
        os.killpg(self.keystore.pid, signal.SIGKILL)
        self.keystore.process.wait(timeout=10)

    def keystore_freeze(self) -> None:
        os.killpg(self.keystore.pid, signal.SIGSTOP)

    def keystore_thaw(self) -> None:
        os.killpg(self.keystore.pid, signal.SIGCONT)

    def worker_pids(self) -> list[int]:
        """The inference service's live worker processes (its `encinfer-worker-N` children, not zombies)."""
        return [pid for pid, state, cmd in children_of(self.inference.pid)
                if state != "Z" and "encinfer-worker-" in cmd]

    # -------------------------------------------------------- clients
    def classifier(self, key_dir: Path, token: str = ALICE, **kw: Any):
        from encinfer.client.classifier import EncryptedClassifier
        kw.setdefault("timeout", CALL_TIMEOUT)
        return EncryptedClassifier(inference=self.inference.address, keystore=self.keystore.address,
                                   model=MODEL, token=token, key_dir=key_dir, **kw)

    # -------------------------------------------------------- end checks
    def stop(self) -> None:
        for proc in (self.keystore, self.inference):
            if proc is not None and proc.process.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        self.procs.stop_all()
        self.minio.stop()


@pytest.fixture(scope="session")
def fault_model(tmp_path_factory) -> Path:
    """The artifact stem of a small MNIST model, trained once for the suite."""
    from encinfer.inference.artifact import export_model
    from encinfer.inference.mnist import train_mnist

    estimator, _ = train_mnist(max_iter=50)
    stem = tmp_path_factory.mktemp("fault-model") / MODEL
    export_model(estimator, stem, name=MODEL, version="1")
    return stem


@pytest.fixture
def bare_topology(tmp_path, fault_model):
    """MinIO running, nothing else started: for scenarios that start services themselves."""
    if not (os.path.isfile(MINIO_BIN) and os.access(MINIO_BIN, os.X_OK)):
        pytest.skip(f"MinIO binary not found at {MINIO_BIN} (run `make minio-bin`)")
    (tmp_path / "minio").mkdir()
    minio = MinioServer(binary=MINIO_BIN, data_dir=tmp_path / "minio")
    minio.start()
    topo = Topology(workdir=tmp_path, model_stem=fault_model, minio=minio, procs=ServiceProcs(tmp_path))
    try:
        yield topo
    finally:
        topo.stop()
        shutil.rmtree(tmp_path / "minio", ignore_errors=True)


@pytest.fixture
def topology(bare_topology):
    """The whole topology, started and SERVING."""
    bare_topology.start_keystore()
    bare_topology.start_inference()
    return bare_topology


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """(result or raised exception, seconds): for bounds on how long a failure takes."""
    start = time.monotonic()
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the caller asserts on what came back
        result = e
    return result, time.monotonic() - start
