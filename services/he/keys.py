"""Public key bundles ("encinfer-keys-v1"): what a client uploads to the key store.

A bundle is a small envelope around SEAL's own serialized objects, read section by
section so a 50 MB Galois key set never has to sit in memory as one object:

    magic  b"encinfer-keys-v1"                      16 bytes
    section*: tag (4 ASCII bytes), arg (u32 LE), length (u64 LE), payload
        PARM  SEAL EncryptionParameters (CKKS)       required, first
        PUBK  SEAL PublicKey (seeded)                optional
        RELK  SEAL RelinKeys (seeded)                optional
        GALK  SEAL GaloisKeys holding ONE key, arg = its Galois element (seeded)
        END_  empty                                  required, last

One Galois key per section keeps memory bounded (one key at a time is loaded while
inspecting) and lets the server see which rotations a bundle holds from the section
headers alone, before it loads any key. Galois elements are SEAL's: 3^step mod 2N for
a rotation by `step`, 2N-1 for complex conjugation.
"""
from __future__ import annotations

import functools
import io
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO, TypeVar

import tenseal.sealapi as seal

from encinfer.common.errors import FailedPrecondition, InvalidArgument
from encinfer.he import serial
from encinfer.he.keyinfo import FORMAT, KeyInfo
from encinfer.he.params import CkksParams, check_security

MAGIC = FORMAT.encode()  # exactly 16 bytes
_HEADER = struct.Struct("<4sIQ")
PARM, PUBK, RELK, GALK, END = b"PARM", b"PUBK", b"RELK", b"GALK", b"END_"
_KNOWN = {PARM, PUBK, RELK, GALK, END}
# Tags a careless writer could use for secret material: named in the refusal.
_SECRET_TAGS = {b"SECK", b"SKEY", b"SECR", b"PRIV"}
_SEAL_MAGIC = b"\x5e\xa1"  # SEAL's serialization header starts with 0xA15E (little endian)
# PARM, PUBK, RELK and one Galois key per odd element below 2N (N <= 32768).
_MAX_SECTIONS = 3 + 32768
_KEYGEN_HINT = "create keys with encinfer's keygen (SecretKeys.public_bundle())"

T = TypeVar("T", bound=serial.Loadable)




@dataclass(eq=False)
class ServerKeys:
    """A bundle's evaluation keys, loaded for one parameter set (the model's).

    `galois_keys` maps a Galois element to a SEAL GaloisKeys object holding that one
    key; SEAL's evaluator accepts any GaloisKeys that has the element it needs.
    Only the keys `params` asks for are loaded: cache ServerKeys by
    (key id, params.manifest_sha256()).
    """

    params: CkksParams
    galois_keys: Mapping[int, seal.GaloisKeys]
    relin_keys: seal.RelinKeys | None = None
    nbytes: int = 0
    _by_step: dict[int, seal.GaloisKeys] = field(default_factory=dict, init=False, repr=False)

    def rotation_key(self, step: int) -> seal.GaloisKeys:
        """The GaloisKeys to pass to Evaluator.rotate_vector for `step`."""
        keys = self._by_step.get(step)
        if keys is None:
            elt = _rotation_element(step, self.params.poly_modulus_degree)
            keys = self.galois_keys.get(elt)
            if keys is None:
                raise FailedPrecondition(f"keys lack the Galois key for rotation step {step}")
            self._by_step[step] = keys
        return keys

    def conjugation_key(self) -> seal.GaloisKeys:
        keys = self.galois_keys.get(2 * self.params.poly_modulus_degree - 1)
        if keys is None:
            raise FailedPrecondition("keys lack the complex-conjugation Galois key")
        return keys

    def has_elements(self, elements: list[int] | tuple[int, ...]) -> bool:
        return all(e in self.galois_keys for e in elements)


# ---------------------------------------------------------------- writing

