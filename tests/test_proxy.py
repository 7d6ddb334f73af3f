"""deploy/proxy/: the nginx and HAProxy key-affinity configurations.

They are rendered from one description (deploy/proxy/render.py); the committed files
are its output for the example topology. Each is checked by the proxy itself (`nginx -t`,
`haproxy -c`) where Debian's packages are installed (`make proxy-bins`), and then run
for real in front of three small gRPC backends on loopback: every key id's calls land
on one backend, different key ids spread over several, and the key store's calls go
to the key store.
"""
from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from raw_grpc import named_server

from encinfer.stack import free_port

REPO = Path(__file__).resolve().parent.parent
PROXY_DIR = REPO / "deploy" / "proxy"
KEY_ID_HEADER = "x-encinfer-key-id"

_spec = importlib.util.spec_from_file_location("proxy_render", PROXY_DIR / "render.py")
render = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = render  # dataclasses look their module up there
_spec.loader.exec_module(render)


def binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed (`make proxy-bins` installs Debian's nginx and haproxy as root)")
    return path


def syntax_check(kind: str, config: Path, runtime: Path) -> subprocess.CompletedProcess:
    if kind == "nginx":
        argv = [binary("nginx"), "-t", "-q", "-c", str(config), "-e", str(runtime / "nginx-error.log")]
    else:
        argv = [binary("haproxy"), "-c", "-q", "-f", str(config)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def rendered(kind: str, tmp_path: Path, **topology) -> Path:
    runtime = tmp_path / "run"
    runtime.mkdir(exist_ok=True)
    fields = {"listen": render.EXAMPLE.listen, "inference": render.EXAMPLE.inference,
              "keystore": render.EXAMPLE.keystore, **topology, "runtime_dir": str(runtime)}
    fn, filename = render.RENDERERS[kind]
    path = tmp_path / filename
    path.write_text(fn(render.ProxyTopology(**fields)), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- the files

@pytest.mark.parametrize("kind", sorted(render.RENDERERS))
def test_committed_config_is_the_render_of_the_example(kind):
    fn, filename = render.RENDERERS[kind]
    assert (PROXY_DIR / filename).read_text(encoding="utf-8") == fn(render.EXAMPLE), \
        "run `python deploy/proxy/render.py --write-examples`"


def test_nginx_hashes_consistently_on_the_key_id_header():
    text = render.nginx(render.EXAMPLE)
    assert "hash $http_x_encinfer_key_id consistent;" in text
    assert "grpc_pass grpc://inference;" in text and f"listen {render.EXAMPLE.listen} http2;" in text


def test_haproxy_hashes_consistently_on_the_key_id_header_over_h2():
    text = render.haproxy(render.EXAMPLE)
    assert f"balance hdr({KEY_ID_HEADER})" in text and "hash-type consistent" in text
    assert f"bind {render.EXAMPLE.listen} proto h2" in text
    assert all(f"{s} proto h2" in text for s in render.EXAMPLE.inference)


def test_every_proxy_hashes_on_the_header_envoy_hashes_on():
    envoy = (REPO / "deploy" / "k8s" / "base" / "envoy.yaml").read_text(encoding="utf-8")
    assert render.KEY_ID_HEADER == KEY_ID_HEADER and f"header_name: {KEY_ID_HEADER}" in envoy


@pytest.mark.parametrize("kind", sorted(render.RENDERERS))
def test_proxy_accepts_its_config(kind, tmp_path):
    result = syntax_check(kind, rendered(kind, tmp_path), tmp_path / "run")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kind, old, new", [
    ("nginx", "consistent;", "consistant;"),
    ("nginx", "grpc_pass grpc://inference;", "grpc_pass grpc://nowhere;"),
    ("haproxy", "hash-type consistent", "hash-type consistant"),
    ("haproxy", "default_backend inference", "default_backend nowhere"),
], ids=["nginx misspelt hash", "nginx unknown upstream", "haproxy misspelt hash-type", "haproxy unknown backend"])
def test_proxy_syntax_check_catches_a_broken_config(kind, old, new, tmp_path):
    path = rendered(kind, tmp_path)
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    assert syntax_check(kind, path, tmp_path / "run").returncode != 0


# ---------------------------------------------------------------------------- real traffic

def wait_listening(port: int, process: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"proxy exited with {process.returncode}: {process.stderr.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"proxy not listening on {port} within {timeout:g} s")


@pytest.fixture(params=sorted(render.RENDERERS))
def proxy(request, tmp_path):
    """(the proxy's address, names of the inference backends) with three inference and one key store backend."""
    kind = request.param
    exe = binary(kind)
    servers = [named_server(f"inference-{i}") for i in range(3)]
    keystore = named_server("keystore")
    port = free_port()
    config = rendered(kind, tmp_path, listen=f"127.0.0.1:{port}", inference=tuple(a for _, a in servers),
                      keystore=(keystore[1],))
    argv = ([exe, "-c", str(config), "-e", str(tmp_path / "run" / "nginx-error.log")] if kind == "nginx"
            else [exe, "-db", "-f", str(config)])
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        wait_listening(port, process)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for server, _ in [*servers, keystore]:
            server.stop(None)


def call(channel: grpc.Channel, method: str, key_id: str | None) -> str:
    metadata = [(KEY_ID_HEADER, key_id)] if key_id else None
    return channel.unary_unary(method)(b"", metadata=metadata, timeout=10, wait_for_ready=True).decode()


def test_each_key_id_lands_on_one_backend_and_keys_spread(proxy):
    with grpc.insecure_channel(proxy) as channel:
        owners = {}
        for i in range(24):
            key_id = f"{i:064x}"
            # New connections too: affinity must not come from reusing one upstream connection.
            seen = {call(channel, "/encinfer.v1.Inference/Predict", key_id) for _ in range(3)}
            with grpc.insecure_channel(proxy) as fresh:
                seen.add(call(fresh, "/encinfer.v1.Inference/Predict", key_id))
            assert len(seen) == 1, f"key {key_id} landed on {seen}"
            owners[key_id] = seen.pop()
    assert len(set(owners.values())) >= 2, owners


def test_key_store_calls_go_to_the_key_store(proxy):
    with grpc.insecure_channel(proxy) as channel:
        assert call(channel, "/encinfer.v1.KeyStore/GetKeys", "ab" * 32) == "keystore"
