"""Coefficient layout: one sample per request, no rotation, answers that carry only the scores.

Encoding (Cheetah, Huang et al., USENIX Security 2022). The sample goes in the
plaintext polynomial's coefficients, x(X) = sum_i x_i X^i (F = n_features), and the
server's plaintext for product g holds T = N // F weight rows, each reversed at its
own offset: w_g(X) = sum_t sum_i W[gT + t, i] X^(t*F + F-1-i). The coefficient of
X^(t*F + F-1) in x(X) * w_g(X) is then exactly the score of row gT + t: a term
x_i W[r', i'] lands at t'F + F-1 + (i - i'), which equals t*F + F-1 only for t' = t
and i = i' (|i - i'| < F); the negacyclic wrap moves degrees >= N to degree - N <=
(T+1)F - 2 - N < F - 1, below the first output (T*F <= N). One plain multiply per
T rows, no Galois key, no relinearization key. MNIST (784 -> 10) at N=4096: T=5, two
products.

Coefficients through SEAL's CKKS encoder: the slots of a plaintext are its polynomial
evaluated at SEAL's roots, slot j = p(zeta^(3^j mod 2N)), zeta = exp(i*pi/N) (SEAL 4
numbers slots by powers of 3; checked by `coefficient_slots`'s test against the
plaintext's own coefficients). `coefficient_slots` computes those values with one
2N-point real FFT, so `encode(coefficient_slots(c), scale)` is the plaintext whose
coefficients are round(c * scale): exact for the integer weights (encoded at scale 1).

Parameters: one 60-bit prime (no key switching, so no special prime; 128-bit security
allows 109 bits at N=4096). Inputs at 2^in and weights at 2^w with in + w = the
product scale, the rest of the prime after the score bound, a sign and a margin bit.

Answer ("an answer reveals only the scores"). After the multiplies, the server adds a
fresh encryption of zero under the client's public key to each product (prepared
ahead by `CoeffKeys`, each used once), adds the bias and optional flooding noise at
the output coefficients of c0 (exact integers mod q, out of NTT form), and drops
every other c0 coefficient. c1 is kept in full (the client needs it to decrypt), and
after re-randomization it is c1_in * w + (a*u + e2) for a fresh ternary u: an RLWE
sample that looks uniform. Both are then switched from q to 2^answer_bits (the
rounding adds ~16 units at the new scale, far below the encryption noise): the
smaller modulus costs nothing in precision and shrinks each coefficient to 5 bytes.
The client decrypts the outputs itself: c0[o] + sum_j c1[j] * s[o - j] (negacyclic)
mod 2^answer_bits, exact in int64 with the ternary secret.

Wire format of an answer (little endian), checked strictly by `unpack_answer`:

    magic  b"EIC1"                4 bytes
    answer_bits                   u8 (a multiple of 8, at most 48)
    reserved                      u8, 0
    n_products                    u16
    n_outputs                     u16
    reserved                      u16, 0
    poly_modulus_degree N         u32
    c0 at the outputs             n_outputs values, answer_bits/8 bytes each, in output order
    c1 of each product            n_products x N values, answer_bits/8 bytes each

MNIST: 16 + (10 + 2 * 4096) * 5 = 41,026 bytes down, against 33 KB up.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import numpy as np
import tenseal.sealapi as seal

from encinfer.common.errors import DataLoss, EncinferError, FailedPrecondition, InvalidArgument
from encinfer.he import serial
from encinfer.he.memory import CiphertextMemory
from encinfer.he.params import CkksParams, check_keys_fit, checked_sample, finite_interval, linear_model

if TYPE_CHECKING:  # pragma: no cover
    from encinfer.he.secret import SecretKeys

PRIME_BITS = 60
RING_DEGREES = (4096, 8192, 16384, 32768)
MAGIC = b"EIC1"
_HEADER = struct.Struct("<4sBBHHHI")
_FRESH_SIZE = 2
# The answer's rounding noise (~2^4 units at the answer scale) stays this many bits below one
# unit of score: 2^-28 ~ 4e-9, far below the encryption noise (~1e-7 of a score).
_ANSWER_PRECISION_BITS = 28
_MAX_ANSWER_BITS = 48  # c1 * s summed over N <= 32768 terms stays exact in int64
# Encryptions of zero kept ready per key (two per MNIST answer).
POOL_SIZE = 8


# ---------------------------------------------------------------- encoding

def _slot_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """For SEAL's slot j: the rfft bin holding p(zeta^(3^j)), and whether it is conjugated."""
    m, e = 2 * n, np.empty(n // 2, dtype=np.int64)
    g = 1
    for j in range(n // 2):
        e[j] = g
        g = g * 3 % m
    return np.where(e <= n, e, m - e), e <= n


_INDICES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def coefficient_slots(coeffs: np.ndarray, n: int) -> np.ndarray:
    """The N/2 slot values whose CKKS encoding has these (real) coefficients.

    p(zeta^k) = sum_i c_i exp(i*pi*k*i/N) is the conjugate of rfft(c, 2N)[k] for k <= N
    and rfft(c, 2N)[2N - k] above (c is real).
    """
    if n not in _INDICES:
        _INDICES[n] = _slot_indices(n)
    bins, conj = _INDICES[n]
    r = np.fft.rfft(np.asarray(coeffs, dtype=np.float64), n=2 * n)[bins]
    return np.where(conj, np.conj(r), r)


def _encode(encoder: seal.CKKSEncoder, coeffs: np.ndarray, n: int, parms_id, scale: float) -> seal.Plaintext:
    pt = seal.Plaintext()
    encoder.encode(coefficient_slots(coeffs, n).tolist(), parms_id, scale, pt)
    return pt


# ---------------------------------------------------------------- parameters and layout

def _answer_bits(product_bits: int) -> int:
    """Bits of the modulus the answer is switched to.

    After the switch a score unit is 2^(product_bits + bits - 60) and the rounding adds ~2^4
    units, so bits >= 64 + _ANSWER_PRECISION_BITS - product_bits keeps it below 2^-precision.
    """
    need = PRIME_BITS + 4 + _ANSWER_PRECISION_BITS - product_bits
    return min(_MAX_ANSWER_BITS, max(16, 8 * math.ceil(need / 8)))


def choose_coeff_params(n_features: int, score_bound: float) -> CkksParams:
    """The smallest ring holding one sample's coefficients; one 60-bit prime; scales from the score bound.

    The product scale is the prime less the score's bits, a sign bit and a margin bit, split evenly
    between inputs and weights (their rounding errors then cost about the same).
    """
    if n_features < 1:
        raise InvalidArgument("a coefficient layout needs at least one feature")
    n = next((d for d in RING_DEGREES if n_features <= d), None)
    if n is None:
        raise InvalidArgument(f"{n_features} features exceed the coefficient layout's limit ({RING_DEGREES[-1]}); "
                              "use the batch layout")
    if not math.isfinite(score_bound) or score_bound < 0:
        raise InvalidArgument(f"score bound {score_bound!r} is not a finite non-negative number")
    product = PRIME_BITS - 2 - max(0, math.ceil(math.log2(max(score_bound, 1.0))))
    if product < 24:
        raise InvalidArgument(f"scores up to {score_bound:.3g} leave only {product} bits of scale in a "
                              f"{PRIME_BITS}-bit prime (at least 24 needed); rescale the model's inputs or weights")
    return CkksParams(poly_modulus_degree=n, coeff_modulus_bits=(PRIME_BITS,), input_scale_bits=(product + 1) // 2,
                      output_scale_bits=product, needs_public_key=True)


@dataclass(frozen=True)
class CoeffLayout:
    """What a client needs to encrypt one sample and read the answer (GetModelInfo's coefficient entry).

    rows_per_product: T, weight rows per plaintext (N // n_features); answer_bits: the
    modulus 2^answer_bits the answer's coefficients are given in; input_range: the values
    each feature may take (the server sized the scales for it).
    """

    params: CkksParams
    n_features: int
    n_outputs: int
    rows_per_product: int
    answer_bits: int
    input_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_range", tuple(float(v) for v in self.input_range))
        p, n = self.params, self.params.poly_modulus_degree
        if self.n_features < 1 or self.n_outputs < 1:
            raise InvalidArgument("a coefficient layout needs at least one feature and one output")
        if self.n_features > n or self.rows_per_product != n // self.n_features:
            raise InvalidArgument(f"coefficient layout: {self.n_features} features at N={n} give "
                                  f"{n // max(self.n_features, 1)} rows per product, not {self.rows_per_product}")
        if len(p.coeff_modulus_bits) != 1 or p.galois_steps or p.needs_conjugation_key or p.needs_relin_keys:
            raise InvalidArgument("coefficient layout parameters are one prime and no evaluation keys")
        if not p.needs_public_key:
            raise InvalidArgument("coefficient layout parameters need the client's public key")
        if self.answer_bits % 8 or not 8 <= self.answer_bits <= _MAX_ANSWER_BITS:
            raise InvalidArgument(f"answer_bits {self.answer_bits} must be a multiple of 8 up to {_MAX_ANSWER_BITS}")
        if not 0 < p.input_scale_bits < p.output_scale_bits < p.coeff_modulus_bits[0]:
            raise InvalidArgument("coefficient parameters need 0 < input_scale_bits < output_scale_bits < prime")
        lo, hi = self.input_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise InvalidArgument(f"input_range {self.input_range!r} is not a finite interval")

    @property
    def n_products(self) -> int:
        return -(-self.n_outputs // self.rows_per_product)

    def output_positions(self) -> np.ndarray:
        """(product, coefficient) of each output, in output order."""
        r = np.arange(self.n_outputs)
        t = r % self.rows_per_product
        return np.stack([r // self.rows_per_product, t * self.n_features + self.n_features - 1], axis=1)

    def answer_size(self) -> int:
        return _HEADER.size + (self.n_outputs + self.n_products * self.params.poly_modulus_degree) * \
            (self.answer_bits // 8)

    def to_dict(self) -> dict:
        return {"params": self.params.to_json(), "n_features": self.n_features, "n_outputs": self.n_outputs,
                "rows_per_product": self.rows_per_product, "answer_bits": self.answer_bits,
                "input_range": list(self.input_range)}

    @classmethod
    def from_dict(cls, d: dict) -> CoeffLayout:
        try:
            params = d["params"]
            return cls(params=params if isinstance(params, CkksParams) else CkksParams.from_json(params),
                       n_features=int(d["n_features"]), n_outputs=int(d["n_outputs"]),
                       rows_per_product=int(d["rows_per_product"]), answer_bits=int(d["answer_bits"]),
                       input_range=cast("tuple[float, float]",
                                        tuple(float(v) for v in d.get("input_range", (0.0, 1.0)))))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"not a coefficient layout description ({e!r})") from None


def score_bound(weights: np.ndarray, bias: np.ndarray, input_range: tuple[float, float]) -> float:
    lo, hi = input_range
    top = bias + np.maximum(weights * lo, weights * hi).sum(axis=1)
    bottom = bias + np.minimum(weights * lo, weights * hi).sum(axis=1)
    return float(max(np.max(np.abs(top)), np.max(np.abs(bottom))))


# ---------------------------------------------------------------- answer wire format

def _modulus(params: CkksParams) -> int:
    return params.context().first_context_data().parms().coeff_modulus()[0].value()


def switch_modulus(values: np.ndarray, q: int, bits: int) -> np.ndarray:
    """round(v * 2^bits / q) mod 2^bits, for v in [0, q) (float64: the rounding error is < 1 unit)."""
    scaled = np.rint(values.astype(np.float64) * (2.0 ** bits / q)).astype(np.uint64)
    return scaled & np.uint64((1 << bits) - 1)


def pack_answer(layout: CoeffLayout, c0_outputs: np.ndarray, c1: np.ndarray) -> bytes:
    return _pack_words(layout, np.concatenate([c0_outputs.ravel(), c1.ravel()]))


def _pack_words(layout: CoeffLayout, words: np.ndarray) -> bytes:
    """Header + the words (c0 outputs, then every c1), answer_bits/8 little-endian bytes each."""
    width = layout.answer_bits // 8
    header = _HEADER.pack(MAGIC, layout.answer_bits, 0, layout.n_products, layout.n_outputs, 0,
                          layout.params.poly_modulus_degree)
    words = np.ascontiguousarray(words, dtype="<u8")
    return header + words.view(np.uint8).reshape(-1, 8)[:, :width].tobytes()


def unpack_answer(data: bytes, layout: CoeffLayout) -> tuple[np.ndarray, np.ndarray]:
    """(c0 at the outputs (n_outputs,), c1 (n_products, N)) as uint64; InvalidArgument unless exactly an answer."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument("the answer must be bytes")
    data = bytes(data)
    expected = layout.answer_size()
    if len(data) < _HEADER.size or data[:4] != MAGIC:
        raise InvalidArgument("the answer is not a coefficient-layout answer (bad magic)")
    magic, bits, r0, products, outputs, r1, n = _HEADER.unpack_from(data)
    want = (layout.answer_bits, 0, layout.n_products, layout.n_outputs, 0, layout.params.poly_modulus_degree)
    if (bits, r0, products, outputs, r1, n) != want:
        raise InvalidArgument(f"the answer's header (bits {bits}, {products} products, {outputs} outputs, N={n}) "
                              f"does not match the layout (bits {want[0]}, {want[2]} products, {want[3]} outputs, "
                              f"N={want[5]})")
    if len(data) != expected:
        raise InvalidArgument(f"the answer has {len(data)} bytes; this layout's answers have {expected}")
    width = bits // 8
    raw = np.zeros((len(data) - _HEADER.size) // width * 8, dtype=np.uint8).reshape(-1, 8)
    raw[:, :width] = np.frombuffer(data, dtype=np.uint8, offset=_HEADER.size).reshape(-1, width)
    words = raw.view("<u8").ravel().astype(np.uint64)
    return words[:outputs], words[outputs:].reshape(products, n)


# ---------------------------------------------------------------- the public key's common polynomial

# The public key is (b, a) = (-a*s + e, a). Its `a` masks every answer's c1 (c1_in * w + a*u + e2),
# so it must not be the client's choice: with a = 0, or a with a known short multiple (an NTRU-like
# a looks uniform), a crafted input would read the weights out of c1 in one query. Every key uses
# one public `a` instead, expanded from a fixed string with SHAKE-256 (a common random string, as
# RLWE schemes with a shared public polynomial use it); the server refuses any other.
_COMMON_A_DOMAIN = b"encinfer coefficient layout: the public key's polynomial a (NTT form), v1"


@functools.lru_cache(maxsize=4)
def _common_a(n: int, q: int) -> np.ndarray:
    """Uniform words mod q, read as a polynomial in NTT form (as SEAL samples a): rejection sampling."""
    stream = hashlib.shake_256(_COMMON_A_DOMAIN + struct.pack("<IQ", n, q)).digest(8 * 2 * n)
    words = np.frombuffer(stream, dtype="<u8") >> np.uint64(64 - q.bit_length())
    accepted = words[words < q][:n]
    if len(accepted) < n:  # probability below 2^-1000 for SEAL's primes
        raise EncinferError("could not expand the common polynomial")
    accepted = accepted.astype(np.uint64)
    accepted.setflags(write=False)
    return accepted


def _key_primes(params: CkksParams) -> list[int]:
    return [m.value() for m in params.context().key_context_data().parms().coeff_modulus()]


def common_a(params: CkksParams) -> np.ndarray:
    """The common `a` at the key level: N words per prime, prime by prime (SEAL's layout)."""
    return np.concatenate([_common_a(params.poly_modulus_degree, q) for q in _key_primes(params)])


def make_public_key(params: CkksParams, secret_key: seal.SecretKey) -> bytes:
    """The serialized public key (-a*s + e, a) with the common `a` (SecretKeys.public_bundle calls it).

    SEAL makes (-a'*s + e, a') for its own random a'; in NTT form everything is pointwise, so
    b = b' - (a - a') * s, coefficient by coefficient mod q (exact Python integers, once per key).
    """
    context, n, primes = params.context(), params.poly_modulus_degree, _key_primes(params)
    public_key = seal.PublicKey()
    seal.KeyGenerator(context, secret_key).create_public_key(public_key)
    size = n * len(primes)
    words = _PublicKeyMemory.view(public_key, 2 * size)
    plain = secret_key.data()
    a = common_a(params)
    b = [(int(words[i]) - (int(a[i]) - int(words[size + i])) * plain.data(i)) % primes[i // n] for i in range(size)]
    words[:size] = np.array(b, dtype=np.uint64)
    words[size:] = a
    return serial.dump(public_key)


class _PublicKeyMemory:
    """A public key's words (2 polynomials x key-level primes x N), through its ciphertext."""

    @staticmethod
    def view(public_key: seal.PublicKey, words: int) -> np.ndarray:
        return CiphertextMemory.view(public_key.data(), words)


def _check_common_a(public_key: seal.PublicKey, params: CkksParams) -> None:
    data = public_key.data()
    size = params.poly_modulus_degree * len(_key_primes(params))
    if data.size() != 2 or data.coeff_modulus_size() != size // params.poly_modulus_degree or \
            not data.is_ntt_form() or \
            not np.array_equal(_PublicKeyMemory.view(public_key, 2 * size)[size:], common_a(params)):
        raise InvalidArgument("the bundle's public key was not made with the common polynomial a that the "
                              "coefficient layout requires (see encinfer.he.coeff); generate keys from GetModelInfo "
                              "with encinfer's keygen")


# ---------------------------------------------------------------- server side

@dataclass(eq=False)
class CoeffKeys:
    """A client's public key and a pool of encryptions of zero under it, each used once.

    `zero()` takes one from the pool (making one on the spot only when the pool is
    empty: the first request of a key id); `refill()` is called by the worker when it
    is idle, so the request path normally only pops.
    """

    params: CkksParams
    public_key: seal.PublicKey
    pool_size: int = POOL_SIZE
    _pool: collections.deque = field(default_factory=collections.deque, init=False, repr=False)

    def __post_init__(self) -> None:
        self._encryptor = seal.Encryptor(self.params.context(), self.public_key)

    @property
    def nbytes(self) -> int:
        one = _FRESH_SIZE * self.params.poly_modulus_degree * 8
        return one * (1 + self.pool_size) + 4096

    def _make(self) -> seal.Ciphertext:
        ct = seal.Ciphertext(self.params.context())
        self._encryptor.encrypt_zero(ct)
        return ct

    def zero(self) -> seal.Ciphertext:
        return self._pool.popleft() if self._pool else self._make()

    def refill(self, limit: int = 1) -> bool:
        """Makes up to `limit` encryptions of zero; False when the pool was already full."""
        made = 0
        while len(self._pool) < self.pool_size and made < limit:
            self._pool.append(self._make())
            made += 1
        return made > 0

    def pooled(self) -> int:
        return len(self._pool)


def load_coeff_keys(data: bytes, params: CkksParams, pool_size: int = POOL_SIZE) -> CoeffKeys:
    """The bundle's public key (for the coefficient and batch layouts' re-randomization);
    FailedPrecondition when it has none or other parameters."""
    from encinfer.he import keys as bundles

    f, size = bundles._open(data)
    with f:
        sections = bundles._sections(f, size)
        parms, n, bits = bundles._parameters(f, sections[0])
        if n != params.poly_modulus_degree or [m.value() for m in parms.coeff_modulus()] != bundles._primes(params):
            raise FailedPrecondition(
                f"key parameters (N={n}, moduli {list(bits)}) do not match the model's (N={params.poly_modulus_degree}"
                f", moduli {list(params.coeff_modulus_bits)}); generate keys from GetModelInfo")
        section = next((s for s in sections if s.tag == bundles.PUBK), None)
        if section is None:
            raise FailedPrecondition("key lacks the public key this layout needs to re-randomize answers; "
                                     "generate keys from GetModelInfo")
        public_key = bundles._load_section(f, section, seal.PublicKey, params.context(), "public key")
    if public_key.parms_id() != params.context().key_parms_id():
        raise InvalidArgument("the bundle's public key is not at the parameters' key level")
    _check_common_a(public_key, params)
    return CoeffKeys(params=params, public_key=public_key, pool_size=pool_size)


class CoeffModel:
    """A linear model (scores = W x + b) ready for coefficient-layout inference.

    Pre-encodes one plaintext per T rows (integer weights at 2^w, scale 1). `evaluate`
    is then, per product: one plain multiply, one addition of an encryption of zero,
    one inverse NTT (2 polynomials), and numpy on the outputs.
    flood_bits: uniform noise in [-2^flood_bits, 2^flood_bits] (units of the product
    scale 2^output_scale_bits) added to each output; 0 adds none (see docs/security.md).
    """

    def __init__(self, weights: np.ndarray, bias: np.ndarray | float, params: CkksParams | None = None, *,
                 input_range: tuple[float, float] = (0.0, 1.0), flood_bits: int = 0) -> None:
        W, b = linear_model(weights, bias)
        lo, hi = finite_interval(input_range)
        m, d = W.shape
        bound = score_bound(W, b, (lo, hi))
        if params is None:
            params = choose_coeff_params(d, bound)
        if bound * 2.0 ** params.output_scale_bits >= 2.0 ** (params.coeff_modulus_bits[0] - 2):
            raise InvalidArgument(f"scores up to {bound:.3g} overflow these parameters at output scale "
                                  f"2^{params.output_scale_bits}")
        if not 0 <= flood_bits < params.output_scale_bits:
            raise InvalidArgument(f"flood_bits {flood_bits} must be in [0, {params.output_scale_bits})")
        n = params.poly_modulus_degree
        self.layout = CoeffLayout(params=params, n_features=d, n_outputs=m, rows_per_product=n // d,
                                  answer_bits=_answer_bits(params.output_scale_bits), input_range=(lo, hi))
        if not CiphertextMemory.supported(params):
            raise FailedPrecondition("the coefficient layout needs direct access to SEAL ciphertexts, which this "
                                     "tenseal build does not allow")
        self.params, self.flood_bits = params, flood_bits
        self._context = params.context()
        self._parms_id = self._context.first_parms_id()
        self._evaluator = seal.Evaluator(self._context)
        self._q = _modulus(params)
        weight_bits = params.output_scale_bits - params.input_scale_bits
        self.weights_int = np.rint(W * 2.0 ** weight_bits)  # what is computed: rounded weights
        encoder = seal.CKKSEncoder(self._context)
        positions = self.layout.output_positions()
        self._plains = []
        for g in range(self.layout.n_products):
            coeffs = np.zeros(n)
            for r in np.flatnonzero(positions[:, 0] == g):
                t = r % self.layout.rows_per_product
                coeffs[t * d: (t + 1) * d] = self.weights_int[r, ::-1]
            self._plains.append(_encode(encoder, coeffs, n, self._parms_id, 1.0))
        self._positions = positions
        # Per product: (output rows, their coefficients).
        self._outputs_of = [(np.flatnonzero(positions[:, 0] == g), positions[positions[:, 0] == g, 1])
                            for g in range(self.layout.n_products)]
        bias_int = np.rint(b * 2.0 ** params.output_scale_bits).astype(np.int64)
        self._bias = (bias_int % self._q).astype(np.uint64)  # exact: |bias| * 2^out < q / 4
        self._max_input_bytes = _FRESH_SIZE * n * 8 + 4096

    def _input(self, data: bytes) -> seal.Ciphertext:
        """The client's ciphertext, refused unless it is a fresh input for this model's parameters."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument("ciphertext must be bytes")
        if not data:
            raise InvalidArgument("ciphertext is empty; send one encrypted sample (coefficient layout)")
        if len(data) > self._max_input_bytes:
            raise InvalidArgument(f"ciphertext of {len(data)} bytes is larger than any fresh ciphertext for these "
                                  f"parameters ({self._max_input_bytes} bytes at most)")
        # Checked byte by byte before SEAL parses it (encinfer.he.serial), as in every layout.
        ct = serial.load_ciphertext(bytes(data), self._context, parms_id=self._parms_id)
        return serial.check_fresh_input(ct, self._context, self._parms_id, self.params.input_scale_bits)

    def _check_keys(self, keys: CoeffKeys) -> None:
        p, q = keys.params, self.params
        if (p.poly_modulus_degree, p.coeff_modulus_bits) != (q.poly_modulus_degree, q.coeff_modulus_bits):
            raise FailedPrecondition("these keys were loaded for other parameters than this model's coefficient "
                                     "layout; load them with load_coeff_keys(data, model.layout.params)")

    def products(self, ciphertext: bytes) -> list[seal.Ciphertext]:
        """The plain products x * w_g, not re-randomized (tests and measurements only)."""
        ct = self._input(ciphertext)
        out = []
        for plain in self._plains:
            product = seal.Ciphertext()
            self._evaluator.multiply_plain(ct, plain, product)
            out.append(product)
        return out

    def evaluate(self, keys: CoeffKeys, ciphertext: bytes) -> bytes:
        """The answer (see the module's wire format) for one encrypted sample."""
        self._check_keys(keys)
        ct = self._input(ciphertext)
        ev, n, lay = self._evaluator, self.params.poly_modulus_degree, self.layout
        m = lay.n_outputs
        out = np.empty(m + lay.n_products * n, dtype=np.uint64)  # the answer's words, in wire order
        try:
            for g, plain in enumerate(self._plains):
                product = seal.Ciphertext()
                ev.multiply_plain(ct, plain, product)
                zero = keys.zero()
                zero.scale = product.scale  # an encryption of zero has no scale of its own
                ev.add_inplace(product, zero)
                ev.transform_from_ntt_inplace(product)
                words = CiphertextMemory.view(product, 2 * n)
                rows, coefficients = self._outputs_of[g]
                out[rows] = words[coefficients]
                out[m + g * n: m + (g + 1) * n] = words[n:]
        except (RuntimeError, ValueError, TypeError, IndexError) as e:  # validated input: a bug, not the caller's
            raise EncinferError(f"coefficient evaluation failed: {e}") from e
        q = np.uint64(self._q)
        out[:m] = (out[:m] + self._bias) % q
        if self.flood_bits:
            out[:m] = (out[:m] + self._flood(m)) % q
        return _pack_words(lay, switch_modulus(out, self._q, lay.answer_bits))

    def _flood(self, count: int) -> np.ndarray:
        """Uniform noise in [-2^flood_bits, 2^flood_bits), mod q, from the OS's CSPRNG."""
        raw = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) >> np.uint64(63 - self.flood_bits)
        signed = raw.astype(np.int64) - (1 << self.flood_bits)
        return (signed % self._q).astype(np.uint64)


# ---------------------------------------------------------------- client side

def secret_coefficients(context: seal.SEALContext, secret_key: seal.SecretKey) -> np.ndarray:
    """The secret key's coefficients in {-1, 0, 1} (SEAL keeps it in NTT form)."""
    data = context.key_context_data()
    n = data.parms().poly_modulus_degree()
    q = data.parms().coeff_modulus()[0].value()
    plain = secret_key.data()
    ct = seal.Ciphertext(context)
    seal.Encryptor(context, secret_key).encrypt_zero_symmetric(ct)
    words = CiphertextMemory.view(ct, 2 * n)
    words[:n] = [plain.data(i) for i in range(n)]
    words[n:] = 1  # any non-zero c1: SEAL refuses to transform a transparent ciphertext
    seal.Evaluator(context).transform_from_ntt_inplace(ct)
    c = np.array(CiphertextMemory.view(ct, 2 * n)[:n])
    s = np.where(c == q - 1, -1, c.astype(np.int64))
    if not np.all(np.abs(s) <= 1):
        raise EncinferError("the secret key is not ternary")
    return s.astype(np.int8)


def encrypt_coeff(secret: SecretKeys, x: Sequence[float] | np.ndarray, layout: CoeffLayout) -> bytes:
    """One sample -> one seeded ciphertext for the coefficient layout.

    >>> ct = encrypt_coeff(secret, image.ravel() / 255.0, layout)   # doctest: +SKIP
    """
    v = checked_sample(secret.params, layout.params, x, layout.n_features, layout.input_range)
    n = layout.params.poly_modulus_degree
    try:
        pt = _encode(secret.encoder, v, n, secret.context.first_parms_id(), 2.0 ** layout.params.input_scale_bits)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InvalidArgument(f"cannot encode this input: {e}") from None
    return secret.encrypt_symmetric(pt)


def _decrypt_rows(secret: SecretKeys, layout: CoeffLayout) -> np.ndarray:
    """Row o: the signed, rotated secret with (c1 * s)[pos_o] = row_o . c1 (negacyclic); kept on the key."""
    cache = secret.__dict__.setdefault("_coeff_rows", {})
    key = (layout.n_features, layout.n_outputs)
    rows = cache.get(key)
    if rows is None:
        s = secret.coefficients().astype(np.int64)
        n = len(s)
        j = np.arange(n)
        pos = layout.output_positions()[:, 1]
        rows = cache[key] = np.where(j[None, :] <= pos[:, None], 1, -1) * s[(pos[:, None] - j[None, :]) % n]
    return rows


def decrypt_coeff(secret: SecretKeys, answer: bytes, layout: CoeffLayout) -> np.ndarray:
    """The model's scores (n_outputs,) from the server's answer.

    InvalidArgument when the bytes are not an answer for this layout; DataLoss when they
    decrypt to values no input in range can produce (the input was encrypted under
    another secret key, or was out of range): a random answer passes with
    probability 2^-n_outputs.
    """
    check_keys_fit(secret.params, layout.params)
    c0, c1 = unpack_answer(answer, layout)
    bits = layout.answer_bits
    rows = _decrypt_rows(secret, layout)
    products = layout.output_positions()[:, 0]
    dots = np.einsum("oj,oj->o", rows, c1[products].astype(np.int64))
    mask = (1 << bits) - 1
    v = (c0.astype(np.int64) + dots) & mask
    v = np.where(v >= 1 << (bits - 1), v - (1 << bits), v)
    # One unit of the answer is q / 2^bits units of the product scale.
    scores = v * (_prime(layout.params) / 2.0 ** bits) / 2.0 ** layout.params.output_scale_bits
    capacity = 2.0 ** (layout.params.coeff_modulus_bits[0] - 2 - layout.params.output_scale_bits)
    if not np.all(np.abs(scores) <= capacity):
        raise DataLoss("the decrypted answer is out of range: it was not computed from a ciphertext of this secret "
                       "key for this model, or an input was outside the model's input range")
    return scores


def _prime(params: CkksParams) -> float:
    return float(_modulus(params))
