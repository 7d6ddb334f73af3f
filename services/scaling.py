"""The scaled topology for `encinfer stack`: replicas of compose services, a proxy, distributed MinIO.

One source of truth stays deploy/compose.yml: a replica is a copy of a compose service
with its own ports (and its own copy of each volume it writes), so `--inference-replicas 3`
is three copies of compose's `inference`. What compose has no words for comes from
deploy/proxy/render.py (the same description the committed nginx.conf and haproxy.cfg
are rendered from) and from MinIO's own distributed mode:

- the proxy (nginx or HAProxy, the real programs) hashes inference calls on
  `x-encinfer-key-id`, sends key-store calls round robin to the key-store replicas, and,
  with distributed MinIO, fronts its nodes for S3 (as the `minio` Service does in
  Kubernetes) -- so the key store's `minio:9000` becomes the proxy's S3 listener;
- inference reaches the key-store replicas without the proxy, through one gRPC target
  listing them all (`ipv4:127.0.0.1:p1,127.0.0.1:p2`), as a client of a Kubernetes
  Service would;
- MinIO nodes list every endpoint explicitly (one drive each), run with MINIO_CI_CD=1
  (MinIO refuses drives on the root filesystem otherwise) and on `minio_host`: on a
  machine with /.dockerenv MinIO refuses loopback endpoints, so the tests run the
  distributed topology in a network namespace of their own with a 10.x address on its lo.
"""
from __future__ import annotations

import copy
import importlib.util
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
RENDER = REPO / "deploy" / "proxy" / "render.py"
PROXIES = ("nginx", "haproxy")
PROXY = "proxy"
# Where the proxy listens without --free-ports: Kubernetes' `proxy` Service port; with
# distributed MinIO its S3 listener takes MinIO's published port, the nodes the next ones.
PROXY_PORT = 50050
PORT_STEP = 10
MAX_REPLICAS = 9


class ScaleError(ValueError):
    """A scaled topology that cannot be built; the message says why."""


@dataclass(frozen=True)
class Scale:
    """How far to scale compose's services on one host."""

    inference: int = 1
    keystore: int = 1
    minio: int = 1
    proxy: str | None = None            # "nginx" | "haproxy"
    minio_host: str = "127.0.0.1"
    affinity: bool = True               # False: the proxy balances inference round robin

    def __post_init__(self) -> None:
        for name in ("inference", "keystore", "minio"):
            n = getattr(self, name)
            if not 1 <= n <= MAX_REPLICAS:
                raise ScaleError(f"{name} replicas must be 1..{MAX_REPLICAS}, not {n}")
        if self.proxy is not None and self.proxy not in PROXIES:
            raise ScaleError(f"--proxy must be one of {', '.join(PROXIES)}, not {self.proxy!r}")
        if self.minio not in (1, 4) and self.minio < 4:
            raise ScaleError("distributed MinIO needs at least 4 nodes (erasure coding), or 1")
        if self.minio > 1 and self.proxy is None:
            raise ScaleError("--minio-nodes > 1 needs --proxy: the proxy fronts the MinIO nodes for S3, "
                             "as the `minio` Service does in Kubernetes")
        if self.inference > 1 and self.proxy is None:
            raise ScaleError("--inference-replicas > 1 needs --proxy: clients reach the replicas through it")

    @property
    def scaled(self) -> bool:
        return self.proxy is not None or self.minio_host != "127.0.0.1" or max(
            self.inference, self.keystore, self.minio) > 1

    def count(self, service: str) -> int:
        return {"inference": self.inference, "keystore": self.keystore, "minio": self.minio}.get(service, 1)


def replica_names(service: str, n: int) -> list[str]:
    """The first replica keeps the compose name (so one-replica stacks look as before)."""
    return [service] + [f"{service}-{i}" for i in range(2, n + 1)]


def expand(spec: Mapping[str, Mapping], order: list[str], scale: Scale) -> tuple[dict[str, dict], list[str],
                                                                              dict[str, list[str]]]:
    """Compose services with replicas: (service specs, start order, service -> its replicas).

    Each replica copies its service; a named volume it mounts read-write gets a copy per
    replica (MinIO's drive, the key store's spool); dependents wait for every replica.
    """
    groups = {name: replica_names(name, scale.count(name)) for name in order}
    out: dict[str, dict] = {}
    new_order: list[str] = []
    for name in order:
        for i, replica in enumerate(groups[name], 1):
            s = copy.deepcopy(dict(spec[name]))
            if i > 1:
                s["volumes"] = [_own_volume(v, i) for v in s.get("volumes", []) or []]
            deps = s.get("depends_on") or {}
            if isinstance(deps, list):
                deps = {d: {"condition": "service_started"} for d in deps}
            s["depends_on"] = {r: cond for d, cond in deps.items() for r in groups.get(d, [d])}
            out[replica] = s
            new_order.append(replica)
    return out, new_order, groups


def _own_volume(volume: str, i: int) -> str:
    source, _, rest = str(volume).partition(":")
    if source.startswith((".", "/")) or rest.endswith(":ro"):
        return volume
    return f"{source}-{i}:{rest}"


def replica_ports(published: Mapping[int, int], index: int) -> dict[int, int]:
    """A replica's ports without --free-ports: the compose ports, PORT_STEP further on per replica."""
    return {c: h + PORT_STEP * (index - 1) for c, h in published.items()}


def minio_endpoints(host: str, nodes: list[tuple[int, Path]]) -> list[str]:
    """Every node's endpoint, listed explicitly (MinIO's `{1...4}` would expand host x path)."""
    return [f"http://{host}:{port}{drive}" for port, drive in nodes]


# ---------------------------------------------------------------------------- the proxy

def render_module() -> ModuleType:
    """deploy/proxy/render.py, imported by path (it is a script next to the configs it renders)."""
    name = "encinfer_proxy_render"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, RENDER)
    if spec is None or spec.loader is None or not RENDER.is_file():
        raise ScaleError(f"{RENDER} not found: the scaled stack runs from a checkout of the repository")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def proxy_binary(kind: str) -> str:
    path = shutil.which(kind) or (f"/usr/sbin/{kind}" if Path(f"/usr/sbin/{kind}").exists() else None)
    if path is None:
        raise ScaleError(f"{kind} is not installed (`make proxy-bins` installs Debian's nginx and haproxy as root)")
    return path


def proxy_config(kind: str, *, listen: str, inference: list[str], keystore: list[str], runtime_dir: Path,
                 affinity: bool = True, s3_listen: str = "", minio: list[str] | None = None) -> str:
    render = render_module()
    topology = render.ProxyTopology(listen=listen, inference=tuple(inference), keystore=tuple(keystore),
                                    runtime_dir=str(runtime_dir), affinity=affinity, s3_listen=s3_listen,
                                    minio=tuple(minio or ()))
    return render.RENDERERS[kind][0](topology)


def proxy_argv(kind: str, config: Path, runtime_dir: Path) -> list[str]:
    """The proxy in the foreground (nginx: `daemon off` in its config; HAProxy: -db)."""
    if kind == "nginx":
        return [proxy_binary("nginx"), "-c", str(config), "-e", str(runtime_dir / "nginx-error.log")]
    return [proxy_binary("haproxy"), "-db", "-f", str(config)]
