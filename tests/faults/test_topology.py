"""The fault suite's baseline: the healthy topology predicts, and SIGTERM leaves nothing behind."""
from __future__ import annotations

import signal

import numpy as np

from faults.conftest import EXIT_BOUND, assert_group_gone, exits_within, listening, port_of


def test_healthy_topology_predicts_and_sigterm_leaves_no_process_or_port(topology, tmp_path):
    from encinfer import datasets

    X, _ = datasets.default_test_images(3)
    with topology.classifier(tmp_path / "keys") as clf:
        scores = clf.decision_function(X)
    assert scores.shape == (3, 10) and np.isfinite(scores).all()
    assert len(topology.worker_pids()) == 2

    for proc in (topology.inference, topology.keystore):
        proc.process.send_signal(signal.SIGTERM)
        assert exits_within(proc, EXIT_BOUND) == 0, proc.log_text()[-2000:]
        assert_group_gone(proc)
        assert not listening(port_of(proc.address))
