"""Bytes <-> SEAL objects, and the checks that untrusted SEAL bytes pass before SEAL sees them.

tenseal.sealapi only saves and loads through file paths, so objects pass through a
per-process scratch directory on tmpfs (/dev/shm when present): about 0.1 ms for a
33 KB ciphertext, far below the arithmetic it feeds.

Why the checks: TenSEAL 0.3.18 bundles SEAL 4.3.3, and SEAL 4.4.0 hardened the parsing
of untrusted serialized objects. Until TenSEAL ships a newer SEAL, every object a client
sends is walked here first, field by field, against the exact layout the model's
parameters allow (SEAL 4.x's own format: native/src/seal/serialization.cpp,
ciphertext.cpp, dynarray.h, kswitchkeys.cpp, encryptionparams.cpp, randomgen.cpp):

    SEALHeader   magic 0xA15E (u16), header size 16 (u8), version major, minor (u8),
                 compression (u8: 0 none, 1 zlib, 2 zstd), reserved (u16), size (u64,
                 the whole object with its header; for a compressed object the
                 compressed size)
    Ciphertext   parms_id (4 x u64), NTT form (u8), polynomials (u64), N (u64), primes k
                 (u64), scale (f64), correction factor (u64), then a DynArray (its own
                 uncompressed SEALHeader, a u64 count, count x u64): 2Nk words, or Nk
                 words and a UniformRandomGeneratorInfo (SEALHeader, PRNG type u8,
                 64-byte seed) for a seeded ciphertext
    KSwitchKeys  parms_id, outer count (u64), per entry an inner count (u64) and that
                 many PublicKeys (each a Ciphertext object); RelinKeys and GaloisKeys
    EncryptionParameters  scheme (u8), N (u64), prime count (u64), each prime a Modulus
                 object (SEALHeader, u64), then the plain modulus (a Modulus object)

Sizes are bounded before anything is read or allocated, a compressed object is
decompressed here with a bound on its output (zstd only: it is what SEAL writes by
default and so what every encinfer client sends; zlib is refused), and SEAL is then
handed the checked, uncompressed object, so SEAL's own decompressor never runs on
untrusted bytes. Each refusal is InvalidArgument with a message that says what was
wrong. The services parse only in worker processes (inference workers, the key
store's parser process), so a parser bug SEAL still has costs a process, never a server.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import tenseal.sealapi as seal
import zstandard

from encinfer.common.errors import InvalidArgument


class Loadable(Protocol):
    """A SEAL object: loads itself from a file, with or without a context."""

    def load(self, *args: Any) -> Any: ...


T = TypeVar("T", bound=Loadable)

_local = threading.local()

# ---------------------------------------------------------------- SEAL's format

SEAL_MAGIC = 0xA15E
HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, reserved, size
HEADER_SIZE = HEADER.size  # 16
COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD = 0, 1, 2
_COMPR_NAMES = {COMPR_NONE: "none", COMPR_ZLIB: "zlib", COMPR_ZSTD: "zstd"}
# What encinfer clients write (SEAL's default is zstd) and what an exact check needs.
ALLOWED_COMPRESSION = frozenset({COMPR_NONE, COMPR_ZSTD})
_CT_META = struct.Struct("<32sBQQQdQ")  # Ciphertext members before its DynArray: 73 bytes
_U64 = struct.Struct("<Q")
_SEED_INFO_SIZE = HEADER_SIZE + 1 + 64  # UniformRandomGeneratorInfo: PRNG type, 64-byte seed
_PRNG_TYPES = {1, 2}  # blake2xb, shake256
_MODULUS_SIZE = HEADER_SIZE + 8
_MAX_PRIMES = 64  # SEAL_COEFF_MOD_COUNT_MAX
_MAX_DEGREE = 32768  # SEAL_POLY_MOD_DEGREE_MAX
_ZSTD_WINDOW_MAX = 1 << 23  # what SEAL 4.4 allows its own zstd decoder
_SCHEMES = {1: "BFV", 2: "CKKS", 3: "BGV"}


@dataclass(frozen=True)
class SealHeader:
    """A checked SEALHeader."""

    compression: int
    size: int


@functools.cache
def bundled_version() -> tuple[int, int]:
    """(major, minor) of the SEAL inside TenSEAL, read from a header it writes."""
    raw = dump(seal.EncryptionParameters(seal.SCHEME_TYPE.NONE))
    _, _, major, minor, _, _, _ = HEADER.unpack_from(raw)
    return major, minor


def _bytes(n: int) -> str:
    """A size as a person reads it: 2^40 for absurd powers of two, 33,016 otherwise."""
    if n >= 1 << 20 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    return f"{n:,}"


def _invalid(what: str, reason: str) -> InvalidArgument:
    return InvalidArgument(f"{what} is not a valid SEAL object for these parameters: {reason}")


def check_header(data: bytes | memoryview, what: str, *, max_size: int,
                 allowed_compression: Collection[int] = ALLOWED_COMPRESSION, kind: str = "object",
                 exact: bool = True) -> SealHeader:
    """Checks the 16-byte SEALHeader at the start of `data` before SEAL reads any of it.

    magic, header size, version (the bundled SEAL's major.minor exactly: 3.x and newer 4.x
    objects have other layouts), compression mode, reserved bytes, and the size field:
    at most `max_size`, and (exact=True) equal to len(data). Raises InvalidArgument.
    """
    if len(data) < HEADER_SIZE:
        raise _invalid(what, f"{len(data)} bytes is shorter than a SEAL header ({HEADER_SIZE} bytes)")
    magic, header_size, major, minor, compression, reserved, size = HEADER.unpack_from(data)
    if magic != SEAL_MAGIC:
        raise _invalid(what, f"it does not start with SEAL's magic number (0x{magic:04X}, not 0xA15E)")
    if header_size != HEADER_SIZE:
        raise _invalid(what, f"its header says it is {header_size} bytes long; a SEAL header is {HEADER_SIZE}")
    if (major, minor) != bundled_version():
        want = "{}.{}".format(*bundled_version())
        raise _invalid(what, f"it was written by SEAL {major}.{minor}; this server reads SEAL {want} objects only")
    if compression not in allowed_compression:
        name = _COMPR_NAMES.get(compression, f"unknown mode {compression}")
        allowed = " or ".join(_COMPR_NAMES[c] for c in sorted(allowed_compression))
        raise _invalid(what, f"its compression is {name}; this server accepts {allowed}")
    if reserved:
        raise _invalid(what, "its header's reserved bytes are not zero")
    if size > max_size:
        raise _invalid(what, f"its header claims {_bytes(size)} bytes; a {kind} is at most "
                             f"{max_size:,} bytes")
    if size < HEADER_SIZE:
        raise _invalid(what, f"its header claims {size} bytes, less than the header itself")
    if exact and size != len(data):
        raise _invalid(what, f"its header claims {size:,} bytes but {len(data):,} arrived (truncated or padded)")
    if size > len(data):
        raise _invalid(what, f"it is truncated ({len(data):,} of the {size:,} bytes its header claims)")
    return SealHeader(compression, size)


def _zstd_bound(n: int) -> int:
    """Generous upper bound of zstd's output for n input bytes (ZSTD_COMPRESSBOUND plus framing)."""
    return n + (n >> 8) + max(0, ((128 << 10) - n) >> 11) + 1024


