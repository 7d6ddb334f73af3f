"""What the client library refuses before sending anything, and how every failure a
user sees is an encinfer error (with the status code's name and the server's words),
never a grpc type."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from encinfer.common import errors

pytest_plugins = ["inference_fixtures"]
pytestmark = pytest.mark.timeout(120)


class CallCounter:
    """Counts the prediction and upload calls a classifier makes (wraps its stubs)."""

    def __init__(self, clf) -> None:
        self.calls: list[str] = []
        for stub, names in ((clf._stub, ("Predict", "PredictStream")), (clf._keystore._stub, ("PutKeys",))):
            for name in names:
                setattr(stub, name, self._counted(name, getattr(stub, name)))

    def _counted(self, name, method):
        def call(*args, **kwargs):
            self.calls.append(name)
            return method(*args, **kwargs)
        return call


@pytest.fixture
def clf(fs_stack, tmp_path):
    c = fs_stack.classifier(tmp_path / "k")
    c.counter = CallCounter(c)
    yield c
    c.close()


def images(test_images, n: int = 4) -> np.ndarray:
    return test_images[0][:n].copy()


def with_value(X: np.ndarray, sample: int, feature: int, value: float) -> np.ndarray:
    X = X.copy()
    X[sample, feature] = value
    return X


# One call per way in: each must refuse the input itself, before any call.
WAYS_IN = {
    "predict": lambda c, X: c.predict(X),
    "predict_batch_layout": lambda c, X: (setattr(c, "layout", "batch"), c.predict(X)),
    "decision_function": lambda c, X: c.decision_function(X),
    "predict_stream_array": lambda c, X: list(c.predict_stream(X)),
    "predict_stream_generator": lambda c, X: list(c.predict_stream(x for x in X)),
    "predict_one": lambda c, X: c.predict_one(X[0]),
}


def refused(clf, way: str, X: np.ndarray) -> str:
    with pytest.raises(ValueError) as info:
        WAYS_IN[way](clf, X)
    assert clf.counter.calls == [], f"{way} made calls {clf.counter.calls} for an input it should refuse"
    return str(info.value)


@pytest.mark.parametrize("way", WAYS_IN)
def test_nan_input_is_refused_naming_the_sample_and_feature_before_any_call(clf, test_images, way):
    message = refused(clf, way, with_value(images(test_images), 0, 300, np.nan))
    assert "sample 0, feature 300 is nan" in message and "finite" in message


@pytest.mark.parametrize("way", WAYS_IN)
def test_infinite_input_is_refused_before_any_call(clf, test_images, way):
    message = refused(clf, way, with_value(images(test_images), 0, 5, np.inf))
    assert "sample 0, feature 5 is inf" in message


@pytest.mark.parametrize("way", WAYS_IN)
def test_raw_0_to_255_pixels_are_refused_with_the_models_input_range(clf, test_images, way):
    message = refused(clf, way, images(test_images) * 255.0)
    assert "outside [0, 1]" in message and "divide them by 255" in message


def test_the_range_check_names_the_first_offending_sample(clf, test_images):
    message = refused(clf, "predict", with_value(images(test_images), 2, 400, -0.5))
    assert message.startswith("sample 2, feature 400 is -0.5, outside [0, 1]")


def test_a_bad_sample_later_in_a_generator_ends_the_stream_with_its_own_error(clf, test_images):
    X = with_value(images(test_images, 6), 4, 10, np.nan)
    answered = []
    with pytest.raises(ValueError, match="sample 4, feature 10 is nan"):
        for i, _ in clf.predict_stream(x for x in X):
            answered.append(i)
    assert set(answered) <= {0, 1, 2, 3}


def test_one_28_by_28_image_gets_a_message_about_its_shape(clf, test_images):
    image = images(test_images, 1).reshape(28, 28)
    for way in ("predict", "predict_one"):
        with pytest.raises(ValueError) as info:
            WAYS_IN[way](clf, image[None]) if way == "predict_one" else clf.predict(image)
        assert "expected 784 features per sample; got an array of shape (28, 28)" in str(info.value)
        assert "reshape" in str(info.value)
    assert clf.counter.calls == []


def test_a_stack_of_images_is_told_to_flatten_them(clf, test_images):
    message = refused(clf, "predict", images(test_images).reshape(-1, 28, 28))
    assert "got an array of shape (4, 28, 28): flatten images with X.reshape(len(X), -1)" in message


def test_predict_one_refuses_more_than_one_sample(clf, test_images):
    with pytest.raises(ValueError, match="one sample"):
        clf.predict_one(images(test_images, 2))


# ---------------------------------------------------------------- one error family

def test_an_unknown_model_is_not_found_as_an_encinfer_error(fs_stack, tmp_path):
    from encinfer.client.classifier import EncryptedClassifier
    with EncryptedClassifier(inference=fs_stack.target, keystore=fs_stack.keystore_target, model="nope",
                             token="alice-token", key_dir=tmp_path / "k", timeout=20) as clf:
        with pytest.raises(errors.NotFound) as info:
            _ = clf.info
    assert info.value.code == "NOT_FOUND" and "nope" in info.value.message
    assert not isinstance(info.value, grpc.RpcError)


@pytest.mark.parametrize("way", ["predict", "predict_one", "predict_stream_array"])
def test_a_wrong_token_is_unauthenticated_as_an_encinfer_error(fs_stack, tmp_path, test_images, way):
    with fs_stack.classifier(tmp_path / "k", token="guessed-token") as clf:
        with pytest.raises(errors.Unauthenticated) as info:
            WAYS_IN[way](clf, images(test_images, 2))
    assert info.value.code == "UNAUTHENTICATED" and not isinstance(info.value, grpc.RpcError)


def test_from_status_gives_the_class_of_each_code_and_keeps_the_message():
    e = errors.from_status("UNAVAILABLE", "the key store is unreachable")
    assert type(e) is errors.Unavailable and e.code == "UNAVAILABLE" and e.message == "the key store is unreachable"
    other = errors.from_status("UNIMPLEMENTED", "no such method")
    assert type(other) is errors.EncinferError and other.code == "UNIMPLEMENTED" and str(other) == "no such method"


def test_key_transfers_get_a_deadline_that_grows_with_the_size_unless_the_caller_gives_one():
    from encinfer.client.keystore import KeyStoreClient

    with KeyStoreClient("127.0.0.1:1") as ks:
        small, big = ks.transfer_deadline(1000), ks.transfer_deadline(50 * 1024 * 1024)
    assert 0 < small < big < 600
    with KeyStoreClient("127.0.0.1:1", transfer_timeout=7.0) as ks:
        assert ks.transfer_deadline(50 * 1024 * 1024) == 7.0


# ---------------------------------------------------------------- encinfer predict

def predict_cli(fs_stack, tmp_path, capsys, X) -> tuple[int, str, str]:
    from encinfer.cli import main

    np.save(tmp_path / "x.npy", X)
    capsys.readouterr()
    code = main(["predict", "--npy", str(tmp_path / "x.npy"), "--inference", fs_stack.target,
                 "--keystore", fs_stack.keystore_target, "--token", "alice-token", "--key-dir", str(tmp_path / "k")])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_encinfer_predict_prints_the_labels_and_keeps_stderr_empty(fs_stack, tmp_path, capsys, test_images):
    X = images(test_images, 3)
    code, out, err = predict_cli(fs_stack, tmp_path, capsys, X)
    assert code == 0 and err == ""
    assert out.split() == [str(c) for c in fs_stack.model.predict(X)]


def test_encinfer_predict_refuses_nan_inputs_with_one_line_and_exit_2(fs_stack, tmp_path, capsys, test_images):
    code, out, err = predict_cli(fs_stack, tmp_path, capsys, with_value(images(test_images, 3), 1, 7, np.nan))
    assert code == 2 and out == ""
    assert err.startswith("error: sample 1, feature 7 is nan") and err.count("\n") == 1
    assert not (tmp_path / "k").exists()  # refused before any key was made
