"""`encinfer stack` translating compose's services for the scaled topology, without starting it:
replicas with their own ports and volumes, the key-store target list, MinIO's endpoints,
the proxy's rendered configuration (checked by the proxy itself)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from encinfer.scaling import PROXY, Scale, ScaleError, proxy_binary
from encinfer.stack import Stack


def prepared(tmp_path, **scale) -> Stack:
    stack = Stack(tmp_path, free_ports=True, scale=Scale(**scale))
    stack.prepare()
    return stack


def test_replicas_are_copies_of_the_compose_service_with_their_own_ports(tmp_path):
    stack = prepared(tmp_path, inference=3, keystore=2, proxy="haproxy")
    assert stack.replicas("inference") == ["inference", "inference-2", "inference-3"]
    names = stack.replicas("inference") + stack.replicas("keystore")
    ports = [p for r in names for p in stack.services[r].ports.values()]
    assert len(ports) == len(set(ports))
    argv = {tuple(stack.services[r].argv) for r in stack.replicas("inference")}
    assert len(argv) == 1  # the same command: compose's


def test_replicas_that_write_a_volume_get_their_own_copy(tmp_path):
    stack = prepared(tmp_path, keystore=2, proxy="haproxy")
    spools = {stack.env(r)["ENCINFER_KEYSTORE_DATA_DIR"] for r in stack.replicas("keystore")}
    assert len(spools) == 2


def test_inference_lists_every_key_store_replica_in_its_target(tmp_path):
    stack = prepared(tmp_path, keystore=2, proxy="haproxy")
    target = stack.env("inference")["ENCINFER_KEYSTORE_TARGET"]
    assert target == "ipv4:" + ",".join(stack.address(r, 50051) for r in stack.replicas("keystore"))


def test_inference_waits_for_every_key_store_replica(tmp_path):
    stack = prepared(tmp_path, keystore=2, proxy="haproxy")
    assert set(stack.services["inference"].depends_on) >= {"keystore", "keystore-2"}


def test_minio_nodes_list_all_four_endpoints_on_the_minio_host(tmp_path):
    stack = prepared(tmp_path, minio=4, proxy="haproxy", minio_host="10.77.0.1")
    nodes = stack.replicas("minio")
    endpoints = [a for a in stack.services["minio"].argv if a.startswith("http://")]
    assert len(endpoints) == 4 and all(a.startswith("http://10.77.0.1:") for a in endpoints)
    assert all([a for a in stack.services[n].argv if a.startswith("http://")] == endpoints for n in nodes)
    assert all(stack.services[n].env["MINIO_CI_CD"] == "1" for n in nodes)
    assert [stack.services[n].health is not None for n in nodes] == [False, False, False, True]


def test_the_key_store_reaches_distributed_minio_through_the_proxy(tmp_path):
    stack = prepared(tmp_path, minio=4, proxy="haproxy", minio_host="10.77.0.1")
    assert stack.env("keystore")["ENCINFER_S3_ENDPOINT"] == stack.address(PROXY, 9000)
    assert stack.order.index(PROXY) == stack.order.index("minio-4") + 1


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_the_proxy_accepts_the_stack_s_config(tmp_path, kind):
    try:
        binary = proxy_binary(kind)
    except ScaleError as exc:
        pytest.skip(str(exc))
    stack = prepared(tmp_path, inference=3, keystore=2, minio=4, proxy=kind, minio_host="10.77.0.1")
    config = next((tmp_path / "proxy").glob("*.c*"))
    text = config.read_text()
    assert all(stack.address(r, 50052) in text for r in stack.replicas("inference"))
    argv = ([binary, "-t", "-q", "-c", str(config), "-e", str(tmp_path / "proxy" / "run" / "err.log")]
            if kind == "nginx" else [binary, "-c", "-q", "-f", str(config)])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("scale, message", [
    ({"inference": 3}, "needs --proxy"),
    ({"minio": 4}, "needs --proxy"),
    ({"minio": 2, "proxy": "haproxy"}, "at least 4 nodes"),
    ({"proxy": "envoy"}, "nginx, haproxy"),
])
def test_a_topology_that_cannot_work_is_refused_with_the_reason(scale, message):
    with pytest.raises(ScaleError, match=message):
        Scale(**scale)


def test_stack_up_refuses_a_bad_scale_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "encinfer.cli", "stack", "up", "--inference-replicas", "2",
                             "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "needs --proxy" in result.stderr
