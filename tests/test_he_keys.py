"""Key bundles (encinfer-keys-v1) and the client's secret key: what is accepted, what is refused and why."""
from __future__ import annotations

import dataclasses
import os
import stat
import struct

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as seal

from encinfer.common.errors import FailedPrecondition, InvalidArgument
from encinfer.he import serial
from encinfer.he.keys import END, GALK, MAGIC, PARM, KeyInfo, build_key_bundle, inspect_key_bundle, load_key_bundle
from encinfer.he.latency import choose_latency_params
from encinfer.he.params import CkksParams, galois_element
from encinfer.he.secret import SecretKeys

SECTION = struct.Struct("<4sIQ")


@pytest.fixture(scope="module")
def params() -> CkksParams:
    # MNIST latency layout: steps 1, 16..1024 and conjugation (without its public key: these tests
    # are about the Galois sections; test_he_coeff.py covers the public key).
    return dataclasses.replace(choose_latency_params(784, 10), needs_public_key=False)


@pytest.fixture(scope="module")
def secret(params) -> SecretKeys:
    return SecretKeys.generate(params)


@pytest.fixture(scope="module")
def bundle(secret) -> bytes:
    return secret.public_bundle()


def write(tmp_path, data: bytes, name: str = "bundle.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def sections(data: bytes) -> list[tuple[bytes, int, bytes]]:
    out, pos = [], len(MAGIC)
    while pos < len(data):
        tag, arg, length = SECTION.unpack_from(data, pos)
        pos += SECTION.size
        out.append((tag, arg, data[pos:pos + length]))
        pos += length
    return out


def assemble(parts: list[tuple[bytes, int, bytes]]) -> bytes:
    return MAGIC + b"".join(SECTION.pack(tag, arg, len(p)) + p for tag, arg, p in parts)


def refusal(tmp_path, data: bytes) -> str:
    with pytest.raises(InvalidArgument) as e:
        inspect_key_bundle(write(tmp_path, data))
    return str(e.value)


# ---------------------------------------------------------------- what a bundle holds

def test_inspect_reports_the_bundle_parameters_and_keys(tmp_path, params, bundle):
    info = inspect_key_bundle(write(tmp_path, bundle))
    assert info == KeyInfo(poly_modulus_degree=4096, coeff_modulus_bits=(58, 51), has_public_key=False,
                           has_relin_keys=False, galois_steps=tuple(sorted(params.galois_steps)),
                           has_conjugation_key=True)


def test_bundle_holds_one_seeded_galois_key_per_needed_element_and_nothing_else(params, bundle):
    parts = sections(bundle)
    assert [t for t, _, _ in parts] == [PARM] + [GALK] * len(params.galois_elements()) + [END]
    assert [a for t, a, _ in parts if t == GALK] == params.galois_elements()


def test_mnist_latency_keys_stay_under_one_megabyte(bundle):
    assert len(bundle) < 1_000_000


def test_public_key_is_included_only_when_asked(tmp_path, secret):
    info = inspect_key_bundle(write(tmp_path, secret.public_bundle(include_public_key=True)))
    assert info.has_public_key


def test_relinearization_keys_are_included_when_the_parameters_need_them(tmp_path):
    params = CkksParams(4096, (40, 29, 40), 29, 29, needs_relin_keys=True)
    info = inspect_key_bundle(write(tmp_path, SecretKeys.generate(params).public_bundle()))
    assert info.has_relin_keys and info.galois_steps == () and not info.has_conjugation_key


def test_parameters_only_bundle_is_valid(tmp_path):
    params = CkksParams(4096, (60,), 30, 50)  # the batch layout: no evaluation keys at all
    bundle = SecretKeys.generate(params).public_bundle()
    assert inspect_key_bundle(write(tmp_path, bundle)) == KeyInfo(4096, (60,), False, False, (), False)
    assert len(bundle) < 200


# ---------------------------------------------------------------- refusals by the key store

def test_random_bytes_are_not_a_bundle(tmp_path):
    assert "not an encinfer-keys-v1 key bundle" in refusal(tmp_path, os.urandom(5000))


def test_empty_file_is_refused(tmp_path):
    assert "empty" in refusal(tmp_path, b"")


@pytest.mark.parametrize("cut", [10, 16, 30, 100, 20_000, -1])
def test_truncated_bundle_is_refused(tmp_path, bundle, cut):
    assert "truncated" in refusal(tmp_path, bundle[:cut])


def test_trailing_bytes_after_the_end_are_refused(tmp_path, bundle):
    assert "after its END" in refusal(tmp_path, bundle + b"x")


def test_corrupt_galois_key_is_refused(tmp_path, bundle):
    parts = sections(bundle)
    tag, arg, payload = parts[1]
    parts[1] = (tag, arg, payload[:100] + os.urandom(len(payload) - 100))
    assert "Galois keys" in refusal(tmp_path, assemble(parts))


def test_galois_key_filed_under_another_element_is_refused(tmp_path, bundle):
    parts = sections(bundle)
    tag, arg, payload = parts[1]
    parts[1] = (tag, galois_element(5, 4096), payload)
    assert "does not hold exactly that one key" in refusal(tmp_path, assemble(parts))


def test_tenseal_context_with_secret_key_is_refused_as_carrying_a_secret_key(tmp_path):
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    message = refusal(tmp_path, ctx.serialize(save_secret_key=True))
    assert "carries a secret key" in message


def test_public_tenseal_context_is_not_an_encinfer_bundle(tmp_path):
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    ctx.generate_galois_keys()
    message = refusal(tmp_path, ctx.serialize(save_secret_key=False))
    assert "not an encinfer key bundle" in message and "keygen" in message


def test_tenseal_bfv_context_is_refused_as_not_ckks(tmp_path):
    ctx = ts.context(ts.SCHEME_TYPE.BFV, 4096, plain_modulus=1032193)
    message = refusal(tmp_path, ctx.serialize(save_secret_key=False))
    assert "BFV" in message and "CKKS" in message


def test_bundle_with_bfv_parameters_is_refused(tmp_path):
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
    parms.set_poly_modulus_degree(4096)
    parms.set_coeff_modulus(seal.CoeffModulus.BFVDefault(4096, seal.SEC_LEVEL_TYPE.TC128))
    parms.set_plain_modulus(seal.PlainModulus.Batching(4096, 20))
    message = refusal(tmp_path, build_key_bundle(serial.dump(parms)))
    assert "BFV" in message and "needs CKKS" in message


def test_parameters_below_128_bit_security_are_refused(tmp_path):
    # 120 bits of modulus at N=4096: SEAL makes such keys only with SEC_LEVEL_TYPE.NONE.
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(4096)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(4096, [60, 60]))
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.NONE)
    keygen = seal.KeyGenerator(context)
    element = galois_element(1, 4096)
    weak = build_key_bundle(serial.dump(parms),
                            galois_keys={element: serial.dump(keygen.create_galois_keys([element]))})
    assert "below 128-bit security" in refusal(tmp_path, weak)


