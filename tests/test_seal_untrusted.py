"""Untrusted SEAL bytes: every object a client sends is checked before SEAL parses it.

Crafted headers and layouts (absurd sizes, wrong magic, version or compression, a
decompression bomb, wrong coefficient count, parameters id or polynomial count) are
refused with INVALID_ARGUMENT, cheaply: in bounded time and without a big allocation,
because SEAL never sees them. Real objects still load. Then the same through the real
services: Predict and PutKeys answer INVALID_ARGUMENT and go on serving; the key
store's parser process can die without taking the key store down.
"""
from __future__ import annotations

import asyncio
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import tenseal.sealapi as seal
import zstandard

pytest.register_assert_rewrite("inference_fixtures")
from inference_fixtures import ALICE, CALL_TIMEOUT, MODEL, assert_status, rpc_error

from encinfer.common.errors import InvalidArgument, Unavailable
from encinfer.he import keys as he_keys
from encinfer.he import serial
from encinfer.he.params import CkksParams, galois_element
from encinfer.he.secret import SecretKeys, _secret_key_bytes

pytest_plugins = ["inference_fixtures"]
pytestmark = pytest.mark.timeout(120)

HEADER = struct.Struct("<HBBBBHQ")
META = struct.Struct("<32sBQQQdQ")  # a Ciphertext's members before its coefficient array
CHEAP_SECONDS = 1.0        # generous on 2 busy cores: a check takes tens of microseconds
CHEAP_BYTES = 4 << 20      # peak Python allocation of one refusal (the real objects are ~66 KB)
PARAMS = CkksParams(4096, (40, 29, 40), 29, 40, galois_steps=(1, 2), needs_relin_keys=True)


# ---------------------------------------------------------------- crafting

def header(size: int, *, magic: int = 0xA15E, header_size: int = 16, version: tuple[int, int] = (4, 3),
           compression: int = 0, reserved: int = 0) -> bytes:
    return HEADER.pack(magic, header_size, *version, compression, reserved, size)


def recompress(plain: bytes, compression: int = 2) -> bytes:
    """An uncompressed SEAL object re-encoded as SEAL writes it with zstd (or zlib)."""
    payload = zstandard.ZstdCompressor().compress(plain[16:]) if compression == 2 else zlib.compress(plain[16:])
    return header(16 + len(payload), compression=compression) + payload


def with_meta(plain: bytes, **fields) -> bytes:
    """An uncompressed ciphertext with some of its metadata fields replaced."""
    names = ["parms_id", "ntt", "polys", "n", "k", "scale", "correction"]
    values = dict(zip(names, META.unpack_from(plain, 16), strict=True))
    values.update(fields)
    return plain[:16] + META.pack(*(values[n] for n in names)) + plain[16 + META.size:]


