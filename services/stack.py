"""`encinfer stack`: deploy/compose.yml's topology without Docker, on loopback.

The stack reads the compose file itself -- services, commands, environment, secrets,
volumes, ports, health checks and depends_on -- and translates it for one machine:
container addresses become 127.0.0.1 ports, volumes become directories under the work
dir (the operator's deploy/secrets/ becomes the secrets dir; /run/secrets/NAME, for a
compose file with `secrets:`, a local secret file), the MinIO image becomes the MinIO
binary and the encinfer image becomes this Python's `encinfer` run through the image's
own entrypoint (deploy/entrypoint.sh). So `docker compose up` and `encinfer stack up`
cannot drift apart: there is one description of the deployment.

    encinfer stack secrets          # deploy/secrets/, which compose's init uses too
    encinfer stack up --for 60      # init, MinIO, s3-init, key store, inference

Python (tests, `make load`)::

    with Stack(workdir=tmp_path, free_ports=True) as stack:
        stack.address("inference")  # '127.0.0.1:PORT'
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets as secrets_lib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from encinfer.common.files import write_atomic
from encinfer.scaling import PROXY, PROXY_PORT, Scale, expand, minio_endpoints, proxy_argv, proxy_config, replica_ports

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "deploy" / "compose.yml"
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"
CACHE = Path(os.environ.get("ENCINFER_CACHE", Path.home() / ".cache" / "encinfer"))
MINIO_IMAGE = "quay.io/minio/minio"
# Paths that exist inside the encinfer image (deploy/Dockerfile), mapped to local ones.
IMAGE_MODELS_DIR = "/app/models"
# The command deploy/Dockerfile runs at build time for the default model; the stack runs
# the same one when the artifact is missing (tests check the Dockerfile still says this).
DEFAULT_MODEL_COMMAND = ("model", "train-mnist", "--out")
# The bind mount of deploy/secrets/ in compose.yml: the stack's secrets_dir stands in for it.
OPERATOR_SECRETS_SOURCE = "./secrets"
LOOPBACK_HOSTS = ("", "0.0.0.0", "127.0.0.1", "localhost", "::")
# Compose services the stack starts only when named (`--only web`, services=[...]), and why:
# the stack runs them like the rest, but a plain checkout lacks what they need.
ON_REQUEST = {"web": "the browser page needs node-seal's files, which `make web-deps` puts in web/static/vendor/ "
                     "(the image builds them in)"}


class StackError(RuntimeError):
    """The stack could not start (or a service died); the message says which and why."""


# ---------------------------------------------------------------------------- secrets

def _tokens_pair() -> dict[str, str]:
    tenant, service = secrets_lib.token_urlsafe(24), secrets_lib.token_urlsafe(24)
    table = {tenant: {"owner": "demo", "role": "tenant"}, service: {"owner": "inference", "role": "service"}}
    return {"tokens.json": json.dumps(table, indent=2) + "\n", "inference_keystore_token": service + "\n",
            "demo_token": tenant + "\n"}


# File name -> generator. Files that must agree with each other are generated together.
SECRET_GROUPS: tuple[tuple[tuple[str, ...], Callable[[], dict[str, str]]], ...] = (
    (("minio_root_user",), lambda: {"minio_root_user": "root-" + secrets_lib.token_hex(4) + "\n"}),
    (("minio_root_password",), lambda: {"minio_root_password": secrets_lib.token_urlsafe(24) + "\n"}),
    # MinIO limits: access key 3-20 characters, secret key 8-40.
    (("keystore_s3_access_key",), lambda: {"keystore_s3_access_key": "encinfer-keystore\n"}),
    (("keystore_s3_secret_key",), lambda: {"keystore_s3_secret_key": secrets_lib.token_urlsafe(24) + "\n"}),
    # demo_token is not a compose secret: the tenant token a client uses (owner "demo").
    (("tokens.json", "inference_keystore_token", "demo_token"), _tokens_pair),
)


def write_secrets(directory: Path, force: bool = False) -> list[Path]:
    """Writes the dev secrets compose.yml names (random values); keeps existing ones unless force.

    The directory is private (0700). The files are 0644 on purpose: compose mounts file
    secrets as bind mounts with the host file's mode, and the services run as a non-root
    user inside their containers, so they must be readable there.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    written = []
    for names, generate in SECRET_GROUPS:
        if not force and all((directory / n).exists() for n in names):
            continue
        for name, content in generate().items():
            written.append(write_atomic(directory / name, content, mode=0o644))
    return written