def build_key_bundle(parameters: bytes, *, public_key: bytes | None = None, relin_keys: bytes | None = None,
                     galois_keys: Mapping[int, bytes] | None = None) -> bytes:
    """Wraps already-serialized SEAL objects into a bundle (no validation: see inspect_key_bundle).

    `galois_keys` maps each Galois element to a serialized GaloisKeys holding that one key.
    SecretKeys.public_bundle() is the usual caller.
    """
    out = io.BytesIO()
    out.write(MAGIC)

    def section(tag: bytes, payload: bytes, arg: int = 0) -> None:
        out.write(_HEADER.pack(tag, arg, len(payload)))
        out.write(payload)

    section(PARM, parameters)
    if public_key is not None:
        section(PUBK, public_key)
    if relin_keys is not None:
        section(RELK, relin_keys)
    galois = galois_keys or {}
    for elt in sorted(galois):
        section(GALK, galois[elt], elt)
    section(END, b"")
    return out.getvalue()


# ---------------------------------------------------------------- reading

@dataclass(frozen=True)
class _Section:
    tag: bytes
    arg: int
    offset: int
    length: int


def _sections(f: BinaryIO, size: int) -> list[_Section]:
    """Reads every section header (payloads are skipped), refusing malformed structure."""
    if size == 0:
        raise InvalidArgument("key bundle is empty")
    head = f.read(len(MAGIC))
    if len(head) < len(MAGIC) and MAGIC.startswith(head):
        raise InvalidArgument(f"key bundle is truncated ({size} bytes); upload the whole file")
    if head != MAGIC:
        raise InvalidArgument(_foreign_format(f, head, size))
    sections: list[_Section] = []
    pos = len(MAGIC)
    seen_galois: set[int] = set()
    while True:
        raw = f.read(_HEADER.size)
        if len(raw) < _HEADER.size:
            raise InvalidArgument(f"key bundle is truncated at byte {pos} (no END section); upload the whole file")
        tag, arg, length = _HEADER.unpack(raw)
        pos += _HEADER.size
        if tag in _SECRET_TAGS:
            raise InvalidArgument(f"key bundle carries a secret key (section {tag.decode()}); never upload a "
                                  f"secret key: {_KEYGEN_HINT}")
        if tag not in _KNOWN:
            raise InvalidArgument(f"key bundle has an unknown section {tag!r} at byte {pos - _HEADER.size}; "
                                  f"only public keys belong in a {FORMAT} bundle")
        if length > size - pos:
            raise InvalidArgument(f"key bundle is truncated: section {tag.decode()} at byte {pos - _HEADER.size} "
                                  f"declares {length} bytes, {size - pos} remain; upload the whole file")
        if not sections and tag != PARM:
            raise InvalidArgument("key bundle must start with its encryption parameters (PARM section)")
        if sections and tag == PARM:
            raise InvalidArgument("key bundle has two PARM sections")
        if tag in (PUBK, RELK) and any(s.tag == tag for s in sections):
            raise InvalidArgument(f"key bundle has two {tag.decode()} sections")
        if tag == GALK:
            if arg in seen_galois:
                raise InvalidArgument(f"key bundle has two Galois keys for element {arg}")
            seen_galois.add(arg)
        if tag == END:
            if length != 0 or pos != size:
                raise InvalidArgument(f"key bundle has {size - pos} unexpected bytes after its END section")
            return sections
        if length == 0:
            raise InvalidArgument(f"key bundle's {tag.decode()} section at byte {pos - _HEADER.size} is empty")
        if len(sections) >= _MAX_SECTIONS:
            raise InvalidArgument(f"key bundle has more than {_MAX_SECTIONS} sections")
        sections.append(_Section(tag, arg, pos, length))
        f.seek(length, io.SEEK_CUR)
        pos += length


def _foreign_format(f: BinaryIO, head: bytes, size: int) -> str:
    """Says what a file that is not a bundle is, when that helps the person who uploaded it."""
    if head[:1] == b"\x0a":
        kind = _tenseal_context_kind(f, size)
        if kind is not None:
            return kind
    if head[:2] == _SEAL_MAGIC:
        return f"this is a bare SEAL object, not an {FORMAT} bundle; {_KEYGEN_HINT}"
    return f"not an {FORMAT} key bundle (unknown format); {_KEYGEN_HINT}"


def _read_varint(f: BinaryIO) -> int | None:
    value, shift = 0, 0
    for _ in range(10):
        b = f.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7
    return None