def refusal(check: Callable[[], object]) -> str:
    """Runs a check that must refuse: InvalidArgument, under a second, no big allocation
    (Python's, traced; and the process's peak RSS, loosely, for anything native)."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InvalidArgument) as info:
            check()
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < CHEAP_SECONDS, f"refusal took {seconds:.2f} s"
    assert peak < CHEAP_BYTES, f"refusal allocated {peak:,} bytes"
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    assert rss_growth < 64 << 20, f"peak RSS grew by {rss_growth:,} bytes"
    return str(info.value)


def bomb(total: int, *, content_size: bool) -> bytes:
    """A zstd frame of `total` zero bytes (a few KB compressed), built in 1 MiB steps."""
    compressor = zstandard.ZstdCompressor(write_content_size=content_size)
    chunk, out = bytes(1 << 20), []
    obj = compressor.compressobj(size=total if content_size else -1)
    for _ in range(total // len(chunk)):
        out.append(obj.compress(chunk))
    out.append(obj.flush())
    return b"".join(out)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def secret() -> SecretKeys:
    return SecretKeys.generate(PARAMS)


@pytest.fixture(scope="module")
def context():
    return PARAMS.context()


@pytest.fixture(scope="module")
def fresh(secret, context) -> bytes:
    """A seeded symmetric ciphertext at the first level, as the client library sends it (zstd)."""
    plain = seal.Plaintext()
    secret.encoder.encode([0.25] * 16, context.first_parms_id(), 2.0 ** PARAMS.input_scale_bits, plain)
    return secret.encrypt_symmetric(plain)


@pytest.fixture(scope="module")
def plain(fresh, context) -> bytes:
    """The same ciphertext uncompressed."""
    return serial.check_ciphertext(fresh, context)


def check(data: bytes, context) -> Callable[[], object]:
    return lambda: serial.load_ciphertext(data, context, parms_id=context.first_parms_id())


# ---------------------------------------------------------------- headers

@pytest.mark.parametrize("size", [2 ** 40, 2 ** 63, 2 ** 64 - 1], ids=["2^40", "2^63", "2^64-1"])
def test_a_header_claiming_an_absurd_size_is_refused_cheaply(context, size):
    message = refusal(check(header(size) + bytes(200), context))
    assert "claims" in message and "at most" in message


def test_the_refusal_names_the_claimed_size_and_the_most_the_model_allows(context):
    message = refusal(check(header(2 ** 40) + bytes(200), context))
    assert "its header claims 2^40 bytes; a ciphertext for this model is at most" in message


def test_a_wrong_magic_number_is_refused(plain, context):
    assert "magic" in refusal(check(header(len(plain), magic=0x1234) + plain[16:], context))


@pytest.mark.parametrize("version", [(4, 1), (4, 4), (3, 7), (5, 3)], ids=["4.1", "4.4", "3.7", "5.3"])
def test_a_version_other_than_the_bundled_seals_is_refused(plain, context, version):
    assert serial.bundled_version() == (4, 3)
    message = refusal(check(header(len(plain), version=version) + plain[16:], context))
    assert f"SEAL {version[0]}.{version[1]}" in message and "4.3" in message


def test_a_wrong_header_size_is_refused(plain, context):
    assert "header" in refusal(check(header(len(plain), header_size=24) + plain[16:], context))


def test_nonzero_reserved_bytes_are_refused(plain, context):
    assert "reserved" in refusal(check(header(len(plain), reserved=1) + plain[16:], context))


@pytest.mark.parametrize("mode", [3, 255])
def test_an_unknown_compression_mode_is_refused(plain, context, mode):
    assert f"unknown mode {mode}" in refusal(check(header(len(plain), compression=mode) + plain[16:], context))


def test_zlib_is_refused_because_no_encinfer_client_writes_it(plain, context):
    assert "compression is zlib" in refusal(check(recompress(plain, compression=1), context))


def test_a_header_smaller_than_itself_is_refused(plain, context):
    assert "less than the header" in refusal(check(header(3) + plain[16:], context))


def test_a_size_field_that_disagrees_with_the_bytes_is_refused(plain, context):
    assert "truncated or padded" in refusal(check(header(len(plain) - 8) + plain[16:], context))


def test_fewer_bytes_than_a_header_are_refused(context):
    assert "shorter than a SEAL header" in refusal(check(b"\x5e\xa1\x10", context))


# ---------------------------------------------------------------- compression

@pytest.mark.parametrize("content_size", [False, True], ids=["unknown-size", "claimed-size"])
def test_a_zstd_bomb_is_refused_after_the_bound(context, content_size):
    payload = bomb(256 << 20, content_size=content_size)  # 256 MiB of zeros in a few KB
    data = header(16 + len(payload), compression=2) + payload
    assert len(data) < 100_000
    message = refusal(check(data, context))
    assert "decompresses to more than" in message or "compressed content claims" in message


@pytest.mark.parametrize("damage", ["random", "flipped", "truncated"])
def test_a_corrupt_zstd_payload_is_refused(fresh, context, damage):
    body = fresh[16:]
    body = {"random": b"\x28\xb5\x2f\xfd" + os.urandom(len(body) - 4),
            "flipped": body[:100] + bytes(b ^ 0x5A for b in body[100:2100]) + body[2100:],
            "truncated": body[:len(body) // 2]}[damage]
    assert "ciphertext" in refusal(check(header(16 + len(body), compression=2) + body, context))


def test_a_zstd_frame_demanding_a_huge_window_is_refused(plain, context):
    params = zstandard.ZstdCompressionParameters(write_content_size=False)
    payload = bytearray(zstandard.ZstdCompressor(compression_params=params).compress(plain[16:]))
    assert payload[4] & 0x20 == 0  # not single-segment: byte 5 is the window descriptor
    payload[5] = 17 << 3  # window log 10 + 17 = 27: SEAL 4.3 would allocate 128 MiB for it
    assert zstandard.get_frame_parameters(bytes(payload)).window_size == 1 << 27
    assert "zstd" in refusal(check(header(16 + len(payload), compression=2) + bytes(payload), context))


# ---------------------------------------------------------------- layout for the model's parameters

def test_a_wrong_coefficient_count_is_refused(plain, context):
    at = 16 + META.size + 16  # the coefficient array's u64 count, after its own header
    forged = plain[:at] + struct.pack("<Q", 2 ** 40) + plain[at + 8:]
    assert "coefficients" in refusal(check(forged, context))


def test_a_wrong_parameters_id_is_refused(plain, context):
    assert "parameters' id" in refusal(check(with_meta(plain, parms_id=os.urandom(32)), context))


def test_a_ciphertext_at_a_lower_level_is_refused_before_seal_parses_it(plain, context):
    low = context.first_context_data().next_context_data().parms_id()
    assert "lower level" in refusal(check(with_meta(plain, parms_id=serial.parms_id_bytes(low)), context))


@pytest.mark.parametrize("polys", [3, 0, 2 ** 40])
def test_a_polynomial_count_other_than_two_is_refused(plain, context, polys):
    assert "polynomials" in refusal(check(with_meta(plain, polys=polys), context))


def test_a_real_three_polynomial_ciphertext_is_refused(fresh, context):
    ct = serial.load_ciphertext(fresh, context)
    seal.Evaluator(context).square_inplace(ct)
    assert "3 polynomials" in refusal(check(serial.dump(ct), context))


@pytest.mark.parametrize("field,value", [("n", 8192), ("k", 3), ("k", 2 ** 40)])
def test_another_ring_degree_or_prime_count_is_refused(plain, context, field, value):
    assert "this model's has N=4096" in refusal(check(with_meta(plain, **{field: value}), context))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0, 0.0, 5e-324])
def test_a_scale_that_is_not_positive_and_normal_is_refused(plain, context, scale):
    assert "scale" in refusal(check(with_meta(plain, scale=scale), context))


def test_a_ciphertext_out_of_ntt_form_is_refused(plain, context):
    assert "NTT" in refusal(check(with_meta(plain, ntt=0), context))


def test_a_seed_of_an_unknown_prng_is_refused(plain, context):
    forged = plain[:-65] + b"\x09" + plain[-64:]
    assert "PRNG" in refusal(check(forged, context))


def test_trailing_bytes_after_the_ciphertext_are_refused(plain, context):
    forged = header(len(plain) + 8) + plain[16:] + bytes(8)
    assert "ends at byte" in refusal(check(forged, context))


def test_a_truncated_ciphertext_is_refused(plain, context):
    cut = plain[:len(plain) - 100]
    assert "ciphertext" in refusal(check(header(len(cut)) + cut[16:], context))


# ---------------------------------------------------------------- valid objects still load

def test_the_client_librarys_seeded_zstd_ciphertext_loads(fresh, context):
    ct = serial.load_ciphertext(fresh, context, parms_id=context.first_parms_id())
    assert ct.size() == 2 and ct.parms_id() == context.first_parms_id()


def test_an_uncompressed_or_unseeded_ciphertext_loads_too(fresh, plain, context):
    full = serial.dump(serial.load_ciphertext(fresh, context))  # seed expanded: both polynomials
    full_plain = serial.check_ciphertext(full, context)
    for data in (plain, full, full_plain, recompress(plain)):
        assert serial.load_ciphertext(data, context, parms_id=context.first_parms_id()).size() == 2


def test_seal_is_handed_the_object_uncompressed(fresh, context):
    checked = serial.check_ciphertext(fresh, context)
    assert checked[5] == 0 and len(checked) in serial.ciphertext_sizes(4096, 2)


def test_checking_a_ciphertext_takes_at_most_milliseconds(fresh, context):
    serial.check_ciphertext(fresh, context)
    rounds = 200
    start = time.perf_counter()
    for _ in range(rounds):
        serial.check_ciphertext(fresh, context)
    per_check = (time.perf_counter() - start) / rounds
    assert per_check < 0.005, f"{per_check * 1e6:.0f} us per check"  # bound, not a speed claim


# ---------------------------------------------------------------- keys

@pytest.fixture(scope="module")
def bundle(secret) -> bytes:
    return secret.public_bundle(include_public_key=True)


def sections(data: bytes) -> list[tuple[bytes, int, bytes]]:
    out, pos = [], 16
    while True:
        tag, arg, length = struct.unpack_from("<4sIQ", data, pos)
        pos += 16
        if tag == b"END_":
            return out
        out.append((tag, arg, data[pos:pos + length]))
        pos += length


def assemble(parts: list[tuple[bytes, int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<4sIQ", t, a, len(p)) + p for t, a, p in parts)
    return he_keys.MAGIC + body + struct.pack("<4sIQ", b"END_", 0, 0)


def payload(bundle: bytes, tag: bytes) -> bytes:
    return next(p for t, _, p in sections(bundle) if t == tag)


def with_section(bundle: bytes, tag: bytes, data: bytes) -> bytes:
    return assemble([(t, a, data if t == tag else p) for t, a, p in sections(bundle)])


def test_real_keys_pass_their_checks(bundle, context):
    assert serial.check_public_key(payload(bundle, b"PUBK"), context)
    assert serial.check_kswitch_keys(payload(bundle, b"RELK"), context, "relinearization keys")
    assert serial.check_kswitch_keys(payload(bundle, b"GALK"), context, "Galois keys",
                                     galois_element=galois_element(1, 4096))
    assert serial.check_parameters(payload(bundle, b"PARM"))


@pytest.mark.parametrize("tag", [b"PUBK", b"RELK", b"GALK", b"PARM"])
def test_a_key_section_claiming_2_to_the_40_bytes_is_refused_cheaply(tmp_path, bundle, tag):
    path = tmp_path / "b"
    path.write_bytes(with_section(bundle, tag, header(2 ** 40) + bytes(64)))
    assert "claims 2^40 bytes" in refusal(lambda: he_keys.inspect_key_bundle(path))


def test_galois_keys_claiming_2_to_the_40_key_slots_are_refused(bundle, context):
    plain = serial.check_kswitch_keys(payload(bundle, b"GALK"), context, "g", galois_element=3)
    forged = plain[:48] + struct.pack("<Q", 2 ** 40) + plain[56:]
    assert "key slots" in refusal(lambda: serial.check_kswitch_keys(forged, context, "g", galois_element=3))


def test_relinearization_keys_with_a_wrong_part_count_are_refused(bundle, context):
    plain = serial.check_kswitch_keys(payload(bundle, b"RELK"), context, "r")
    forged = plain[:56] + struct.pack("<Q", 2 ** 40) + plain[64:]
    assert "parts" in refusal(lambda: serial.check_kswitch_keys(forged, context, "r"))


def test_a_key_at_the_wrong_parameters_id_is_refused(bundle, context):
    plain = serial.check_kswitch_keys(payload(bundle, b"RELK"), context, "r")
    forged = plain[:16] + os.urandom(32) + plain[48:]
    assert "parameters' id" in refusal(lambda: serial.check_kswitch_keys(forged, context, "r"))


def test_a_public_key_with_three_polynomials_is_refused(bundle, context):
    plain = serial.check_public_key(payload(bundle, b"PUBK"), context)
    assert "polynomials" in refusal(lambda: serial.check_public_key(with_meta(plain, polys=3), context))


def test_parameters_claiming_2_to_the_40_primes_are_refused(bundle):
    plain = serial.check_parameters(payload(bundle, b"PARM"))
    forged = plain[:25] + struct.pack("<Q", 2 ** 40) + plain[33:]
    assert "primes" in refusal(lambda: serial.check_parameters(forged))


def test_a_secret_key_in_a_public_key_section_is_named_without_seal_parsing_it(tmp_path, bundle, secret):
    path = tmp_path / "b"
    path.write_bytes(with_section(bundle, b"PUBK", _secret_key_bytes(secret._secret_key)))
    assert "secret key" in refusal(lambda: he_keys.inspect_key_bundle(path))


def test_the_inference_side_refuses_a_forged_galois_key_before_loading_it(bundle):
    forged = with_section(bundle, b"GALK", header(2 ** 63) + bytes(64))
    assert "claims 2^63 bytes" in refusal(lambda: he_keys.load_key_bundle(forged, PARAMS))


def test_a_real_bundle_still_inspects_and_loads(tmp_path, bundle):
    path = tmp_path / "b"
    path.write_bytes(bundle)
    info = he_keys.inspect_key_bundle(path)
    assert info.has_public_key and info.has_relin_keys and info.galois_steps == (1, 2)
    assert he_keys.load_key_bundle(bundle, PARAMS).relin_keys is not None


# ---------------------------------------------------------------- the key store's parser process

def _die_by_sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_parser_crash_answers_invalid_argument_and_a_new_child_serves_the_next_call():
    from encinfer.keystore.parser import ParserPool

    async def scenario():
        pool = ParserPool()
        try:
            first = await pool.run(os.getpid)
            with pytest.raises(InvalidArgument, match="crashed the key parser .*SIGABRT"):
                await pool.run(os.abort)
            second = await pool.run(os.getpid)
            assert second != first and pool.pid() == second
            with pytest.raises(Unavailable, match="killed"):
                await pool.run(_die_by_sigkill)
            return await pool.run(os.getpid), pool
        finally:
            pool.close()

    third, pool = asyncio.run(scenario())
    assert not _alive(third)  # close() stopped the child


def test_a_parser_that_died_while_idle_costs_no_upload():
    from encinfer.keystore.parser import ParserPool

    async def scenario():
        pool = ParserPool()
        try:
            pid = await pool.run(os.getpid)
            os.kill(pid, signal.SIGSEGV)
            # Until the pool has reaped it: a SIGSEGV'd child shows as a zombie while the kernel
            # still writes its core (waitpid reports nothing yet), and is not dead until then.
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:  # noqa: ASYNC110, ASYNC240
                await asyncio.sleep(0.05)
            return pid, await pool.run(os.getpid)
        finally:
            pool.close()

    dead, alive = asyncio.run(scenario())
    assert alive != dead and not _alive(alive)  # and close() left nothing running


UNGUARDED_SCRIPT = """
import asyncio, os
from encinfer.common.errors import EncinferError
from encinfer.keystore.parser import ParserPool