def max_size(plain_sizes: Collection[int], allowed_compression: Collection[int] = ALLOWED_COMPRESSION) -> int:
    """The most bytes an object of one of `plain_sizes` (uncompressed) can take on the wire."""
    largest = max(plain_sizes)
    return HEADER_SIZE + _zstd_bound(largest - HEADER_SIZE) if COMPR_ZSTD in allowed_compression else largest


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decoder (a decoder is not shared between threads), window capped as SEAL 4.4 does."""
    d = getattr(_local, "zstd", None)
    if d is None:
        d = _local.zstd = zstandard.ZstdDecompressor(max_window_size=_ZSTD_WINDOW_MAX)
    return d


def _plain(data: bytes | memoryview, what: str, *, plain_sizes: Collection[int], kind: str,
           allowed_compression: Collection[int] = ALLOWED_COMPRESSION, exact: bool = True) -> bytes:
    """The object as an uncompressed SEAL object, checked to be one of `plain_sizes` bytes
    (exact=False: at most the largest; the caller's walk then checks every field).

    A zstd payload is decompressed with its output bounded by max(plain_sizes): a
    stream that inflates further is refused after max+1 bytes, whatever it claims.
    """
    largest = max(plain_sizes)
    header = check_header(data, what, max_size=max_size(plain_sizes, allowed_compression),
                          allowed_compression=allowed_compression, kind=kind)
    if header.compression == COMPR_NONE:
        if exact and len(data) not in plain_sizes:
            raise _invalid(what, f"it is {len(data):,} bytes; a {kind} is "
                                 f"{' or '.join(f'{s:,}' for s in sorted(plain_sizes))} bytes")
        return bytes(data)
    payload = memoryview(data)[HEADER_SIZE:]
    bound = largest - HEADER_SIZE
    try:
        claimed = zstandard.frame_content_size(payload)
        if claimed > bound:
            raise _invalid(what, f"its compressed content claims {_bytes(claimed)} bytes; a {kind} "
                                 f"is at most {bound:,} bytes uncompressed")
        reader = _decompressor().stream_reader(payload)
        members = reader.read(bound + 1)
    except zstandard.ZstdError as e:
        raise _invalid(what, f"its zstd payload is corrupt ({e})") from None
    if len(members) > bound:
        raise _invalid(what, f"it decompresses to more than {bound:,} bytes, the most a {kind} holds")
    size = HEADER_SIZE + len(members)
    if exact and size not in plain_sizes:
        raise _invalid(what, f"it decompresses to {size:,} bytes; a {kind} is "
                             f"{' or '.join(f'{s:,}' for s in sorted(plain_sizes))} bytes")
    _, _, major, minor, _, _, _ = HEADER.unpack_from(data)
    return HEADER.pack(SEAL_MAGIC, HEADER_SIZE, major, minor, COMPR_NONE, 0, size) + members


def _peek(data: bytes | memoryview, n: int) -> bytes:
    """The first n bytes after the header, uncompressed (bounded: for a better message only)."""
    if data[5:6] == bytes([COMPR_ZSTD]):
        try:
            return _decompressor().stream_reader(
                memoryview(data)[HEADER_SIZE:]).read(n)
        except zstandard.ZstdError:
            return b""
    return bytes(data[HEADER_SIZE:HEADER_SIZE + n])


def _nested_header(data: bytes, pos: int, what: str, size: int, part: str) -> None:
    """An inner SEALHeader (SEAL writes nested objects uncompressed) of exactly `size` bytes."""
    if len(data) < pos + HEADER_SIZE:
        raise _invalid(what, f"it ends inside its {part}")
    magic, header_size, major, minor, compression, reserved, claimed = HEADER.unpack_from(data, pos)
    if (magic, header_size, (major, minor), compression, reserved) != \
            (SEAL_MAGIC, HEADER_SIZE, bundled_version(), COMPR_NONE, 0):
        raise _invalid(what, f"its {part} at byte {pos} has no valid uncompressed SEAL header")
    if claimed != size:
        raise _invalid(what, f"its {part} claims {_bytes(claimed)} bytes; it must be {size:,}")


# ---------------------------------------------------------------- ciphertexts

def ciphertext_sizes(n: int, k: int) -> tuple[int, int]:
    """Uncompressed bytes of a size-2 ciphertext with N=n and k primes: (seeded, full)."""
    base = HEADER_SIZE + _CT_META.size + HEADER_SIZE + _U64.size
    return base + 8 * n * k + _SEED_INFO_SIZE, base + 16 * n * k


def parms_id_bytes(parms_id: Any) -> bytes:
    """SEAL's parms_id (4 x u64) as it is serialized."""
    return struct.pack("<4Q", *parms_id)


def _check_ciphertext_members(data: bytes, pos: int, end: int, what: str, *, n: int, k: int, parms_id: bytes,
                              scale: float | None, describe_level: Callable[[bytes], str | None]) -> None:
    """Walks one uncompressed Ciphertext object in data[pos:end] (its header already checked)."""
    body = pos + HEADER_SIZE
    if end < body + _CT_META.size:
        raise _invalid(what, "it ends inside its ciphertext metadata")
    pid, ntt, polys, degree, primes, got_scale, correction = _CT_META.unpack_from(data, body)
    if polys != 2:
        raise InvalidArgument(f"{what} has {_bytes(polys)} polynomials; a fresh ciphertext has 2")
    if pid != parms_id:
        level = describe_level(pid)
        if level is not None:
            raise InvalidArgument(f"{what} is at {level}")
        raise _invalid(what, "its parameters' id is not the model's (it was made for other encryption parameters)")
    if degree != n or primes != k:
        raise _invalid(what, f"it claims N={_bytes(degree)} and {_bytes(primes)} primes; this model's has N={n} "
                             f"and {k}")
    if ntt != 1:
        raise InvalidArgument(f"{what} is not in NTT form; it is not a CKKS ciphertext")
    if not (math.isfinite(got_scale) and got_scale > 0 and got_scale >= 2.2250738585072014e-308):
        raise InvalidArgument(f"{what} has scale {got_scale!r}; a CKKS scale is a positive normal number")
    if scale is not None and got_scale != scale:
        raise InvalidArgument(f"{what} has scale 2^{math.log2(got_scale):.4g}; expected 2^{math.log2(scale):.4g}")
    if correction != 1:
        raise _invalid(what, f"its correction factor is {correction}; CKKS uses 1")
    arr = body + _CT_META.size
    if end < arr + HEADER_SIZE + _U64.size:
        raise _invalid(what, "it ends inside its coefficient array")
    (count,) = _U64.unpack_from(data, arr + HEADER_SIZE)
    if count not in (n * k, 2 * n * k):
        raise _invalid(what, f"it holds {_bytes(count)} coefficients; a ciphertext for this model holds {n * k:,} "
                             f"(seeded) or {2 * n * k:,}")
    _nested_header(data, arr, what, HEADER_SIZE + _U64.size + 8 * count, "coefficient array")
    after = arr + HEADER_SIZE + _U64.size + 8 * count
    if count == n * k:
        _nested_header(data, after, what, _SEED_INFO_SIZE, "seed")
        if end < after + _SEED_INFO_SIZE:
            raise _invalid(what, "it ends inside its seed")
        if data[after + HEADER_SIZE] not in _PRNG_TYPES:
            raise _invalid(what, f"its seed names PRNG type {data[after + HEADER_SIZE]}, which SEAL does not have")
        after += _SEED_INFO_SIZE
    if after != end:
        raise _invalid(what, f"its ciphertext ends at byte {after:,}, not {end:,}")


def _no_level(pid: bytes) -> str | None:
    return None


@dataclass(frozen=True)
class _Shape:
    """What the checks need from a SEALContext, read once per parameter set (pybind calls cost ~1 us each)."""

    n: int
    levels: dict  # parms_id bytes -> (chain index, primes), every data level, first to last
    first: bytes
    first_index: int
    key_primes: int
    key_parms_id: bytes


_shapes: dict[tuple[int, ...], _Shape] = {}


def _shape(context: seal.SEALContext) -> _Shape:
    cache_key = tuple(context.key_parms_id())
    shape = _shapes.get(cache_key)
    if shape is None:
        levels, data = {}, context.first_context_data()
        while data is not None:
            levels[parms_id_bytes(data.parms_id())] = (data.chain_index(), len(data.parms().coeff_modulus()))
            data = data.next_context_data()
        key = context.key_context_data()
        first = context.first_context_data()
        shape = _Shape(n=key.parms().poly_modulus_degree(), levels=levels, first=parms_id_bytes(first.parms_id()),
                       first_index=first.chain_index(), key_primes=len(key.parms().coeff_modulus()),
                       key_parms_id=parms_id_bytes(key.parms_id()))
        if len(_shapes) >= 64:  # a handful of models per process: never more than this
            _shapes.clear()
        _shapes[cache_key] = shape
    return shape


def _data_levels(context: seal.SEALContext) -> dict[bytes, tuple[int, int]]:
    return _shape(context).levels


def _level_namer(context: seal.SEALContext) -> Callable[[bytes], str | None]:
    def describe(pid: bytes) -> str | None:
        level = _data_levels(context).get(pid)
        if level is None:
            return None
        first = _shape(context).first_index
        lower = "a lower level than" if level[0] < first else "another level than"
        return (f"level {level[0]}, {lower} a fresh ciphertext (level {first}); encrypt it at the first data "
                "level of the model's parameters")
    return describe


def check_ciphertext(data: bytes | memoryview, context: seal.SEALContext, what: str = "ciphertext", *,
                     parms_id: Any = None, scale: float | None = None) -> bytes:
    """Checks a ciphertext for `context` at `parms_id` (None: at whichever data level it names).

    Exact: 2 polynomials, the context's N and the level's prime count, that level's
    parms_id, NTT form, a sane scale (== `scale` when given), a coefficient array of
    N*k (seeded) or 2*N*k words and nothing after it. Returns the object uncompressed,
    ready for SEAL. Cost: tens of microseconds (numbers in docs/security.md).
    """
    shape = _shape(context)
    n, levels = shape.n, shape.levels
    if parms_id is not None:
        expected = parms_id_bytes(parms_id)
        if expected not in levels:
            raise ValueError("parms_id is not a data level of this context")
        k = levels[expected][1]
        describe = _level_namer(context)
    else:  # any data level: its own prime count
        first = shape.first
        named = _peek(data, 32)
        expected = named if named in levels else first
        k = levels[expected][1] if named in levels else levels[first][1]
        describe = _no_level
    sizes = ciphertext_sizes(n, k)
    try:
        plain = _plain(data, what, plain_sizes=sizes, kind="ciphertext for this model", exact=False)
    except InvalidArgument:
        # Too big or badly compressed: say what its metadata claims when that is the real mistake.
        if len(data) >= HEADER_SIZE and data[:2] == b"\x5e\xa1":
            meta = _peek(data, _CT_META.size)
            if len(meta) == _CT_META.size and _CT_META.unpack_from(meta)[3] == n:  # a ciphertext of this ring
                pid, _, polys = _CT_META.unpack_from(meta)[:3]
                if polys != 2:
                    raise InvalidArgument(f"{what} has {_bytes(polys)} polynomials; a fresh ciphertext has 2") from None
                if pid != expected and describe(pid) is not None:
                    raise InvalidArgument(f"{what} is at {describe(pid)}") from None
        raise
    _check_ciphertext_members(plain, 0, len(plain), what, n=n, k=k, parms_id=expected, scale=scale,
                              describe_level=describe)
    return plain


# ---------------------------------------------------------------- keys and parameters

def _key_shape(context: seal.SEALContext) -> tuple[int, int, int, bytes]:
    """(N, primes at the key level, data primes, key parms_id)."""
    shape = _shape(context)
    return shape.n, shape.key_primes, shape.levels[shape.first][1], shape.key_parms_id


def public_key_sizes(context: seal.SEALContext) -> tuple[int, int]:
    """Uncompressed bytes of a PublicKey for `context`: (seeded, full)."""
    n, k_all, _, _ = _key_shape(context)
    return ciphertext_sizes(n, k_all)


def check_public_key(data: bytes | memoryview, context: seal.SEALContext, what: str = "public key") -> bytes:
    """Checks a PublicKey: one size-2 ciphertext at the key level, scale 1. Returns it uncompressed."""
    n, k_all, _, pid = _key_shape(context)
    plain = _plain(data, what, plain_sizes=public_key_sizes(context), kind="public key for these parameters")
    _check_ciphertext_members(plain, 0, len(plain), what, n=n, k=k_all, parms_id=pid, scale=1.0,
                              describe_level=_no_level)
    return plain


def kswitch_sizes(context: seal.SEALContext, outer: int) -> tuple[int, ...]:
    """Uncompressed bytes of KSwitchKeys holding one entry of (data primes) keys, seeded or full."""
    n, k_all, k, _ = _key_shape(context)
    head = HEADER_SIZE + 32 + _U64.size + _U64.size * outer
    return tuple(head + k * size for size in ciphertext_sizes(n, k_all))


def check_kswitch_keys(data: bytes | memoryview, context: seal.SEALContext, what: str, *,
                       galois_element: int | None = None) -> bytes:
    """Checks RelinKeys (galois_element None) or GaloisKeys holding exactly the key for one element.

    RelinKeys: one entry of (data primes) PublicKeys. GaloisKeys: N entries (SEAL indexes
    them by element // 2), all empty but the one for `galois_element`. Every inner key is
    checked as a ciphertext at the key level. Returns the object uncompressed.
    """
    n, k_all, k, pid = _key_shape(context)
    outer = 1 if galois_element is None else n
    index = 0 if galois_element is None else galois_element >> 1
    if galois_element is not None and not (0 < galois_element < 2 * n and galois_element % 2 == 1):
        raise _invalid(what, f"Galois element {galois_element} is not an odd number below 2N = {2 * n}")
    kind = "Galois key" if galois_element is not None else "relinearization key set"
    plain = _plain(data, what, plain_sizes=kswitch_sizes(context, outer), kind=f"{kind} for these parameters")
    pos = HEADER_SIZE
    if plain[pos:pos + 32] != pid:
        raise _invalid(what, "its parameters' id is not the key level of the model's parameters")
    pos += 32
    (dim1,) = _U64.unpack_from(plain, pos)
    if dim1 != outer:
        raise _invalid(what, f"it has {_bytes(dim1)} key slots; {kind}s for these parameters have {outer}")
    pos += _U64.size
    # The empty slots before and after the one in use are runs of zero u64 counts: compared, not walked.
    if not _zeros(plain, pos, 8 * index):
        raise _invalid(what, _not_one_key(galois_element))
    pos += 8 * index
    (dim2,) = _U64.unpack_from(plain, pos)
    if dim2 != k:
        raise _invalid(what, f"its key has {_bytes(dim2)} parts; "
                             f"a key for these parameters has {k} (one per data prime)")
    pos += _U64.size
    key_size = (len(plain) - HEADER_SIZE - 32 - 8 - 8 * outer) // k
    for j in range(k):
        _nested_header(plain, pos, what, key_size, f"key part {j}")
        _check_ciphertext_members(plain, pos, pos + key_size, f"{what} (part {j})", n=n, k=k_all, parms_id=pid,
                                  scale=1.0, describe_level=_no_level)
        pos += key_size
    tail = 8 * (outer - index - 1)
    if pos + tail != len(plain) or not _zeros(plain, pos, tail):
        raise _invalid(what, _not_one_key(galois_element))
    return plain


def _not_one_key(element: int | None) -> str:
    if element is None:
        return "it holds more than the one relinearization key set"
    return f"it is filed under Galois element {element} but does not hold exactly that one key"


def _zeros(data: bytes, pos: int, length: int) -> bool:
    """True when data[pos:pos+length] is all zero bytes (counted in C: 32 KB of empty key slots at N=4096)."""
    return data.count(0, pos, pos + length) == length


def parameters_sizes(primes: int) -> int:
    return HEADER_SIZE + 1 + 8 + 8 + _MODULUS_SIZE * (primes + 1)


PARAMETERS_SIZES = tuple(parameters_sizes(p) for p in range(1, _MAX_PRIMES + 1))


def check_parameters(data: bytes | memoryview, what: str = "encryption parameters") -> bytes:
    """Checks serialized EncryptionParameters: a known scheme, N a power of two up to 32768, 1-64 primes."""
    try:
        return _check_parameters(data, what)
    except InvalidArgument as e:  # parameters are not checked "for these parameters"
        raise InvalidArgument(str(e).replace(" for these parameters:", ":", 1)) from None


def _check_parameters(data: bytes | memoryview, what: str) -> bytes:
    plain = _plain(data, what, plain_sizes=PARAMETERS_SIZES, kind="parameter set (at most 64 primes)")
    scheme, degree, primes = struct.unpack_from("<BQQ", plain, HEADER_SIZE)
    if scheme not in _SCHEMES:
        raise _invalid(what, f"scheme {scheme} is not one SEAL has")
    if not (0 < degree <= _MAX_DEGREE and degree & (degree - 1) == 0):
        raise _invalid(what, f"poly_modulus_degree {_bytes(degree)} is not a power of two up to {_MAX_DEGREE}")
    if len(plain) != parameters_sizes(primes):
        held = (len(plain) - parameters_sizes(0)) // _MODULUS_SIZE
        raise _invalid(what, f"it names {_bytes(primes)} primes but holds {held}")
    pos = HEADER_SIZE + 17
    for i in range(primes + 1):
        _nested_header(plain, pos, what, _MODULUS_SIZE, "plain modulus" if i == primes else f"prime {i}")
        (value,) = _U64.unpack_from(plain, pos + HEADER_SIZE)
        if value >> 61:
            raise _invalid(what, f"modulus {value} is wider than SEAL's 61 bits")
        pos += _MODULUS_SIZE
    return plain


def looks_like_secret_key(data: bytes | memoryview, context: seal.SEALContext) -> bool:
    """True when `data` has the exact shape of a SecretKey for `context` (checked without SEAL).

    A SecretKey is a Plaintext at the key level: parms_id, coefficient count N*k (u64),
    scale (f64), and a DynArray of N*k words.
    """
    n, k_all, _, pid = _key_shape(context)
    words = n * k_all
    size = HEADER_SIZE + 32 + 8 + 8 + HEADER_SIZE + 8 + 8 * words
    try:
        plain = _plain(data, "secret key", plain_sizes=(size,), kind="secret key")
        _nested_header(plain, HEADER_SIZE + 48, "secret key", HEADER_SIZE + 8 + 8 * words, "coefficients")
    except InvalidArgument:
        return False
    (count,) = _U64.unpack_from(plain, HEADER_SIZE + 32)
    (inner,) = _U64.unpack_from(plain, HEADER_SIZE + 48 + HEADER_SIZE)
    return plain[HEADER_SIZE:HEADER_SIZE + 32] == pid and count == words and inner == words


# ---------------------------------------------------------------- file plumbing

def scratch_dir() -> Path:
    """A private directory for this process and thread (SEAL file I/O is not shared)."""
    d = getattr(_local, "dir", None)
    if d is None or getattr(_local, "pid", None) != os.getpid():
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        d = Path(tempfile.mkdtemp(prefix="encinfer-seal-", dir=base))
        os.chmod(d, 0o700)
        _local.dir, _local.pid = d, os.getpid()
        import atexit
        atexit.register(shutil.rmtree, d, True)
    return d


def _path(name: str) -> str:
    return str(scratch_dir() / name)


def _write_input(data: bytes) -> str:
    """Writes `data` to this thread's input file through a descriptor kept open, in place
    (pwrite + ftruncate: 4 us for 33 KB, against 23 us to open, write and close)."""
    d = scratch_dir()
    if getattr(_local, "in_dir", None) is not d:
        path = str(d / "in")
        _local.in_fd, _local.in_dir, _local.in_path = os.open(path, os.O_RDWR | os.O_CREAT, 0o600), d, path
    os.pwrite(_local.in_fd, data, 0)
    os.ftruncate(_local.in_fd, len(data))
    return _local.in_path


def dump(obj: Any) -> bytes:
    """Serializes a SEAL object or Serializable (seeded) with SEAL's default compression (zstd)."""
    path = _path("out")
    obj.save(path)
    with open(path, "rb") as f:
        return f.read()


def load(make: Callable[[], T], data: bytes, context: seal.SEALContext | None, what: str) -> T:
    """Loads `data` into a fresh object from `make()`; bad bytes are InvalidArgument.

    The header is checked first (magic, version, compression, size == len(data)); SEAL
    then validates sizes and that the object is valid for `context` while loading.
    Objects from clients go through the exact checks above (check_ciphertext etc.) first.
    """
    if not data:
        raise InvalidArgument(f"{what} is empty")
    check_header(data, what, max_size=len(data))
    path = _write_input(data)
    obj = make()
    try:
        if context is None:
            obj.load(path)
        else:
            obj.load(context, path)
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as e:
        raise InvalidArgument(f"{what} is not a valid SEAL object for these parameters ({e})") from None
    return obj


def load_file(make: Callable[[], T], path: str | os.PathLike, context: seal.SEALContext | None, what: str) -> T:
    """Like `load`, straight from a file of checked bytes (big key sets are never one bytes object)."""
    obj = make()
    try:
        if context is None:
            obj.load(str(path))
        else:
            obj.load(context, str(path))
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as e:
        raise InvalidArgument(f"{what} is not a valid SEAL object for these parameters ({e})") from None
    return obj


def check_fresh_input(ct: seal.Ciphertext, context: seal.SEALContext, parms_id: Any,
                      input_scale_bits: int) -> seal.Ciphertext:
    """A loaded input is a fresh encryption for these parameters: 2 polynomials, at the first
    level, in NTT form, at the model's input scale, and not transparent (every layout asks this)."""
    if ct.size() != 2:
        raise InvalidArgument(f"ciphertext has {ct.size()} polynomials; a fresh ciphertext has 2")
    if ct.parms_id() != parms_id:
        level = context.get_context_data(ct.parms_id()).chain_index()
        raise InvalidArgument(f"ciphertext is at level {level}; a fresh input is at the first level "
                              f"({context.first_context_data().chain_index()})")
    if not ct.is_ntt_form():
        raise InvalidArgument("ciphertext is not in NTT form; it is not a CKKS ciphertext")
    if ct.scale != 2.0 ** input_scale_bits:
        raise InvalidArgument(f"ciphertext scale is {ct.scale:.6g}; the model's inputs are encoded at "
                              f"2^{input_scale_bits}")
    if ct.is_transparent():
        raise InvalidArgument("ciphertext is transparent (not encrypted); encrypt the sample")
    return ct


def load_ciphertext(data: bytes, context: seal.SEALContext, what: str = "ciphertext", *,
                    parms_id: Any = None) -> seal.Ciphertext:
    """A client's fresh ciphertext: checked by check_ciphertext, then parsed by SEAL."""
    if not data:
        raise InvalidArgument(f"{what} is empty")
    plain = check_ciphertext(data, context, what, parms_id=parms_id)
    return load(lambda: seal.Ciphertext(context), plain, context, what)


# ---------------------------------------------------------------- SEAL version bridge
#
# SEAL <= 4.3.3 loads only objects whose every header (nested ones included) carries its own
# major.minor version, although the wire format did not change between 4.0 and 4.4 (SEAL 4.4
# loads earlier 4.x objects again). A browser runs node-seal 7 (SEAL 4.1.2), the services run
# TenSEAL's SEAL 4.3.3, so the browser gateway rewrites the version of each object it passes on.
# It walks SEAL's structure (serialization.cpp, ciphertext.cpp, dynarray.h, plaintext.cpp,
# kswitchkeys.cpp, encryptionparams.cpp, modulus.cpp, randomgen.cpp of SEAL 4.3.3), checking
# every header and size, and never searches for byte patterns: a pattern can occur inside
# random polynomial data. Compressed objects are refused on the way in; on the way out they are
# decompressed within a bound (TenSEAL always saves with zstd) and passed on uncompressed.

import struct as _struct  # noqa: E402 -- appended section (the top of the file is edited elsewhere)
from dataclasses import dataclass as _dataclass  # noqa: E402

SEAL_HEADER = _struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr_mode, reserved, size
_SEAL_MAGIC_U16, _SEAL_HEADER_SIZE = 0xA15E, 0x10
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2
# 4.x versions whose wire format is SEAL 4.3's (SEAL 4.4's change log: "the wire format is unchanged").
BRIDGED_MINORS = range(0, 5)
_PARMS_ID = 32
_MAX_RING = 1 << 17
_MAX_PRIMES = 64
_MAX_CT_SIZE = 16
_MAX_KEYS = 1 << 16
_PRNG_INFO_SIZE = 16 + 1 + 64  # header, prng_type, seed (randomgen.h: prng_seed_byte_count)
_KINDS = ("parameters", "ciphertext", "public key", "kswitch keys", "plaintext")


@_dataclass(frozen=True)
class _BridgeHeader:
    offset: int
    major: int
    minor: int
    compr_mode: int
    size: int


def seal_version() -> tuple[int, int]:
    """The (major, minor) version this process's SEAL writes (bundled_version)."""
    return bundled_version()


def object_version(data: bytes, what: str = "SEAL object") -> tuple[int, int]:
    """The version in a serialized object's outer header (checked like every header)."""
    h = _header(memoryview(data), 0, len(data), what, allow_compressed=True)
    return h.major, h.minor


class _Walker:
    """Visits every SEALHeader of one serialized object, checking sizes against SEAL's layout."""

    def __init__(self, data: memoryview, what: str) -> None:
        self.data, self.what = data, what
        self.headers: list[int] = []

    def fail(self, why: str) -> InvalidArgument:
        return InvalidArgument(f"{self.what} is not a well-formed SEAL object: {why}")

    def u64(self, pos: int, end: int) -> int:
        if pos + 8 > end:
            raise self.fail(f"truncated at byte {pos}")
        return int.from_bytes(self.data[pos:pos + 8], "little")

    def object(self, pos: int, end: int, name: str) -> tuple[_BridgeHeader, int]:
        """A nested object's header at `pos`; returns it and where the object ends."""
        h = _header(self.data, pos, end, f"{self.what} ({name})")
        self.headers.append(pos)
        return h, pos + h.size

    def exact(self, at: int, end: int, name: str) -> None:
        if at != end:
            raise self.fail(f"{name} ends at byte {at}, its header says {end}")

    def dynarray(self, pos: int, end: int, count: int | None) -> tuple[int, int]:
        """A DynArray<u64>: header, element count, elements. Returns (elements, end)."""
        h, obj_end = self.object(pos, end, "DynArray")
        n = self.u64(pos + 16, obj_end)
        if count is not None and n != count:
            raise self.fail(f"DynArray at byte {pos} holds {n} words, {count} expected")
        self.exact(pos + 24 + 8 * n, obj_end, "DynArray")
        return n, obj_end

    def modulus(self, pos: int, end: int) -> int:
        _, obj_end = self.object(pos, end, "Modulus")
        self.exact(pos + 24, obj_end, "Modulus")
        return obj_end

    def parameters(self, pos: int, end: int) -> int:
        _, obj_end = self.object(pos, end, "EncryptionParameters")
        p = pos + 16
        if p + 17 > obj_end:
            raise self.fail("EncryptionParameters truncated")
        n, k = self.u64(p + 1, obj_end), self.u64(p + 9, obj_end)
        if not 0 < n <= _MAX_RING or k > _MAX_PRIMES:
            raise self.fail(f"EncryptionParameters with N={n} and {k} primes")
        p += 17
        for _ in range(k + 1):  # the coefficient moduli, then the plain modulus
            p = self.modulus(p, obj_end)
        self.exact(p, obj_end, "EncryptionParameters")
        return obj_end

    def ciphertext(self, pos: int, end: int) -> int:
        """A Ciphertext (or PublicKey): full, or seeded (half the data, then the PRNG's seed)."""
        _, obj_end = self.object(pos, end, "Ciphertext")
        p = pos + 16 + _PARMS_ID
        if p + 1 + 8 * 5 > obj_end:
            raise self.fail("Ciphertext truncated")
        if self.data[p] > 1:
            raise self.fail("Ciphertext's NTT flag is neither 0 nor 1")
        size, n, k = self.u64(p + 1, obj_end), self.u64(p + 9, obj_end), self.u64(p + 17, obj_end)
        if size > _MAX_CT_SIZE or n > _MAX_RING or k > _MAX_PRIMES:
            raise self.fail(f"Ciphertext of size {size}, N={n}, {k} primes")
        p += 1 + 8 * 5  # ntt flag, size, N, primes, scale, correction factor
        full = size * n * k
        words, p = self.dynarray(p, obj_end, None)
        if words == full:
            pass
        elif size >= 2 and 2 * words == full:  # seeded: c1 is regenerated from the seed
            h, info_end = self.object(p, obj_end, "UniformRandomGeneratorInfo")
            self.exact(p + _PRNG_INFO_SIZE, info_end, "UniformRandomGeneratorInfo")
            if self.data[p + 16] not in (1, 2):
                raise self.fail("unknown PRNG type in a seeded Ciphertext")
            p = info_end
        else:
            raise self.fail(f"Ciphertext holds {words} words; size {size} x N {n} x {k} primes needs {full}")
        self.exact(p, obj_end, "Ciphertext")
        return obj_end

    def kswitch_keys(self, pos: int, end: int) -> int:
        """KSwitchKeys (RelinKeys, GaloisKeys): parms_id, then per key a count and PublicKeys."""
        _, obj_end = self.object(pos, end, "KSwitchKeys")
        p = pos + 16 + _PARMS_ID
        dim1 = self.u64(p, obj_end)
        if dim1 > _MAX_KEYS:
            raise self.fail(f"KSwitchKeys with {dim1} key slots")
        p += 8
        for _ in range(dim1):
            dim2 = self.u64(p, obj_end)
            if dim2 > _MAX_PRIMES:
                raise self.fail(f"KSwitchKeys slot with {dim2} keys")
            p += 8
            for _ in range(dim2):
                p = self.ciphertext(p, obj_end)
        self.exact(p, obj_end, "KSwitchKeys")
        return obj_end

    def plaintext(self, pos: int, end: int) -> int:
        _, obj_end = self.object(pos, end, "Plaintext")
        p = pos + 16 + _PARMS_ID
        count = self.u64(p, obj_end)
        if count > _MAX_RING * _MAX_PRIMES:
            raise self.fail(f"Plaintext of {count} coefficients")
        _, p = self.dynarray(p + 16, obj_end, count)
        self.exact(p, obj_end, "Plaintext")
        return obj_end


def _header(data: memoryview, pos: int, end: int, what: str, *, allow_compressed: bool = False) -> _BridgeHeader:
    if pos + SEAL_HEADER.size > end:
        raise InvalidArgument(f"{what} is not a well-formed SEAL object: truncated header at byte {pos}")
    magic, hsize, major, minor, compr, reserved, size = SEAL_HEADER.unpack_from(data, pos)
    if magic != _SEAL_MAGIC_U16 or hsize != _SEAL_HEADER_SIZE or reserved != 0:
        raise InvalidArgument(f"{what} is not a well-formed SEAL object: no SEAL header at byte {pos}")
    if major != 4 or minor not in BRIDGED_MINORS:
        raise InvalidArgument(f"{what} is from SEAL {major}.{minor}; only SEAL 4.0 to 4.4 objects are accepted")
    if compr != _COMPR_NONE and not (allow_compressed and compr in (_COMPR_ZLIB, _COMPR_ZSTD)):
        raise InvalidArgument(f"{what} is compressed (SEAL compr_mode {compr}); send it uncompressed "
                              "(ComprModeType.none)")
    if not SEAL_HEADER.size <= size <= end - pos:
        raise InvalidArgument(f"{what} is not a well-formed SEAL object: header at byte {pos} declares {size} "
                              f"bytes, {end - pos} remain")
    return _BridgeHeader(pos, major, minor, compr, size)


def _walk(data: memoryview, kind: str, what: str) -> _Walker:
    if kind not in _KINDS:
        raise ValueError(f"unknown SEAL object kind {kind!r}")
    w = _Walker(data, what)
    visit = {"parameters": w.parameters, "ciphertext": w.ciphertext, "public key": w.ciphertext,
             "kswitch keys": w.kswitch_keys, "plaintext": w.plaintext}[kind]
    w.exact(visit(0, len(data)), len(data), what)
    return w


def rewrite_seal_version(data: bytes, kind: str, version: tuple[int, int] | None = None,
                         what: str | None = None) -> bytes:
    """The uncompressed object `data` of `kind` with every header saying `version` (default: ours).

    `kind` is one of "parameters", "ciphertext", "public key", "kswitch keys" (RelinKeys and
    GaloisKeys), "plaintext". InvalidArgument for anything that is not exactly such an
    object: a wrong size anywhere, a compressed object, a version outside 4.0-4.4.
    """
    major, minor = version or seal_version()
    out = bytearray(data)
    for pos in _walk(memoryview(out), kind, what or kind).headers:
        out[pos + 3], out[pos + 4] = major, minor
    return bytes(out)


def decompress_seal(data: bytes, max_bytes: int, what: str = "SEAL object") -> bytes:
    """The object uncompressed (compr_mode none), refusing more than `max_bytes` of output."""
    view = memoryview(data)
    h = _header(view, 0, len(data), what, allow_compressed=True)
    if h.size != len(data):
        raise InvalidArgument(f"{what} has {len(data) - h.size} bytes after its end")
    if h.compr_mode == _COMPR_NONE:
        return bytes(data)
    payload = view[SEAL_HEADER.size:]
    limit = max_bytes - SEAL_HEADER.size
    if h.compr_mode == _COMPR_ZLIB:
        import zlib
        d = zlib.decompressobj()
        members = d.decompress(payload, limit + 1)
        if len(members) > limit or d.unconsumed_tail:
            raise InvalidArgument(f"{what} decompresses to more than {max_bytes} bytes")
    else:
        import io

        import zstandard
        try:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)) as reader:
                members = reader.read(limit + 1)
        except zstandard.ZstdError as e:
            raise InvalidArgument(f"{what} does not decompress ({e})") from None
        if len(members) > limit:
            raise InvalidArgument(f"{what} decompresses to more than {max_bytes} bytes")
    head = SEAL_HEADER.pack(_SEAL_MAGIC_U16, _SEAL_HEADER_SIZE, h.major, h.minor, _COMPR_NONE, 0,
                            SEAL_HEADER.size + len(members))
    return head + members