@pytest.mark.parametrize("modulus", [3, 8193, 2 ** 40 + 1])
def test_parameters_seal_cannot_use_are_refused(tmp_path, modulus):
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(4096)
    parms.set_coeff_modulus([seal.Modulus(modulus)])
    assert "coefficient modulus" in refusal(tmp_path, build_key_bundle(serial.dump(parms)))


def test_secret_key_section_is_refused(tmp_path, bundle, secret):
    parts = sections(bundle)
    parts.insert(1, (b"SECK", 0, b"\x00" * 64))
    assert "carries a secret key" in refusal(tmp_path, assemble(parts))


def test_secret_key_disguised_as_a_public_key_is_refused(tmp_path, bundle, secret):
    path = tmp_path / "sk"
    secret._secret_key.save(str(path))
    parts = sections(bundle)
    parts.insert(1, (b"PUBK", 0, path.read_bytes()))
    assert "carries a secret key" in refusal(tmp_path, assemble(parts))


def test_unknown_section_is_refused(tmp_path, bundle):
    parts = sections(bundle)
    parts.insert(1, (b"XTRA", 0, b"hello"))
    assert "unknown section" in refusal(tmp_path, assemble(parts))


# ---------------------------------------------------------------- loading for a model

def test_loaded_keys_hold_every_element_the_model_needs(params, bundle):
    keys = load_key_bundle(bundle, params)
    assert sorted(keys.galois_keys) == params.galois_elements()
    assert keys.nbytes >= len(bundle)