async def main():
    pool = ParserPool()
    try:
        await pool.run(os.getpid)
        print("PARSED")
    except EncinferError as e:
        print("ANSWER", e.code, e)
    finally:
        pool.close()

asyncio.run(main())  # no `if __name__ == "__main__":` guard: the spawned child runs this again
"""


def test_a_parser_that_cannot_start_is_the_key_stores_fault_and_says_why(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    answers = [line for line in result.stdout.splitlines() if line.startswith(("ANSWER", "PARSED"))]
    assert len(answers) == 1, result.stdout + result.stderr
    assert answers[0].startswith("ANSWER INTERNAL the key store's parser process could not start (exit 1)")
    assert "__main__" in answers[0]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------- through the real services

LAYOUTS = {"latency": ("encrypt_latency", "decrypt_latency"), "coeff": ("encrypt_coeff", "decrypt_coeff")}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def tenant(fs_stack, tmp_path_factory, request):
    """A tenant of each single-sample layout: the rotation layout and the default coefficient layout."""
    clf = fs_stack.classifier(tmp_path_factory.mktemp("untrusted-keys"), layout=request.param)
    secret, key_id = clf.keys(request.param)
    yield fs_stack, clf, secret, key_id, request.param
    clf.close()


def predict(stack, key_id: str, ciphertext: bytes, layout: str = "latency"):
    from encinfer.v1 import inference_pb2 as pb
    request = pb.PredictRequest(model=MODEL, key_id=key_id, request_id="r", ciphertext=ciphertext,
                                layout=pb.LAYOUT_COEFF if layout == "coeff" else pb.LAYOUT_LATENCY)
    return stack.stub().Predict(request, metadata=(("authorization", f"Bearer {ALICE}"),), timeout=CALL_TIMEOUT)


@pytest.mark.parametrize("forge", ["size-2^40", "3-polynomials", "version-4.4", "bomb", "coefficients"])
def test_a_crafted_ciphertext_in_predict_is_invalid_argument_and_the_server_keeps_serving(
        tenant, test_images, forge):
    import importlib

    stack, clf, secret, key_id, name = tenant
    module = importlib.import_module(f"encinfer.he.{name}")
    encrypt, decrypt = (getattr(module, f) for f in LAYOUTS[name])
    layout = clf.layout_info(name)
    x = test_images[0][0]
    good = serial.check_ciphertext(encrypt(secret, x, layout), layout.params.context())
    coefficients = bytearray(good)
    struct.pack_into("<Q", coefficients, 16 + META.size + 16, 1 << 40)  # the coefficient array's count
    crafted = {
        "size-2^40": header(2 ** 40) + good[16:],
        "3-polynomials": with_meta(good, polys=3),
        "version-4.4": header(len(good), version=(4, 4)) + good[16:],
        "bomb": (lambda p: header(16 + len(p), compression=2) + p)(bomb(64 << 20, content_size=False)),
        "coefficients": bytes(coefficients),
    }[forge]
    start = time.monotonic()
    err = rpc_error(lambda: predict(stack, key_id, crafted, name))
    assert time.monotonic() - start < 10
    # The refusal comes from encinfer's own check, before SEAL parses anything.
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, r"holds 2\^40 coefficients" if forge == "coefficients"
                  else "ciphertext")
    scores = decrypt(secret, predict(stack, key_id, good, name).ciphertexts[0], layout)
    assert np.all(np.isfinite(scores))


def test_a_crafted_key_bundle_in_putkeys_is_invalid_argument_and_nothing_is_stored(keystore_factory, bundle):
    from encinfer.client.keystore import KeyStoreClient
    from encinfer.common import errors
    ks = keystore_factory("fs", tokens="alice-t=alice:tenant")
    with KeyStoreClient(ks.target, token="alice-t") as client:
        with pytest.raises(errors.InvalidArgument, match="claims 2\\^40 bytes"):
            client.put(with_section(bundle, b"GALK", header(2 ** 40) + bytes(64)))
        assert ks.store.backend.list("") == []
        assert client.put(bundle)  # the key store still takes a real bundle