def _protobuf_fields(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, offset, length) of each field in [start, end); ValueError when not protobuf.

    Length-delimited payloads are skipped by seeking, so memory stays bounded.
    """
    f.seek(start)
    pos = start
    while pos < end:
        key = _read_varint(f)
        if key is None:
            raise ValueError("truncated varint")
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            if _read_varint(f) is None:
                raise ValueError("truncated varint")
            length = 0
        elif wire == 1:
            length = 8
        elif wire == 5:
            length = 4
        elif wire == 2:
            n = _read_varint(f)
            if n is None:
                raise ValueError("truncated length")
            length = n
        else:
            raise ValueError(f"wire type {wire}")
        offset = f.tell()
        if offset + length > end:
            raise ValueError("field runs past the end")
        yield number, wire, offset, length
        f.seek(offset + length)
        pos = offset + length


def _tenseal_context_kind(f: BinaryIO, size: int) -> str | None:
    """Recognises a serialized TenSEAL context (TenSEALContextProto) and says why it is refused.

    Its first field is the SEAL EncryptionParameters; field 3 is the private part,
    whose field 1 is the secret key.
    """
    try:
        top: dict[int, tuple[int, int, int]] = {}
        for i, (number, wire, offset, length) in enumerate(_protobuf_fields(f, 0, size)):
            if i == 0:
                f.seek(offset)
                if number != 1 or wire != 2 or f.read(2) != _SEAL_MAGIC:
                    return None
            if i >= 8:  # a TenSEAL context has four top-level fields
                return None
            top[number] = (wire, offset, length)
        _, offset, length = top[1]
        try:
            scheme = _load_section(f, _Section(PARM, 0, offset, length), _empty_parameters, None,
                                   "encryption parameters").scheme()
        except InvalidArgument:
            scheme = None
        has_secret = False
        if 3 in top and top[3][0] == 2:
            _, poff, plen = top[3]
            has_secret = any(n == 1 and w == 2 and ln > 0 for n, w, _, ln in _protobuf_fields(f, poff, poff + plen))
    except ValueError:
        return None
    if has_secret:
        return ("this TenSEAL context carries a secret key: never upload a secret key; upload only public "
                f"keys in an {FORMAT} bundle ({_KEYGEN_HINT})")
    if scheme is not None and scheme != seal.SCHEME_TYPE.CKKS:
        return (f"this is a TenSEAL {_scheme_name(scheme)} context: encinfer needs CKKS, and it is not an "
                f"encinfer key bundle; {_KEYGEN_HINT}")
    return f"this is a TenSEAL context, not an encinfer key bundle; use encinfer's keygen ({_KEYGEN_HINT})"


def _scheme_name(scheme: seal.SCHEME_TYPE) -> str:
    return {seal.SCHEME_TYPE.BFV: "BFV", seal.SCHEME_TYPE.CKKS: "CKKS"}.get(scheme, str(scheme).split(".")[-1])


def _section_check(sec: _Section, context: seal.SEALContext | None, what: str
                   ) -> tuple[int, Callable[[bytes], bytes]]:
    """(the most bytes this section may hold, the serial check for it) -- from the parameters alone."""
    if sec.tag == PARM or context is None:
        return serial.max_size(serial.PARAMETERS_SIZES), lambda data: serial.check_parameters(data, what)
    if sec.tag == PUBK:
        return (serial.max_size(serial.public_key_sizes(context)),
                lambda data: serial.check_public_key(data, context, what))
    element = sec.arg if sec.tag == GALK else None
    outer = context.key_context_data().parms().poly_modulus_degree() if element is not None else 1
    return (serial.max_size(serial.kswitch_sizes(context, outer)),
            lambda data: serial.check_kswitch_keys(data, context, what, galois_element=element))


def _load_section(f: BinaryIO, sec: _Section, make: Callable[[], T], context: seal.SEALContext | None,
                  what: str) -> T:
    """Checks one payload without SEAL (sizes bounded before it is read), then lets SEAL load it.

    SEAL reads files: the checked, uncompressed object goes through the private scratch directory.
    """
    label = f"key bundle's {what}"
    if sec.length == 0:
        raise InvalidArgument(f"key bundle's {what} section is empty")
    limit, check = _section_check(sec, context, label)
    if sec.length > limit:
        raise InvalidArgument(f"{label} section claims {sec.length:,} bytes; {what} for these parameters take at "
                              f"most {limit:,} bytes")
    f.seek(sec.offset)
    data = f.read(sec.length)
    if len(data) != sec.length:
        raise InvalidArgument(f"key bundle is truncated inside its {what}")
    try:
        plain = check(data)
    except InvalidArgument:
        if context is not None and sec.tag != PARM and serial.looks_like_secret_key(data, context):
            raise InvalidArgument(f"key bundle carries a secret key (in its {what} section); never upload "
                                  f"a secret key: {_KEYGEN_HINT}") from None
        raise
    del data
    path = serial.scratch_dir() / "bundle-section"
    try:
        path.write_bytes(plain)
        del plain
        return serial.load_file(make, path, context, label)
    finally:
        path.unlink(missing_ok=True)


def _empty_parameters() -> seal.EncryptionParameters:
    return seal.EncryptionParameters(seal.SCHEME_TYPE.NONE)


def _parameters(f: BinaryIO, sec: _Section) -> tuple[seal.EncryptionParameters, int, tuple[int, ...]]:
    parms = _load_section(f, sec, _empty_parameters, None, "encryption parameters")
    if parms.scheme() != seal.SCHEME_TYPE.CKKS:
        raise InvalidArgument(f"key bundle is for the {_scheme_name(parms.scheme())} scheme; encinfer needs CKKS")
    n = parms.poly_modulus_degree()
    bits = tuple(m.bit_count() for m in parms.coeff_modulus())
    return parms, n, bits


def _params_context(parms: seal.EncryptionParameters, n: int, bits: tuple[int, ...]) -> seal.SEALContext:
    """The SEALContext for a bundle's parameters, refusing weak or non-standard ones."""
    try:
        check_security(n, bits)
    except InvalidArgument as e:
        raise InvalidArgument(f"key bundle: {e}") from None
    standard = CkksParams(n, bits, 0, 0)
    try:
        primes = _primes(standard)
    except (RuntimeError, ValueError) as e:  # SEAL finds no NTT-friendly primes of these sizes
        raise InvalidArgument(f"key bundle's coefficient modulus {list(bits)} bits is not usable at N={n}: {e}; "
                              f"{_KEYGEN_HINT}") from None
    if [m.value() for m in parms.coeff_modulus()] != primes:
        raise InvalidArgument("key bundle's coefficient modulus primes are not SEAL's CoeffModulus.Create primes "
                              f"for these bit sizes; {_KEYGEN_HINT}")
    context = standard.context()
    if not context.parameters_set():
        raise InvalidArgument(f"key bundle's parameters are invalid: {context.parameters_error_message()}")
    return context