def bridge_key_bundle(bundle: bytes, version: tuple[int, int] | None = None) -> bytes:
    """An encinfer-keys-v1 bundle with each section's SEAL object rewritten to `version` (default ours).

    Only the framing is read here (magic, then tag/arg/length sections up to END_); the key
    store's inspect_key_bundle validates the result as it validates every bundle.
    """
    magic = b"encinfer-keys-v1"
    kinds = {b"PARM": "parameters", b"PUBK": "public key", b"RELK": "kswitch keys", b"GALK": "kswitch keys"}
    section = _struct.Struct("<4sIQ")
    if bytes(bundle[:len(magic)]) != magic:
        raise InvalidArgument("not an encinfer-keys-v1 key bundle")
    out, pos = [magic], len(magic)
    for _ in range(3 + 32768 + 1):
        if pos + section.size > len(bundle):
            raise InvalidArgument(f"key bundle is truncated at byte {pos} (no END section)")
        tag, arg, length = section.unpack_from(bundle, pos)
        start = pos + section.size
        if tag == b"END_":
            if length != 0 or start != len(bundle):
                raise InvalidArgument("key bundle has bytes after its END section")
            out.append(bundle[pos:start])
            return b"".join(out)
        kind = kinds.get(tag)
        if kind is None:
            raise InvalidArgument(f"key bundle has an unknown section {tag!r}; only public keys belong in it")
        if length > len(bundle) - start:
            raise InvalidArgument(f"key bundle is truncated inside its {tag.decode()} section")
        payload = rewrite_seal_version(bundle[start:start + length], kind, version,
                                       f"key bundle's {tag.decode()} section")
        out += [bundle[pos:start], payload]
        pos = start + length
    raise InvalidArgument("key bundle has too many sections")
