"""The client library's own behaviour against a real service: limits it learns from
GetModelInfo, errors it surfaces, channels it closes, arguments it refuses."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

pytest.register_assert_rewrite("inference_fixtures")
from inference_fixtures import ALICE, BOB, assert_matches_plaintext, count_uploads, start_stack, wait_for

from encinfer.client.classifier import EncryptedClassifier, PredictionError
from encinfer.client.keystore import KeyStoreClient
from encinfer.common.errors import Unavailable

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


def foreign_key_classifier(stack, key_dir, layout: str):
    """Bob's classifier holding a key id only alice uploaded: every item of its calls is refused."""
    with stack.classifier(key_dir / "alice", layout=layout) as alice:
        alice_key = alice.keys(layout)
    bob = stack.classifier(key_dir / "bob", token=BOB, layout=layout)
    bob._secrets[layout] = alice_key
    return bob


def test_refused_item_raises_prediction_error_with_its_status(strict_stack, tmp_path, test_images):
    from encinfer.common.errors import PermissionDenied

    with foreign_key_classifier(strict_stack, tmp_path, "latency") as clf:
        with pytest.raises(PredictionError) as info:
            clf.decision_function(test_images[0][:2])
    assert info.value.code == "PERMISSION_DENIED" and isinstance(info.value, PermissionDenied)
    assert "another tenant" in info.value.message and info.value.request_id in ("0", "1")
    assert not isinstance(info.value, grpc.RpcError)


@pytest.mark.parametrize("layout", ["latency", "batch"])
def test_key_deleted_from_the_key_store_is_uploaded_again_and_the_call_retried(strict_stack, tmp_path,
                                                                               test_images, layout):
    X = test_images[0][:3]
    with strict_stack.classifier(tmp_path / "k", layout=layout) as clf:
        _, key_id = clf.keys(layout)
        with KeyStoreClient(strict_stack.keystore_target, token=ALICE) as ks:
            assert ks.delete(key_id)
        uploads = count_uploads(clf)
        assert_matches_plaintext(strict_stack.model, X, clf.decision_function(X))
        assert len(uploads) == 1
        assert_matches_plaintext(strict_stack.model, X, clf.decision_function(X))  # the next call just works
        assert len(uploads) == 1


def test_key_deleted_from_the_key_store_is_uploaded_again_for_a_unary_predict(strict_stack, tmp_path, test_images):
    x = test_images[0][0]
    with strict_stack.classifier(tmp_path / "k", layout="latency") as clf:
        _, key_id = clf.keys("latency")
        with KeyStoreClient(strict_stack.keystore_target, token=ALICE) as ks:
            assert ks.delete(key_id)
        uploads = count_uploads(clf)
        assert_matches_plaintext(strict_stack.model, x[None], clf.predict_one(x)[None])
        assert len(uploads) == 1


def test_deleted_key_mid_stream_is_uploaded_again_and_every_sample_answered_once(strict_stack, tmp_path,
                                                                                 test_images):
    X = test_images[0][:12]
    with strict_stack.classifier(tmp_path / "k", layout="latency") as clf:
        _, key_id = clf.keys("latency")
        uploads = count_uploads(clf)
        seen = []
        for i, scores in clf.predict_stream(x for x in X):  # a generator: cannot be rewound
            seen.append((i, scores))
            if len(seen) == 3:
                with KeyStoreClient(strict_stack.keystore_target, token=ALICE) as ks:
                    assert ks.delete(key_id)
    assert sorted(i for i, _ in seen) == list(range(len(X)))
    assert_matches_plaintext(strict_stack.model, X, np.array([s for _, s in sorted(seen, key=lambda a: a[0])]))
    assert len(uploads) == 1


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

def request_threads() -> int:
    """gRPC's client-side call threads (a call's request-iterator feeder is one, named
    'Thread-N (_run)'); the servers in this process start threads of their own, lazily
    and under other names, so counting every thread would be flaky."""
    return sum(t.name.endswith("(_run)") for t in threading.enumerate())


def threads_settle_to(baseline: int) -> bool:
    return wait_for(lambda: request_threads() <= baseline, timeout=10)


def test_failed_batch_call_leaves_no_request_thread_behind(strict_stack, tmp_path, test_images):
    clf = foreign_key_classifier(strict_stack, tmp_path, "batch")
    try:
        baseline = request_threads()
        with pytest.raises(PredictionError):
            clf.decision_function(test_images[0][:5])
        assert threads_settle_to(baseline), threading.enumerate()
    finally:
        clf.close()


def test_failed_stream_call_leaves_no_request_thread_behind(strict_stack, tmp_path, test_images):
    clf = foreign_key_classifier(strict_stack, tmp_path, "latency")
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


# ---------------------------------------------------------------- remembered key ids

def test_a_remembered_key_id_is_used_without_asking_the_key_store_first(fs_stack, tmp_path, test_images):
    with fs_stack.classifier(tmp_path / "k", layout="latency") as first:
        _, key_id = first.keys("latency")
    with fs_stack.classifier(tmp_path / "k", layout="latency") as later:
        uploads = count_uploads(later)
        released = threading.Event()

        def hung(*args, **kwargs):  # a key store that takes its whole deadline, then fails
            released.wait(30)
            raise Unavailable("the key store is down")
        later._keystore.stat = hung
        try:
            start = time.monotonic()
            X = test_images[0][:2]
            assert_matches_plaintext(fs_stack.model, X, later.decision_function(X))
            assert time.monotonic() - start < 15  # did not wait for the key store
        finally:
            released.set()
        assert later.keys("latency")[1] == key_id and uploads == []


def test_a_remembered_key_that_expires_soon_is_renewed_on_the_next_call(fs_stack, tmp_path, test_images,
                                                                        monkeypatch):
    from encinfer.client import classifier

    with fs_stack.classifier(tmp_path / "k", layout="latency") as first:
        _, key_id = first.keys("latency")
    monkeypatch.setattr(classifier, "EXPIRY_MARGIN_SECONDS", 10 ** 9)  # every key "expires soon"
    with fs_stack.classifier(tmp_path / "k", layout="latency") as later:
        uploads = count_uploads(later)
        X = test_images[0][:2]
        assert_matches_plaintext(fs_stack.model, X, later.decision_function(X))  # the remembered key, at once
        assert uploads == []
        assert wait_for(lambda: "latency" in later._refresh)  # the background check said: expires soon
        assert_matches_plaintext(fs_stack.model, X, later.decision_function(X))
        assert len(uploads) == 1 and later.keys("latency")[1] != key_id


def test_a_key_dir_shared_by_two_tenants_uploads_for_each(fs_stack, tmp_path, test_images):
    X = test_images[0][:2]
    with fs_stack.classifier(tmp_path / "k", layout="latency") as alice:
        _, alice_key = alice.keys("latency")
    with fs_stack.classifier(tmp_path / "k", token=BOB, layout="latency") as bob:
        uploads = count_uploads(bob)
        assert_matches_plaintext(fs_stack.model, X, bob.decision_function(X))
        assert len(uploads) == 1 and bob.keys("latency")[1] != alice_key
