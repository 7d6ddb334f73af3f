"""Distributed MinIO (4 nodes, one drive each, EC:2) behind the proxy, losing nodes under load:
`encinfer stack up --minio-nodes 4 --proxy haproxy --minio-host 10.77.0.1` (and nginx).

The whole topology runs inside a network namespace this test creates (`unshare -n`, its
own lo brought up with 10.77.0.1): MinIO refuses loopback endpoints on a machine with
/.dockerenv. tests/scale/minio_scenario.py runs the scenario there and prints JSON; each
test below asserts one behaviour of that one run.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import have_unshare, need_binaries

pytestmark = pytest.mark.minio

HERE = Path(__file__).resolve().parent
# Only inside the namespace this test creates, only for MinIO's nodes.
NAMESPACE_ADDRESS = "10.77.0.1"
SCENARIO_BOUND = 300


@pytest.fixture(scope="module", params=["haproxy", "nginx"])
def run(request, tmp_path_factory) -> dict:
    need_binaries(request.param)
    if not have_unshare():
        pytest.skip("needs root, unshare and ip (a network namespace for MinIO's non-loopback endpoints)")
    work = tmp_path_factory.mktemp("minio4")
    setup = f'ip link set lo up && ip addr add {NAMESPACE_ADDRESS}/32 dev lo && exec "$@"'
    argv = ["unshare", "--net", "sh", "-c", setup, "sh", sys.executable, str(HERE / "minio_scenario.py"),
            str(work), NAMESPACE_ADDRESS, request.param]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=SCENARIO_BOUND)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{\"minio_nodes\"")]
    assert lines, result.stdout[-3000:]
    print(lines[-1])  # the measured figures, for `pytest -s`
    return json.loads(lines[-1])


def test_the_four_nodes_listen_inside_the_namespace_only(run):
    assert len(run["minio_nodes"]) == 4 and all(a.startswith(NAMESPACE_ADDRESS + ":") for a in run["minio_nodes"])


def test_one_node_killed_mid_load_fails_no_upload_and_no_prediction(run):
    one = run["one_down"]
    assert one["failures"] == []
    assert one["uploads"] == 6 and one["after_kill"]["uploads"] > 0 and one["after_kill"]["predictions"] > 0


def test_two_nodes_killed_uploads_fail_unavailable_with_the_reason(run):
    attempts = run["two_down_uploads"]
    assert [a["code"] for a in attempts] == ["UNAVAILABLE"], attempts
    assert all("storage" in a["message"] for a in attempts), attempts
    assert all(a["seconds"] < 30 for a in attempts), attempts


def test_two_nodes_killed_reads_go_on_once_minio_has_noticed(run):
    # Measured: reads can fail for a few seconds after the kill (MinIO has not yet marked
    # the node offline); after that every read succeeds. The bound is generous.
    watch = run["two_down_read_watch"]
    assert watch["reads"] > 5 and (watch["last_failure_s"] is None or watch["last_failure_s"] < 5.0), watch


def test_two_nodes_killed_reads_go_on(run):
    assert run["two_down_reads"] and set(run["two_down_reads"].values()) == {"ok"}, run["two_down_reads"]
    assert run["two_down_stat"] is True


def test_two_nodes_killed_predictions_go_on_for_cached_and_newly_fetched_keys(run):
    assert run["two_down_predictions"] == {"cached": "ok", "fetched": "ok"}
