"""The proxy-less option: grpcio's ring_hash on x-encinfer-key-id (gRFC A76) over several addresses.

tests/scale/ring_hash_probe.py runs in its own interpreter against three gRPC backends;
the end-to-end check with real inference replicas is in test_replicas.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from encinfer.common.routing import RING_HASH_ENV

PROBE = Path(__file__).resolve().parent / "ring_hash_probe.py"


def probe(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k != RING_HASH_ENV}
    result = subprocess.run([sys.executable, str(PROBE)], env={**full, **env}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ring():
    return probe()


def test_every_key_id_sticks_to_one_backend(ring):
    assert "error" not in ring, ring
    assert all(len(seen) == 1 for seen in ring["before"].values()), ring["before"]


def test_key_ids_spread_over_the_backends(ring):
    assert len({seen[0] for seen in ring["before"].values()}) >= 2, ring["before"]


def test_calls_without_a_key_id_are_answered(ring):
    assert ring["no_header"] in ("b0", "b1", "b2")


def test_a_lost_backend_moves_only_its_own_keys(ring):
    victim, before, after = ring["victim"], ring["before"], ring["after"]
    assert all(len(seen) == 1 and seen[0] != victim for seen in after.values()), after
    assert all(after[k] == v for k, v in before.items() if v[0] != victim), (before, after)


def test_without_the_experimental_switch_no_keyed_call_is_answered():
    # grpcio 1.85 fails the pick ("hash attribute not present"); with wait_for_ready the
    # call waits for a pick that never comes, until its deadline.
    off = probe(**{RING_HASH_ENV: "false"})
    assert off.get("error", "").startswith(("DEADLINE_EXCEEDED", "UNAVAILABLE", "INTERNAL")), off
