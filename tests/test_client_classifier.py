"""The client library's own behaviour against a real service: limits it learns from
GetModelInfo, errors it surfaces, channels it closes, arguments it refuses."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

pytest.register_assert_rewrite("inference_fixtures")
from inference_fixtures import ALICE, assert_matches_plaintext, start_stack, wait_for
from encinfer.client.classifier import EncryptedClassifier, PredictionError
from encinfer.client.keystore import KeyStoreClient

pytest_plugins = ["inference_fixtures"]
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def strict_stack(mnist_model, tmp_path_factory):
    """One worker, one open batch per stream, key records re-checked on every request."""
    stem, model = mnist_model
    stack = start_stack(stem, model, tmp_path_factory.mktemp("strict"), workers=1, max_open_batches=1,
                        key_recheck_seconds=0.0)
    yield stack
    stack.close()


def test_model_info_states_the_open_batch_limit(strict_stack, tmp_path):
    with strict_stack.classifier(tmp_path / "k") as clf:
        assert clf.info.limits.max_open_batches == 1


def test_client_keeps_within_the_servers_open_batch_limit(strict_stack, tmp_path):
    from encinfer import datasets
    X = datasets.load_mnist(split="all")[0]  # two batches
    with strict_stack.classifier(tmp_path / "k", layout="batch") as clf:
        assert_matches_plaintext(strict_stack.model, X, clf.decision_function(X))


def test_refused_item_raises_prediction_error_with_its_status(strict_stack, tmp_path, test_images):
    with strict_stack.classifier(tmp_path / "k", layout="latency") as clf:
        _, key_id = clf.keys("latency")
        with KeyStoreClient(strict_stack.keystore_target, token=ALICE) as ks:
            ks.delete(key_id)
        with pytest.raises(PredictionError) as info:
            clf.decision_function(test_images[0][:2])
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "not in the key store" in info.value.message


def test_closed_classifier_makes_no_more_calls(fs_stack, tmp_path, test_images):
    with fs_stack.classifier(tmp_path / "k", layout="latency") as clf:
        clf.decision_function(test_images[0][:1])
    with pytest.raises(ValueError, match="closed channel"):
        clf.predict_one(test_images[0][0])


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout"):
        EncryptedClassifier(layout="fast")


def test_samples_with_the_wrong_number_of_features_are_refused_before_encrypting(fs_stack, tmp_path):
    with fs_stack.classifier(tmp_path / "k") as clf:
        with pytest.raises(ValueError, match="784 features"):
            clf.predict(np.zeros((2, 28)))
    assert not (tmp_path / "k").exists()  # no keys were made for a call that could not be sent


# ---------------------------------------------------------------- no threads left behind

def deleted_key_classifier(stack, key_dir, layout: str):
    """A classifier whose key the key store no longer has: every item of its next call fails."""
    clf = stack.classifier(key_dir, layout=layout)
    _, key_id = clf.keys(layout)
    with KeyStoreClient(stack.keystore_target, token=ALICE) as ks:
        ks.delete(key_id)
    return clf


def request_threads() -> int:
    """gRPC's client-side call threads (a call's request-iterator feeder is one, named
    'Thread-N (_run)'); the servers in this process start threads of their own, lazily
    and under other names, so counting every thread would be flaky."""
    return sum(t.name.endswith("(_run)") for t in threading.enumerate())


def threads_settle_to(baseline: int) -> bool:
    return wait_for(lambda: request_threads() <= baseline, timeout=10)


def test_failed_batch_call_leaves_no_request_thread_behind(strict_stack, tmp_path, test_images):
    clf = deleted_key_classifier(strict_stack, tmp_path / "k", "batch")
    try:
        baseline = request_threads()
        with pytest.raises(PredictionError):
            clf.decision_function(test_images[0][:5])
        assert threads_settle_to(baseline), threading.enumerate()
    finally:
        clf.close()


def test_failed_stream_call_leaves_no_request_thread_behind(strict_stack, tmp_path, test_images):
    clf = deleted_key_classifier(strict_stack, tmp_path / "k", "latency")
    try:
        baseline = request_threads()
        with pytest.raises(PredictionError):
            list(clf.predict_stream(iter(test_images[0][:20]), window=2))
        assert threads_settle_to(baseline), threading.enumerate()
    finally:
        clf.close()


def test_abandoned_prediction_stream_is_cancelled(fs_stack, tmp_path, test_images):
    with fs_stack.classifier(tmp_path / "k", layout="latency") as clf:
        clf.keys("latency")
        baseline = request_threads()
        answers = clf.predict_stream(iter(test_images[0][:20]), window=2)
        next(answers)
        answers.close()  # the caller stops reading
        assert threads_settle_to(baseline), threading.enumerate()