def test_load_reads_a_file_too(tmp_path, params, bundle):
    keys = load_key_bundle(write(tmp_path, bundle), params)
    assert keys.has_elements(params.galois_elements())


def test_load_names_the_missing_rotation_steps(params, secret):
    fewer = SecretKeys(CkksParams(4096, (58, 51), 25, 49, galois_steps=(1, 16, 32), needs_conjugation_key=True),
                       secret._secret_key).public_bundle()
    with pytest.raises(FailedPrecondition, match=r"rotation steps 64, 128, 256, 512, 1024;"):
        load_key_bundle(fewer, params)


def test_load_names_a_missing_conjugation_key(params, secret):
    without = SecretKeys(CkksParams(4096, (58, 51), 25, 49, galois_steps=params.galois_steps),
                         secret._secret_key).public_bundle()
    with pytest.raises(FailedPrecondition, match="complex conjugation"):
        load_key_bundle(without, params)


def test_load_refuses_keys_for_other_parameters(params):
    other = SecretKeys.generate(CkksParams(8192, (60, 60), 25, 49, galois_steps=(1,))).public_bundle()
    with pytest.raises(FailedPrecondition, match="N=8192"):
        load_key_bundle(other, params)


def test_parameter_mismatch_is_found_before_any_galois_key_is_loaded(params):
    other = SecretKeys.generate(CkksParams(4096, (40, 29, 40), 25, 29, galois_steps=(1,))).public_bundle()
    parts = sections(other)
    parts = [(t, a, os.urandom(len(p)) if t == GALK else p) for t, a, p in parts]
    with pytest.raises(FailedPrecondition, match="do not match"):
        load_key_bundle(assemble(parts), params)


def test_load_refuses_random_bytes_as_invalid(params):
    with pytest.raises(InvalidArgument):
        load_key_bundle(os.urandom(1000), params)


def test_load_refuses_an_empty_bundle(params):
    with pytest.raises(InvalidArgument, match="empty"):
        load_key_bundle(b"", params)


# ---------------------------------------------------------------- the secret key file

def test_secret_round_trip_decrypts_what_the_original_encrypted(tmp_path, secret):
    path = tmp_path / "secret.key"
    secret.save(path)
    loaded = SecretKeys.load(path)
    plain = seal.Plaintext()
    secret.encoder.encode([0.25, -1.5, 3.0], 2.0 ** 25, plain)
    decoded = loaded.encoder.decode_double(loaded.decrypt(secret.encrypt_symmetric(plain)))
    np.testing.assert_allclose(decoded[:3], [0.25, -1.5, 3.0], atol=1e-4)
    assert loaded.params == secret.params


def test_secret_file_is_owner_only_whatever_the_umask(tmp_path, secret):
    old = os.umask(0)
    try:
        secret.save(tmp_path / "secret.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "secret.key").st_mode) == 0o600


def test_saving_over_a_world_readable_file_leaves_an_owner_only_file(tmp_path, secret):
    path = tmp_path / "secret.key"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    secret.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]


def test_loading_a_file_that_is_not_a_secret_key_is_refused(tmp_path, bundle):
    with pytest.raises(InvalidArgument, match="not an encinfer secret key file"):
        SecretKeys.load(write(tmp_path, bundle))


def test_loading_a_truncated_secret_key_file_is_refused(tmp_path, secret):
    path = tmp_path / "secret.key"
    secret.save(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InvalidArgument):
        SecretKeys.load(path)


def test_symmetric_encryption_is_seeded_at_about_half_the_size(secret):
    plain = seal.Plaintext()
    secret.encoder.encode([1.0] * 16, 2.0 ** 25, plain)
    full = 2 * secret.params.poly_modulus_degree * 8  # two polynomials of one data prime
    assert len(secret.encrypt_symmetric(plain)) < 0.55 * full