# ---------------------------------------------------------------------------- compose model

@dataclass
class Service:
    """One compose service, translated for loopback."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ports: dict[int, int]                      # container port -> local port
    depends_on: dict[str, str]                 # service -> condition
    health: list[str] | None                   # translated health-check test (CMD form)
    one_shot: bool
    model_stems: list[Path] = field(default_factory=list)


def load_compose(path: Path = COMPOSE_FILE) -> dict:
    try:
        import yaml  # a dev dependency: the stack is a development tool, not part of the image
    except ImportError:
        raise StackError("encinfer stack needs PyYAML: pip install -e '.[dev]'") from None
    if not path.is_file():
        raise StackError(f"{path} not found: encinfer stack runs from a checkout of the repository")

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def published_ports(spec: Mapping) -> dict[int, int]:
    """container port -> published host port, from `ports:` (short or long form) and `expose:`."""
    result: dict[int, int] = {}
    for entry in spec.get("ports", []) or []:
        if isinstance(entry, Mapping):
            target, published = int(entry["target"]), int(entry.get("published") or entry["target"])
        else:
            parts = str(entry).split("/")[0].rsplit(":", 2)
            target = int(parts[-1])
            published = int(parts[-2]) if len(parts) >= 2 and parts[-2] else target
        result[target] = published
    for entry in spec.get("expose", []) or []:
        port = int(str(entry).split("/")[0])
        result.setdefault(port, port)
    return result


def start_order(services: Mapping[str, Mapping], wanted: Iterable[str]) -> list[str]:
    """The wanted services and everything they depend on, dependencies first."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in services:
            raise StackError(f"no service {name!r} in the compose file (have: {', '.join(services)})")
        if name in visiting:
            raise StackError(f"depends_on cycle through {name!r}")
        visiting.add(name)
        for dep in _depends_on(services[name]):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def _depends_on(spec: Mapping) -> dict[str, str]:
    deps = spec.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (cond or {}).get("condition", "service_started") for name, cond in deps.items()}


def _as_env(spec: Mapping) -> dict[str, str]:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in env.items()}


def _health_test(spec: Mapping) -> list[str] | None:
    hc = spec.get("healthcheck") or {}
    if not hc or hc.get("disable"):
        return None
    test = hc.get("test")
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    if not test or test[0] == "NONE":
        return None
    return [str(t) for t in test]


_ADDRESS = re.compile(r"(?<![\w.-])(?P<host>[A-Za-z0-9_.-]*):(?P<port>\d{1,5})(?!\d)")


