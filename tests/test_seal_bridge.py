"""The SEAL version bridge (encinfer.he.serial): every nested header rewritten, every size checked."""
from __future__ import annotations

import struct

import pytest
import tenseal.sealapi as seal

from encinfer.common.errors import InvalidArgument
from encinfer.he import serial
from encinfer.he.keys import inspect_key_bundle
from encinfer.he.params import CkksParams
from encinfer.he.secret import SecretKeys

PARAMS = CkksParams(4096, (40, 20, 40), 20, 20, galois_steps=(1, 2))
OLD = (4, 1)  # node-seal 7's SEAL


@pytest.fixture(scope="module")
def keys() -> SecretKeys:
    return SecretKeys.generate(PARAMS)


def raw(data: bytes) -> bytes:
    return serial.decompress_seal(data, 1 << 26)


def versions(data: bytes, kind: str) -> set[tuple[int, int]]:
    w = serial._walk(memoryview(data), kind, kind)
    return {(data[p + 3], data[p + 4]) for p in w.headers}


def ciphertext(keys: SecretKeys, seeded: bool) -> bytes:
    pt = seal.Plaintext()
    seal.CKKSEncoder(PARAMS.context()).encode([0.5] * 8, 2.0 ** 20, pt)
    if seeded:
        return keys.encrypt_symmetric(pt)
    ct = seal.Ciphertext()
    seal.Encryptor(PARAMS.context(), keys._secret_key).encrypt_symmetric(pt, ct)
    return serial.dump(ct)


def test_tenseal_objects_are_zstd_compressed_and_decompress_to_their_declared_size(keys):
    data = ciphertext(keys, seeded=True)
    assert data[5] == 2  # compr_mode zstd
    plain = raw(data)
    assert plain[5] == 0 and struct.unpack_from("<Q", plain, 8)[0] == len(plain)


@pytest.mark.parametrize("seeded", [True, False])
def test_a_ciphertext_round_trips_through_the_old_version_and_loads(keys, seeded):
    old = serial.rewrite_seal_version(raw(ciphertext(keys, seeded)), "ciphertext", OLD)
    assert versions(old, "ciphertext") == {OLD}
    back = serial.rewrite_seal_version(old, "ciphertext")
    ct = serial.load_ciphertext(back, PARAMS.context())
    assert ct.size() == 2


def test_a_ciphertext_in_the_old_version_is_refused_by_the_services_without_the_bridge(keys):
    old = serial.rewrite_seal_version(raw(ciphertext(keys, True)), "ciphertext", OLD)
    with pytest.raises(InvalidArgument, match="SEAL 4.1|incompatible version"):
        serial.load_ciphertext(old, PARAMS.context())


def test_every_nested_header_of_galois_keys_is_rewritten(keys):
    galois = seal.KeyGenerator(PARAMS.context(), keys._secret_key).create_galois_keys([PARAMS.galois_elements()[0]])
    data = raw(serial.dump(galois))
    old = serial.rewrite_seal_version(data, "kswitch keys", OLD)
    # KSwitchKeys, then per prime a PublicKey (Ciphertext -> DynArray -> seed info)
    assert len(serial._walk(memoryview(old), "kswitch keys", "k").headers) == 1 + 2 * 3
    assert versions(old, "kswitch keys") == {OLD}


def test_a_whole_bundle_in_the_old_version_is_bridged_and_passes_the_key_stores_checks(keys, tmp_path):
    from encinfer.he import keys as bundle_format
    bundle = keys.public_bundle(include_public_key=True)
    f = __import__("io").BytesIO(bundle)
    sections = bundle_format._sections(f, len(bundle))
    kinds = {b"PARM": "parameters", b"PUBK": "public key", b"RELK": "kswitch keys", b"GALK": "kswitch keys"}
    old = bundle_format.build_key_bundle(
        serial.rewrite_seal_version(raw(bundle[sections[0].offset:][:sections[0].length]), "parameters", OLD),
        public_key=serial.rewrite_seal_version(raw(next(bundle[s.offset:s.offset + s.length] for s in sections
                                                        if s.tag == b"PUBK")), kinds[b"PUBK"], OLD),
        galois_keys={s.arg: serial.rewrite_seal_version(raw(bundle[s.offset:s.offset + s.length]), "kswitch keys",
                                                        OLD) for s in sections if s.tag == b"GALK"})
    path = tmp_path / "old.keys"
    path.write_bytes(old)
    with pytest.raises(InvalidArgument):
        inspect_key_bundle(path)
    path.write_bytes(serial.bridge_key_bundle(old))
    info = inspect_key_bundle(path)
    assert info.has_public_key and info.galois_steps == (1, 2)


def test_compressed_input_is_refused_with_the_mode_to_use(keys):
    with pytest.raises(InvalidArgument, match="uncompressed"):
        serial.rewrite_seal_version(ciphertext(keys, True), "ciphertext", OLD)


def test_decompression_is_bounded(keys):
    data = ciphertext(keys, True)
    with pytest.raises(InvalidArgument, match="more than 1000 bytes"):
        serial.decompress_seal(data, 1000)


@pytest.mark.parametrize("cut", [1, 8, 100])
def test_a_truncated_object_is_refused(keys, cut):
    data = raw(ciphertext(keys, True))
    short = bytearray(data[:-cut])
    struct.pack_into("<Q", short, 8, len(short))  # even with an outer size that agrees
    with pytest.raises(InvalidArgument, match="well-formed|declares"):
        serial.rewrite_seal_version(bytes(short), "ciphertext", OLD)


def test_a_nested_size_that_disagrees_is_refused(keys):
    data = bytearray(raw(ciphertext(keys, True)))
    dyn = 16 + 32 + 1 + 40  # the DynArray's header inside the Ciphertext
    struct.pack_into("<Q", data, dyn + 8, struct.unpack_from("<Q", data, dyn + 8)[0] - 8)
    with pytest.raises(InvalidArgument, match="DynArray|ends at byte|holds"):
        serial.rewrite_seal_version(bytes(data), "ciphertext", OLD)


def test_bytes_that_look_like_a_header_inside_the_data_are_left_alone(keys):
    data = bytearray(raw(ciphertext(keys, True)))
    inside = 16 + 32 + 1 + 40 + 24 + 64  # a coefficient word inside the DynArray's data
    fake = serial.SEAL_HEADER.pack(0xA15E, 16, 4, 3, 0, 0, 24)
    data[inside:inside + 16] = fake
    old = serial.rewrite_seal_version(bytes(data), "ciphertext", OLD)
    assert old[inside:inside + 16] == fake


def test_an_object_of_another_major_version_is_refused(keys):
    data = bytearray(raw(ciphertext(keys, True)))
    data[3] = 3
    with pytest.raises(InvalidArgument, match="SEAL 3"):
        serial.rewrite_seal_version(bytes(data), "ciphertext", OLD)


def test_trailing_bytes_are_refused(keys):
    data = raw(ciphertext(keys, True)) + b"\0" * 8
    with pytest.raises(InvalidArgument):
        serial.rewrite_seal_version(data, "ciphertext", OLD)


def test_a_bundle_with_a_secret_key_section_is_refused_by_the_bridge():
    bundle = b"encinfer-keys-v1" + struct.pack("<4sIQ", b"SECK", 0, 4) + b"abcd"
    with pytest.raises(InvalidArgument, match="unknown section"):
        serial.bridge_key_bundle(bundle)
