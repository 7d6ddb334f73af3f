"""The two services as real subprocesses, configured only by environment variables:
for tests of what only a process shows (signals, TLS and metrics from env, its logs).

    procs = ServiceProcs(tmp_path)
    ks = procs.keystore({"ENCINFER_TOKENS": spec})
    inf = procs.inference(model_stem, ks.address, {"ENCINFER_KEYSTORE_TOKEN": token, ...})
    ...
    procs.stop_all()
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from conftest import wait_until

START_TIMEOUT = 90.0


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    address: str = ""
    metrics_port: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def logged(self, message: str) -> bool:
        return any(e.get("message") == message for e in self.log_lines())

    def metrics(self) -> str:
        """The Prometheus text at /metrics, fetched over HTTP on loopback."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            return reply.read().decode()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signals the main process, waits, then kills its whole group (workers too)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return self.process.returncode


@dataclass
class ServiceProcs:
    """Starts services under workdir and stops every one of them in stop_all()."""

    workdir: Path
    started: list[ServiceProcess] = field(default_factory=list)

    def _start(self, name: str, argv: list[str], env: dict[str, str], ready: str) -> ServiceProcess:
        log_path = self.workdir / f"{name}-{len(self.started)}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("ENCINFER_", "PROMETHEUS_"))}
        full_env = {**base, "PYTHONUNBUFFERED": "1", **env}
        with open(log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "encinfer.cli", *argv], env=full_env, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
                                       start_new_session=True)
        handle = ServiceProcess(name, process, log_path, metrics_port=int(env.get("ENCINFER_METRICS_PORT") or 0))
        self.started.append(handle)

        def up() -> bool:
            for entry in handle.log_lines():
                if entry.get("message") == ready:
                    handle.address = f"127.0.0.1:{entry['port']}"
                    return True
            return process.poll() is not None

        wait_until(up, timeout=START_TIMEOUT, interval=0.1)
        if not handle.address:
            handle.stop(signal.SIGKILL)
            raise RuntimeError(f"{name} did not start:\n{handle.log_text()[-3000:]}")
        return handle

    def keystore(self, env: dict[str, str]) -> ServiceProcess:
        """`encinfer keystore serve` on the filesystem backend and a free port."""
        env = {"ENCINFER_KEYSTORE_ADDRESS": "127.0.0.1:0",
               "ENCINFER_KEYSTORE_DATA_DIR": str(self.workdir / f"keystore-{len(self.started)}"), **env}
        return self._start("keystore", ["keystore", "serve"], env, "key store listening")

    def inference(self, model_stem: Path | str, keystore: str, env: dict[str, str]) -> ServiceProcess:
        """`encinfer inference serve --model STEM` on a free port, one worker unless env says otherwise."""
        env = {"ENCINFER_INFERENCE_ADDRESS": "127.0.0.1:0", "ENCINFER_KEYSTORE_TARGET": keystore,
               "ENCINFER_WORKERS": "1", **env}
        return self._start("inference", ["inference", "serve", "--model", str(model_stem)], env, "inference serving")

    def stop_all(self) -> None:
        for handle in reversed(self.started):
            handle.stop(timeout=15)


def metric_value(text: str, sample: str) -> float | None:
    """The value of one sample line, e.g. 'encinfer_rpcs_total{code="OK",method="/x"}' (labels sorted)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Every sample of a metric name: {'{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            out[key[len(name):]] = float(value)
    return out


__all__ = ["ServiceProcess", "ServiceProcs", "metric_value", "metric_samples"]