class Translator:
    """Rewrites container-world strings (addresses, secret and volume paths) for loopback."""

    def __init__(self, ports: Mapping[str, Mapping[int, int]], secrets: Mapping[str, Path],
                 paths: Mapping[str, Mapping[str, Path]], image_paths: Mapping[str, Path],
                 hosts: Mapping[str, str] | None = None,
                 targets: Mapping[tuple[str, int], str] | None = None) -> None:
        self.ports, self.secrets, self.paths, self.image_paths = ports, secrets, paths, image_paths
        # The scaled topology: a service on another host than 127.0.0.1 (distributed MinIO),
        # and `service:port` addresses that stand for several replicas (a proxy, a target list).
        self.hosts, self.targets = dict(hosts or {}), dict(targets or {})

    def port(self, service: str, container_port: int) -> int:
        try:
            return self.ports[service][container_port]
        except KeyError:
            raise StackError(f"service {service!r} uses port {container_port}, which its `ports:` or "
                             "`expose:` does not list") from None

    def __call__(self, service: str, value: str, env_name: str = "") -> str:
        if env_name.endswith("_PORT") and value.isdigit():
            return str(self.port(service, int(value)))
        for name, path in self.secrets.items():
            value = value.replace(f"/run/secrets/{name}", str(path))
        for container_path, local in {**self.image_paths, **self.paths.get(service, {})}.items():
            # Whole path components only: /data maps, /database does not.
            value = re.sub(rf"(?<![\w./-]){re.escape(container_path)}(?=/|,|$)", str(local), value)

        def address(m: re.Match) -> str:
            host, port = m.group("host"), int(m.group("port"))
            if host in LOOPBACK_HOSTS:
                return f"{self.hosts.get(service, '127.0.0.1')}:{self.port(service, port)}"
            if (host, port) in self.targets:
                return self.targets[(host, port)]
            if host in self.ports:
                return f"{self.hosts.get(host, '127.0.0.1')}:{self.port(host, port)}"
            return m.group(0)

        return _ADDRESS.sub(address, value)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def minio_binary() -> Path:
    path = Path(os.environ.get("ENCINFER_MINIO_BIN") or CACHE / "bin" / "minio")
    if not path.is_file():
        raise StackError(f"MinIO binary {path} not found: run `make minio-bin` or set ENCINFER_MINIO_BIN")
    return path


def encinfer_command() -> list[str]:
    """This interpreter's encinfer, so the stack runs the code it was started from."""
    return [sys.executable, "-m", "encinfer.cli"]


# ---------------------------------------------------------------------------- the stack

@dataclass
class _Running:
    service: Service
    process: subprocess.Popen
    log_path: Path