def _primes(params: CkksParams) -> list[int]:
    return [m.value() for m in params.context().key_context_data().parms().coeff_modulus()]


@functools.lru_cache(maxsize=8)
def _steps_by_element(n: int) -> dict[int, int]:
    m, slots = 2 * n, n // 2
    table: dict[int, int] = {}
    g = 1
    for step in range(slots):
        table.setdefault(g, step)
        g = g * 3 % m
    return table


def _rotation_element(step: int, n: int) -> int:
    return pow(3, step % (n // 2), 2 * n)


def _describe(elements: list[int], n: int) -> str:
    table = _steps_by_element(n)
    steps = sorted(table[e] for e in elements if e in table)
    parts = [f"rotation step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}"] if steps else []
    if 2 * n - 1 in elements:
        parts.append("complex conjugation")
    parts += [f"Galois element {e}" for e in sorted(elements) if e not in table and e != 2 * n - 1]
    return " and ".join(parts)


def _open(source: bytes | str | os.PathLike) -> tuple[BinaryIO, int]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return io.BytesIO(data), len(data)
    try:
        f = open(source, "rb")
    except OSError as e:
        raise InvalidArgument(f"cannot read key bundle {os.fspath(source)!r}: {e.strerror}") from None
    return f, os.fstat(f.fileno()).st_size


def inspect_key_bundle(path: str | os.PathLike) -> KeyInfo:
    """Parses a bundle file and validates it.

    Raises encinfer.common.errors.InvalidArgument for: bytes that are not a bundle,
    a non-CKKS scheme (BFV/BGV), anything carrying a secret key (also a TenSEAL
    context serialized with its secret key), parameters under 128-bit security.
    Works from a file so a 50 MB key set is never one bytes object; peak memory
    stays under about 3x the largest single key (its bytes, uncompressed copy, SEAL's
    object). Every section is checked by encinfer.he.serial before SEAL parses it.
    """
    f, size = _open(path)
    with f:
        sections = _sections(f, size)
        parms, n, bits = _parameters(f, sections[0])
        context = _params_context(parms, n, bits)
        has_public = has_relin = False
        elements: list[int] = []
        for sec in sections[1:]:
            if sec.tag == PUBK:
                _load_section(f, sec, seal.PublicKey, context, "public key")
                has_public = True
            elif sec.tag == RELK:
                _load_section(f, sec, seal.RelinKeys, context, "relinearization keys")
                has_relin = True
            elif sec.tag == GALK:
                _check_galois(_load_section(f, sec, seal.GaloisKeys, context, "Galois keys"), sec.arg, n)
                elements.append(sec.arg)
    table = _steps_by_element(n)
    conj = 2 * n - 1
    for e in elements:
        if e != conj and e not in table:
            raise InvalidArgument(f"key bundle has a Galois key for element {e}, which is neither a slot rotation "
                                  f"nor complex conjugation; {_KEYGEN_HINT}")
    return KeyInfo(poly_modulus_degree=n, coeff_modulus_bits=bits, has_public_key=has_public,
                   has_relin_keys=has_relin, galois_steps=tuple(sorted(table[e] for e in elements if e != conj)),
                   has_conjugation_key=conj in elements)


def _check_galois(keys: seal.GaloisKeys, element: int, n: int) -> None:
    if not (0 < element < 2 * n and element % 2 == 1) or keys.size() != 1 or not keys.has_key(element):
        raise InvalidArgument(f"key bundle's Galois key section for element {element} does not hold exactly "
                              "that one key")


def load_key_bundle(data_or_path: bytes | str | os.PathLike, params: CkksParams) -> ServerKeys:
    """Loads a bundle's evaluation keys for a model's parameters (the inference side).

    FailedPrecondition when the bundle is for other parameters (ring degree, primes)
    or lacks a Galois or relinearization key the parameters need: decided from the
    parameters and the section headers, before any key is loaded. InvalidArgument
    when the bytes are not a readable bundle.
    """
    f, size = _open(data_or_path)
    with f:
        sections = _sections(f, size)
        parms, n, bits = _parameters(f, sections[0])
        primes = [m.value() for m in parms.coeff_modulus()]
        if n != params.poly_modulus_degree or primes != _primes(params):
            raise FailedPrecondition(
                f"key parameters (N={n}, moduli {list(bits)}) do not match the model's (N={params.poly_modulus_degree}"
                f", moduli {list(params.coeff_modulus_bits)}); generate keys from GetModelInfo")
        present = {s.arg: s for s in sections if s.tag == GALK}
        missing = [e for e in params.galois_elements() if e not in present]
        if missing:
            raise FailedPrecondition(f"key lacks Galois keys the model needs: {_describe(missing, n)}; generate "
                                     "keys from GetModelInfo")
        relin = next((s for s in sections if s.tag == RELK), None)
        if params.needs_relin_keys and relin is None:
            raise FailedPrecondition("key lacks the relinearization keys the model needs; generate keys from "
                                     "GetModelInfo")
        context = params.context()
        galois: dict[int, seal.GaloisKeys] = {}
        for elt in params.galois_elements():
            keys = _load_section(f, present[elt], seal.GaloisKeys, context, "Galois keys")
            _check_galois(keys, elt, n)
            galois[elt] = keys
        relin_keys = None
        if params.needs_relin_keys:
            assert relin is not None  # checked above
            relin_keys = _load_section(f, relin, seal.RelinKeys, context, "relinearization keys")
    one_key = _key_bytes(params)
    nbytes = one_key * (len(galois) + (1 if relin_keys is not None else 0)) + 4096
    return ServerKeys(params=params, galois_keys=galois, relin_keys=relin_keys, nbytes=nbytes)


def _key_bytes(params: CkksParams) -> int:
    """Memory of one expanded key-switching key: (data primes) x 2 polys x (all primes) x N words."""
    k = len(params.coeff_modulus_bits)
    return max(k - 1, 1) * 2 * k * params.poly_modulus_degree * 8
