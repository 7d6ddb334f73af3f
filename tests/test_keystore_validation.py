"""What the key store accepts as a key: real bundles in, everything else INVALID_ARGUMENT, nothing stored.

Uses the real parser (encinfer.he.keys.inspect_key_bundle) and real SEAL/TenSEAL objects.
"""
from __future__ import annotations

import os
import struct

import pytest

from encinfer.client.keystore import KeyStoreClient
from encinfer.common import errors

TOKENS = "alice-t=alice:tenant,svc-t=inference:service"


@pytest.fixture(params=["fs", pytest.param("s3", marks=pytest.mark.minio)])
def ks(request, keystore_factory):
    if request.param == "s3":
        return keystore_factory("s3", minio=request.getfixturevalue("minio_server"), tokens=TOKENS)
    return keystore_factory("fs", tokens=TOKENS)


@pytest.fixture
def alice(ks):
    with KeyStoreClient(ks.target, token="alice-t") as c:
        yield c


def refused(ks, alice, data: bytes) -> str:
    """Uploads data, expects INVALID_ARGUMENT and an untouched store; returns the message."""
    with pytest.raises(errors.InvalidArgument) as info:
        alice.put(data)
    assert ks.store.backend.list("") == []
    assert [p for p in ks.store.spool_dir.iterdir() if p.name.startswith("put-")] == []
    return str(info.value)


def seal_parameters(n: int, bits: list[int], scheme: str = "CKKS") -> bytes:
    import tenseal.sealapi as seal

    from encinfer.he import serial
    parms = seal.EncryptionParameters(getattr(seal.SCHEME_TYPE, scheme))
    parms.set_poly_modulus_degree(n)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(n, bits))
    if scheme == "BFV":
        parms.set_plain_modulus(seal.PlainModulus.Batching(n, 20))
    return serial.dump(parms)


def test_a_real_bundle_is_stored_with_its_parameters(alice, small_bundle):
    record = alice.put(small_bundle)
    p = record.parameters
    assert (p.scheme, p.format, p.poly_modulus_degree, p.coeff_modulus_bits) == \
        ("ckks", "encinfer-keys-v1", 4096, (40, 29, 40))
    assert p.galois_steps == (1, 2) and not p.has_relin_keys and not p.has_conjugation_key
    assert alice.get(record.key_id) == small_bundle


def test_the_service_role_sees_the_parameters_without_fetching(ks, alice, small_bundle):
    kid = alice.put(small_bundle).key_id
    with KeyStoreClient(ks.target, token="svc-t") as svc:
        assert svc.stat(kid).parameters.galois_steps == (1, 2)


def test_random_bytes_are_refused(ks, alice):
    assert "not an encinfer-keys-v1" in refused(ks, alice, os.urandom(50_000))


def test_a_truncated_bundle_is_refused(ks, alice, small_bundle):
    assert "truncated" in refused(ks, alice, small_bundle[: len(small_bundle) // 2])


def test_a_bundle_with_a_flipped_byte_in_a_seal_header_is_refused(ks, alice, small_bundle):
    from encinfer.he.keys import MAGIC
    data = bytearray(small_bundle)
    data[len(MAGIC) + 16] ^= 0x55  # the first byte of the parameters' SEAL header (its magic)
    refused(ks, alice, bytes(data))
    # A flip inside key material can still parse as a (useless) valid key: what protects
    # an upload end to end is the key id, the hash the client checks against its own bytes.


def test_a_tenseal_context_with_its_secret_key_is_refused(ks, alice):
    import tenseal as ts
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 29, 40])
    assert "secret key" in refused(ks, alice, ctx.serialize(save_secret_key=True))


def test_a_bundle_with_a_secret_key_section_is_refused(ks, alice):
    from encinfer.he.keys import END, MAGIC, PARM
    from encinfer.he.params import CkksParams
    from encinfer.he.secret import SecretKeys, _secret_key_bytes
    params = CkksParams(4096, (40, 29, 40), 29, 29)
    secret = _secret_key_bytes(SecretKeys.generate(params)._secret_key)
    header = struct.Struct("<4sIQ")
    parms = seal_parameters(4096, [40, 29, 40])
    data = (MAGIC + header.pack(PARM, 0, len(parms)) + parms + header.pack(b"SECK", 0, len(secret)) + secret
            + header.pack(END, 0, 0))
    assert "secret key" in refused(ks, alice, data)


def test_parameters_below_128_bit_security_are_refused(ks, alice):
    from encinfer.he.keys import build_key_bundle
    weak = build_key_bundle(seal_parameters(4096, [60, 40, 40]))  # 140 bits > 109 at N=4096
    assert "128-bit" in refused(ks, alice, weak)


def test_a_bfv_context_is_refused(ks, alice):
    import tenseal as ts
    ctx = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=1032193)
    assert "BFV" in refused(ks, alice, ctx.serialize(save_secret_key=False))


def test_a_bundle_with_bfv_parameters_is_refused(ks, alice):
    from encinfer.he.keys import build_key_bundle
    assert "BFV" in refused(ks, alice, build_key_bundle(seal_parameters(4096, [36, 36, 37], scheme="BFV")))


def test_a_public_tenseal_ckks_context_is_refused_as_not_a_bundle(ks, alice):
    import tenseal as ts
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 29, 40])
    ctx.make_context_public()
    assert "TenSEAL context" in refused(ks, alice, ctx.serialize())