class Stack:
    """The compose topology as local processes; a context manager that always cleans up.

    workdir holds logs/, volumes/ (MinIO's data, the key store's spool) and, unless
    secrets_dir is given, secrets/. free_ports=True picks free loopback ports instead of
    the ports compose publishes (tests run in parallel). services limits the stack to
    those services and their dependencies. env adds or overrides variables per service.
    """

    def __init__(self, workdir: Path | str, *, compose_file: Path | str = COMPOSE_FILE,
                 secrets_dir: Path | str | None = None, models_dir: Path | str | None = None,
                 free_ports: bool = False, services: Iterable[str] | None = None,
                 env: Mapping[str, Mapping[str, str]] | None = None,
                 start_timeout: float = 90.0, stop_grace: float = 15.0, scale: Scale | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.compose_file = Path(compose_file).resolve()
        self.secrets_dir = Path(secrets_dir).resolve() if secrets_dir else self.workdir / "secrets"
        self.models_dir = Path(models_dir).resolve() if models_dir else CACHE / "models"
        self.free_ports = free_ports
        self.start_timeout, self.stop_grace = start_timeout, stop_grace
        self.compose = load_compose(self.compose_file)
        all_services = self.compose.get("services") or {}
        self.order = start_order(all_services, services or [n for n in all_services if n not in ON_REQUEST])
        # Replicas, a proxy, distributed MinIO (encinfer.scaling); Scale() is compose's own topology.
        self.scale = scale or Scale()
        self.spec, self.order, self.groups = expand(all_services, self.order, self.scale)
        self._env_overrides = {k: dict(v) for k, v in (env or {}).items()}
        self.services: dict[str, Service] = {}
        self._running: dict[str, _Running] = {}
        self.pids: dict[str, int] = {}  # every process started, kept after stop (for checks)

    # ---- public API

    def address(self, service: str, container_port: int | None = None) -> str:
        """Where a service listens locally ('127.0.0.1:PORT'); its first published port by default."""
        ports = self.services[service].ports
        port = ports[container_port] if container_port is not None else next(iter(ports.values()))
        host = self.scale.minio_host if service in self.groups.get("minio", ()) else "127.0.0.1"
        return f"{host}:{port}"

    def replicas(self, service: str) -> list[str]:
        """The names of a compose service's replicas: 'inference', 'inference-2', ..."""
        return list(self.groups.get(service, [service]))

    @property
    def client_address(self) -> str:
        """Where clients connect, for both services: the proxy, or inference without one."""
        return self.address(PROXY) if PROXY in self.services else self.address("inference")

    def kill(self, service: str, sig: int = signal.SIGKILL) -> None:
        """Kills one service's process group (a fault); stop() then leaves it alone."""
        running = self._running[service]
        try:
            os.killpg(running.process.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            running.process.wait(timeout=30)

    def env(self, service: str) -> dict[str, str]:
        """The translated compose environment of a service (what its process got, minus the OS env)."""
        return dict(self.services[service].env)

    @property
    def tokens_file(self) -> Path:
        return self.secrets_dir / "tokens.json"

    def token(self, owner: str = "demo") -> str:
        """A bearer token of the given owner from the tokens file."""
        table = json.loads(self.tokens_file.read_text(encoding="utf-8"))
        for token, who in table.items():
            if who["owner"] == owner:
                return token
        raise KeyError(owner)

    def log_path(self, service: str) -> Path:
        return self.workdir / "logs" / f"{service}.log"

    def pid(self, service: str) -> int | None:
        running = self._running.get(service)
        return running.process.pid if running and running.process.poll() is None else None

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.prepare()
        try:
            for name in self.order:
                self._start_service(self.services[name])
            self._wait_proxy_routes()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stops in reverse start order: SIGTERM, wait stop_grace, then SIGKILL the process group."""
        for name in reversed(list(self._running)):
            running = self._running.pop(name)
            _terminate(running.process, self.stop_grace)
            log.info("stopped", extra={"fields": {"service": name, "returncode": running.process.returncode}})

    def check_alive(self) -> None:
        """Raises if a long-running service has exited (compose would restart it; we report it)."""
        for name, running in self._running.items():
            code = running.process.poll()
            if code is not None and not running.service.one_shot:
                raise StackError(f"{name} exited with code {code}:\n{_tail(running.log_path)}")

    # ---- translation

    def prepare(self) -> None:
        """Translates the compose file for loopback (ports, secrets, volumes); start() calls it."""
        if self.services:
            return
        spec = self.spec
        compose_dir = self.compose_file.parent
        needed_secrets = {s for name in self.order for s in _service_secrets(spec[name])}
        secret_files: dict[str, Path] = {}
        for name in needed_secrets:
            source = (self.compose.get("secrets") or {}).get(name) or {}
            if "file" not in source:
                raise StackError(f"secret {name!r} has no `file:` in the compose file")
            secret_files[name] = self.secrets_dir / Path(source["file"]).name
        # The operator's secrets directory (compose's `init` copies what it finds there) is
        # secrets_dir here, filled like `encinfer stack secrets` so clients can read the tokens.
        operator_dir = any(str(v).split(":")[0] == OPERATOR_SECRETS_SOURCE
                           for name in self.order for v in spec[name].get("volumes", []) or [])
        if operator_dir or any(not p.exists() for p in secret_files.values()):
            written = write_secrets(self.secrets_dir)
            log.info("wrote secrets", extra={"fields": {"dir": str(self.secrets_dir), "files": len(written)}})

        ports = {}
        for name in self.order:
            published = published_ports(spec[name])
            index = self._replica_index(name)
            if self.scale.minio > 1 and name in self.groups.get("minio", ()):
                index += 1  # the proxy's S3 listener takes MinIO's published port
            ports[name] = {c: (free_port() if self.free_ports else h)
                           for c, h in replica_ports(published, index).items()}
        proxy_ports = self._proxy_ports()
        paths: dict[str, dict[str, Path]] = {}
        for name in self.order:
            for volume in spec[name].get("volumes", []) or []:
                source, _, target = str(volume).partition(":")
                target = target.split(":")[0]
                if source == OPERATOR_SECRETS_SOURCE:
                    local = self.secrets_dir
                elif source.startswith((".", "/")):
                    local = compose_dir / source
                else:
                    local = self.workdir / "volumes" / source
                local.mkdir(parents=True, exist_ok=True)
                paths.setdefault(name, {})[target] = local.resolve()
        hosts = {name: self.scale.minio_host for name in self.groups.get("minio", ())}
        translate = Translator(ports, secret_files, paths, {IMAGE_MODELS_DIR: self.models_dir},
                               hosts=hosts, targets=self._targets(spec, ports, proxy_ports))

        for name in self.order:
            s = spec[name]
            env = {k: translate(name, v, k) for k, v in _as_env(s).items()}
            env.update(self._env_overrides.get(name, {}))
            command = [translate(name, str(a)) for a in (s.get("command") or [])]
            health = _health_test(s)
            self.services[name] = Service(
                name=name, argv=self._argv(name, s, command), env=env, ports=ports[name],
                depends_on=_depends_on(s), one_shot=s.get("restart", "no") in ("no", False, None) and not ports[name],
                health=[translate(name, a) for a in health] if health else None,
                model_stems=[Path(m) for m in env.get("ENCINFER_MODELS", "").split(",") if m.strip()],
            )
        if self.scale.minio > 1:
            self._distribute_minio(paths)
        if self.scale.proxy:
            self._add_proxy(proxy_ports)

    # ---- the scaled topology (encinfer.scaling)

    def _wait_proxy_routes(self) -> None:
        """Until a health check through the proxy answers, and HAProxy has seen every replica up."""
        if PROXY not in self.services or "inference" not in self.services:
            return
        deadline = time.monotonic() + self.start_timeout
        while not _grpc_serving(self.address(PROXY), timeout=2.0):
            self.check_alive()
            if time.monotonic() > deadline:
                raise StackError(f"no answer through the proxy within {self.start_timeout:g} s:\n"
                                 f"{_tail(self.log_path(PROXY))}")
            time.sleep(0.2)
        if self.scale.proxy == "haproxy" and self.order.index(PROXY) < self.order.index(self.groups["inference"][-1]):
            # Started before the replicas, HAProxy marked them down; its checks (every 2 s,
            # rise 1) bring each back within one interval of its start.
            time.sleep(2.5)

    def _replica_index(self, name: str) -> int:
        for replicas in self.groups.values():
            if name in replicas:
                return replicas.index(name) + 1
        return 1

    def _proxy_ports(self) -> dict[str, int]:
        if not self.scale.proxy:
            return {}
        minio_port = next(iter(published_ports(self.spec["minio"]).values()), 9000) if "minio" in self.spec else 9000
        wanted = {"grpc": PROXY_PORT, **({"s3": minio_port} if self.scale.minio > 1 else {})}
        return {k: (free_port() if self.free_ports else p) for k, p in wanted.items()}

    def _targets(self, spec: Mapping, ports: Mapping[str, Mapping[int, int]],
                 proxy_ports: Mapping[str, int]) -> dict[tuple[str, int], str]:
        """`service:port` in compose that stands for several replicas here."""
        targets = {}
        if "s3" in proxy_ports:
            for port in published_ports(spec["minio"]):
                targets[("minio", port)] = f"127.0.0.1:{proxy_ports['s3']}"
        keystores = self.groups.get("keystore", [])
        if len(keystores) > 1:
            for port in published_ports(spec["keystore"]):
                # One gRPC target listing every replica (pick_first fails over to the next).
                targets[("keystore", port)] = "ipv4:" + ",".join(f"127.0.0.1:{ports[k][port]}" for k in keystores)
        return targets

    def _distribute_minio(self, paths: Mapping[str, Mapping[str, Path]]) -> None:
        """Each node's `server DRIVE` becomes `server ENDPOINT1 ... ENDPOINTn`, and only the last
        node waits for health (the cluster's): a node alone never forms a quorum."""
        nodes = self.groups["minio"]
        api_port = next(iter(published_ports(self.spec["minio"])))
        drives = [(self.services[n].ports[api_port], next(iter(paths[n].values()))) for n in nodes]
        endpoints = minio_endpoints(self.scale.minio_host, drives)
        for i, name in enumerate(nodes):
            service = self.services[name]
            drive = str(drives[i][1])
            service.argv = [a for arg in service.argv for a in (endpoints if arg == drive else [arg])]
            service.env["MINIO_CI_CD"] = "1"  # drives on the root filesystem are fine for tests
            last = i == len(nodes) - 1
            address = f"{self.scale.minio_host}:{service.ports[api_port]}"
            service.health = ["CMD", "curl", "-fsS", f"http://{address}/minio/health/cluster"] if last else None

    def _add_proxy(self, proxy_ports: Mapping[str, int]) -> None:
        """The proxy, from deploy/proxy/render.py: right after MinIO when it fronts MinIO's nodes."""
        kind = str(self.scale.proxy)
        runtime = self.workdir / "proxy"
        (runtime / "run").mkdir(parents=True, exist_ok=True)

        def grpc(service: str, port: int) -> list[str]:
            return [f"127.0.0.1:{self.services[r].ports[port]}"
                    for r in self.groups.get(service, []) if r in self.services]

        minio = ([f"{self.scale.minio_host}:{self.services[n].ports[next(iter(published_ports(self.spec['minio'])))]}"
                  for n in self.groups["minio"]] if "s3" in proxy_ports else [])
        inference_port = next(iter(published_ports(self.spec["inference"]))) if "inference" in self.spec else 0
        keystore_port = next(iter(published_ports(self.spec["keystore"]))) if "keystore" in self.spec else 0
        config = runtime / ("nginx.conf" if kind == "nginx" else "haproxy.cfg")
        config.write_text(proxy_config(
            kind, listen=f"127.0.0.1:{proxy_ports['grpc']}", inference=grpc("inference", inference_port) or
            ["127.0.0.1:1"], keystore=grpc("keystore", keystore_port), runtime_dir=runtime / "run",
            affinity=self.scale.affinity, s3_listen=f"127.0.0.1:{proxy_ports['s3']}" if minio else "",
            minio=minio), encoding="utf-8")
        self.services[PROXY] = Service(
            name=PROXY, argv=proxy_argv(kind, config, runtime / "run"), env={},
            ports={PROXY_PORT: proxy_ports["grpc"], **({9000: proxy_ports["s3"]} if minio else {})},
            depends_on={}, health=["LISTEN", *(f"127.0.0.1:{p}" for p in proxy_ports.values())], one_shot=False)
        after = self.groups["minio"][-1] if minio else self.order[-1]
        self.order.insert(self.order.index(after) + 1, PROXY)

    def _argv(self, name: str, spec: Mapping, command: list[str]) -> list[str]:
        image = str(spec.get("image", ""))
        if image.split(":")[0] == MINIO_IMAGE:
            # The image's entrypoint prepends `minio` to a command that doesn't start with it.
            return [str(minio_binary()), *(command[1:] if command[:1] == ["minio"] else command)]
        if "build" in spec:
            if command[:1] != ["encinfer"]:
                raise StackError(f"service {name!r}: the encinfer image's command must start with `encinfer`")
            return ["sh", str(ENTRYPOINT), *encinfer_command(), *command[1:]]
        raise StackError(f"service {name!r}: don't know how to run image {image!r} without Docker")

    # ---- running

    def _start_service(self, service: Service) -> None:
        for dep, condition in service.depends_on.items():
            if condition == "service_completed_successfully" and self._running[dep].process.returncode != 0:
                raise StackError(f"{service.name} needs {dep} to have completed successfully")
        for stem in service.model_stems:
            self._ensure_model(stem)
        log_path = self.log_path(service.name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ENCINFER_", "MINIO_"))}
        env.update(service.env)
        env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "ab") as out:
            process = subprocess.Popen(service.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True)
        self._running[service.name] = _Running(service, process, log_path)
        self.pids[service.name] = process.pid
        log.info("started", extra={"fields": {"service": service.name, "service_pid": process.pid}})
        deadline = time.monotonic() + self.start_timeout
        if service.one_shot:
            try:
                code = process.wait(timeout=self.start_timeout)
            except subprocess.TimeoutExpired:
                raise StackError(f"{service.name} did not finish within {self.start_timeout:g} s:\n"
                                 f"{_tail(log_path)}") from None
            if code != 0:
                raise StackError(f"{service.name} failed with exit code {code}:\n{_tail(log_path)}")
            return
        if service.health is None:
            return
        while not self._healthy(service):
            if process.poll() is not None:
                raise StackError(f"{service.name} exited with code {process.returncode} while starting:\n"
                                 f"{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise StackError(f"{service.name} not healthy within {self.start_timeout:g} s:\n{_tail(log_path)}")
            time.sleep(0.2)
        log.info("healthy", extra={"fields": {"service": service.name, "ports": service.ports}})

    def _healthy(self, service: Service) -> bool:
        if service.health and service.health[0] == "LISTEN":  # the proxy: its ports accept connections
            return all(_listening(a) for a in service.health[1:])
        return run_health_check(service.health or [], env=service.env)

    def _ensure_model(self, stem: Path) -> None:
        if stem.with_name(stem.name + ".json").exists():
            return
        if stem.parent != self.models_dir or stem.name != "mnist":
            raise StackError(f"model artifact {stem} (.json/.npz) does not exist")
        log.info("training the default model", extra={"fields": {"out": str(stem)}})
        stem.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENCINFER_")}
        result = subprocess.run([*encinfer_command(), *DEFAULT_MODEL_COMMAND, str(stem)], env=env,
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise StackError(f"training the default model failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, int(port))) == 0


def _service_secrets(spec: Mapping) -> list[str]:
    return [s if isinstance(s, str) else s["source"] for s in spec.get("secrets", []) or []]


def run_health_check(test: list[str], env: Mapping[str, str] | None = None, timeout: float = 3.0) -> bool:
    """Runs a compose health-check test on loopback: `encinfer probe ADDR [--http PATH]` and `curl URL`
    in-process (no interpreter start per poll, no curl needed), anything else as a command."""
    kind, args = test[0], test[1:]
    if kind == "CMD" and args[:2] == ["encinfer", "probe"] and "--http" in args:
        from encinfer.common.probe import http_ok

        return http_ok(args[2], args[args.index("--http") + 1], timeout=timeout)[0]
    if kind == "CMD" and args[:2] == ["encinfer", "probe"]:
        return _grpc_serving(args[2], timeout)
    if kind == "CMD" and args[:1] == ["curl"]:
        url = next(a for a in args if a.startswith(("http://", "https://")))
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                return 200 <= reply.status < 300
        except (urllib.error.URLError, OSError):
            return False
    argv = ["sh", "-c", args[0]] if kind == "CMD-SHELL" else args
    try:
        return subprocess.run(argv, env={**os.environ, **(env or {})}, capture_output=True,
                              timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _grpc_serving(address: str, timeout: float) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from encinfer.common.rpc import channel

    with channel(address) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _terminate(process: subprocess.Popen, grace: float) -> None:
    if process.poll() is not None:
        return  # finished long ago (a one-shot): its group id may belong to someone else by now
    # Like `docker stop` with init: SIGTERM to the service's main process only, so it
    # can drain; then SIGKILL to its whole group, so no worker outlives it.
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("did not stop in time; killing", extra={"fields": {"service_pid": process.pid}})
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------- CLI

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stack", help="run deploy/compose.yml's services without Docker, on loopback",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ssub = p.add_subparsers(dest="stack_command", required=True)
    up = ssub.add_parser("up", help="start MinIO, s3-init, the key store and inference; stop on Ctrl-C")
    up.add_argument("--workdir", default="var/stack", help="logs and volumes (default: var/stack)")
    up.add_argument("--secrets-dir", default=str(COMPOSE_FILE.parent / "secrets"),
                    help="secret files, shared with docker compose (default: deploy/secrets)")
    up.add_argument("--models-dir", default=str(CACHE / "models"),
                    help="local directory standing for the image's /app/models")
    up.add_argument("--compose-file", default=str(COMPOSE_FILE))
    up.add_argument("--only", action="append", metavar="SERVICE",
                    help="start only this service and what it depends on (repeatable)")
    up.add_argument("--free-ports", action="store_true", help="pick free ports instead of compose's published ones")
    scaled = up.add_argument_group("scaled topology (docs/scaling.md)")
    scaled.add_argument("--inference-replicas", type=int, default=1, metavar="N",
                        help="copies of compose's inference, behind --proxy (hash on x-encinfer-key-id)")
    scaled.add_argument("--keystore-replicas", type=int, default=1, metavar="N",
                        help="copies of compose's keystore (round robin; inference lists them all)")
    scaled.add_argument("--proxy", choices=("nginx", "haproxy"), default=None,
                        help="the proxy in front, configured by deploy/proxy/render.py")
    scaled.add_argument("--minio-nodes", type=int, default=1, metavar="N",
                        help="distributed, erasure-coded MinIO: N >= 4 nodes, one drive each (needs --proxy)")
    scaled.add_argument("--minio-host", default="127.0.0.1",
                        help="MinIO's address; distributed MinIO refuses loopback where /.dockerenv exists "
                             "(run it in a network namespace with a 10.x address: docs/scaling.md)")
    scaled.add_argument("--round-robin", action="store_true",
                        help="the proxy balances inference round robin instead of by key id (a baseline)")
    up.add_argument("--for", dest="duration", type=float, default=None, metavar="SECONDS",
                    help="stop after this long (default: until Ctrl-C or SIGTERM)")
    up.set_defaults(func=_up)
    sec = ssub.add_parser("secrets", help="write the dev secrets compose.yml needs (random, kept if present)")
    sec.add_argument("--dir", default=str(COMPOSE_FILE.parent / "secrets"))
    sec.add_argument("--force", action="store_true", help="replace existing files")
    sec.set_defaults(func=_secrets)


def _secrets(args: argparse.Namespace) -> int:
    written = write_secrets(Path(args.dir), force=args.force)
    print(f"{len(written)} file(s) written to {args.dir}" if written else f"{args.dir}: all secrets present")
    return 0


def _up(args: argparse.Namespace) -> int:
    from encinfer.common import logs

    logs.configure()
    try:
        scale = Scale(inference=args.inference_replicas, keystore=args.keystore_replicas, minio=args.minio_nodes,
                      proxy=args.proxy, minio_host=args.minio_host, affinity=not args.round_robin)
    except ValueError as exc:
        print(f"encinfer stack: {exc}", file=sys.stderr)
        return 2
    stack = Stack(args.workdir, compose_file=args.compose_file, secrets_dir=args.secrets_dir,
                  models_dir=args.models_dir, free_ports=args.free_ports, services=args.only, scale=scale)
    stop = {"signal": None}

    def on_signal(signum, _frame) -> None:
        stop["signal"] = signum

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        _print_summary(stack)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while stop["signal"] is None and (deadline is None or time.monotonic() < deadline):
            stack.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except StackError as exc:
        print(f"encinfer stack: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0


def _print_summary(stack: Stack) -> None:
    lines = ["encinfer stack is up:"]
    for name in stack.order:
        service = stack.services[name]
        host = stack.address(name).rpartition(":")[0] if service.ports else "127.0.0.1"
        where = ", ".join(f"{host}:{p}" for p in service.ports.values()) or "(done)"
        lines.append(f"  {name:<10} {where:<40} log: {stack.log_path(name)}")
    for name, reason in ON_REQUEST.items():
        if name in (stack.compose.get("services") or {}) and name not in stack.services:
            lines.append(f"  {name:<10} not started ({reason}): `--only {name}` starts it")
    if PROXY in stack.services:
        lines.append(f"  clients:   {stack.client_address} (the proxy: inference and the key store)")
    lines.append(f"  tokens:    {stack.tokens_file} (tenant 'demo' token also in {stack.secrets_dir / 'demo_token'})")
    lines.append("Ctrl-C stops everything.")
    print("\n".join(lines), flush=True)
