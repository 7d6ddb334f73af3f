"""Latency layout: one sample per ciphertext, every output back in ONE ciphertext.

Slots (S = N/2 of them) and packing. The features sent are all of them, or only
`feature_indices` when the others have all-zero weights AND dropping them saves a
diagonal. With complex packing they pair up, packed column c = x[2c] + i*x[2c+1];
without it, packed column c = x[c]. Let
M = the smallest power of two >= n_outputs (the row period) and k = the number of
diagonals (block_size = k*S/M >= packed columns). The client puts

    packed column ((s mod M) mod k) + k*(s div M)   in slot s   (zero past the input)

a permuted replication of the input (each column in about M/k slots).

Server (the hybrid diagonal method, GAZELLE, with every rotation after the multiply):
P_i = D_i * ct for i < k (one plain multiply each, no rescale), where D_i's slot s
carries weight[(s - i) mod M][column(s)]; Horner with the step-1 key,
z = P_0 + rot1(P_1 + rot1(P_2 + ...)), brings each term to a slot whose residue mod M
is its output row; the fold z += rot(z, M), rot(z, 2M), ..., rot(z, S/2) sums each
residue class; with complex packing z += conj(z) keeps 2*Re (weights are stored as
conj(w)/2, so Re((x0 + i x1)(w0 - i w1)) = x0 w0 + x1 w1) and hides the imaginary
parts, which would leak other linear forms of the weights. Adding the bias leaves
slot j = score[j mod M] (zero for j mod M >= n_outputs), at the last prime.

Rotations: (k - 1) + log2(S/M) (+1 conjugation): MNIST (784 -> 10) at N=4096 has
M=16 and k=4 (392 packed columns), or k=3 when at most 768 pixels have weights
(the default model: 657): 2 + 7 + 1 = 10 key switches, the fewest that can sum
~330 complex products and take the real part; 9 Galois keys (steps 1, 16..1024,
conjugation), 0.56 MB seeded.
Why rotate after the multiply: with one data prime the input sits at 2^~25 and a
key switch adds noise ~2^15; after the multiply the product sits at 2^~49.

Limits: packed columns <= S and n_outputs <= S (N up to 32768: 65536 features with
complex packing). Cost grows with k = ceil(packed * M / S): many outputs AND many
features (k large) mean k - 1 extra rotations.

A ciphertext encrypted under another secret key cannot be detected by the server:
the client then decrypts garbage, which `decrypt_latency` detects (every replica of
an output must agree and padding rows must be ~0) and reports as DataLoss.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import tenseal.sealapi as seal

from encinfer.common.errors import DataLoss, EncinferError, FailedPrecondition, InvalidArgument
from encinfer.he import serial
from encinfer.he.params import CkksParams, check_keys_fit, checked_sample, finite_interval, linear_model, score_bound

if TYPE_CHECKING:  # pragma: no cover
    from encinfer.he.coeff import CoeffKeys
    from encinfer.he.keys import ServerKeys
    from encinfer.he.secret import SecretKeys

# Ring degree -> (primes: one data prime + the special prime for key switching).
# One data prime: nothing is ever rescaled; the special prime is as large as 128-bit
# security allows at N=4096 (58 + 51 = 109 bits).
_PRIMES = {4096: (58, 51), 8192: (60, 60), 16384: (60, 60), 32768: (60, 60)}
# Decrypted slots that should agree (replicas) or be zero (padding) may differ by at
# most this fraction of the result's capacity 2^(q-1-output_scale_bits); honest
# noise is ~2^-20 of it, a wrong key gives values ~2^6 times the capacity.
_CONSISTENCY = 2.0 ** -12
_FRESH_SIZE = 2


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _packed(n_features: int, complex_packing: bool) -> int:
    return (n_features + 1) // 2 if complex_packing else n_features


def plan(n_packed: int, n_outputs: int, slots: int) -> tuple[int, int]:
    """(row period M, diagonals k) for a layout; InvalidArgument when it cannot fit."""
    if n_packed > slots or n_outputs > slots:
        raise InvalidArgument(f"{n_packed} packed features and {n_outputs} outputs do not fit {slots} slots")
    m = _next_pow2(n_outputs)
    k = max(1, math.ceil(n_packed * m / slots))
    if n_outputs + k - 1 > m and m % k:
        k = _next_pow2(k)  # rows wrap around the period: column groups must tile it
    return m, k


def rotation_steps(row_period: int, diagonals: int, slots: int) -> tuple[int, ...]:
    steps = {1} if diagonals > 1 else set()
    step = row_period
    while step < slots:
        steps.add(step)
        step *= 2
    return tuple(sorted(steps))


def fold_steps(row_period: int, slots: int) -> list[int]:
    steps, step = [], slots // 2
    while step >= row_period:
        steps.append(step)
        step //= 2
    return steps


def choose_latency_params(n_features: int, n_outputs: int, *, score_bound: float = 100.0,
                          complex_packing: bool = True) -> CkksParams:
    """The smallest ring that holds the input, one data prime, scales from the score bound.

    score_bound: the largest |score| any valid input can produce (LatencyModel
    computes it from the weights and the input range). The product scale is what the
    data prime leaves after the score's bits, a sign bit and a margin bit; it is split
    evenly between the input and the weights, whose errors (fresh noise times ||w||,
    encoding rounding times ||x||) are then about equal (measured on MNIST: moving
    2 bits either way doubles the error). The default MNIST model (C=0.1): inputs at
    2^26, weights at 2^25, max score error 3e-5; with C=1 (|score| < 84): 2^25 and
    2^24, 1.2e-4.
    """
    if n_features < 1 or n_outputs < 1:
        raise InvalidArgument("a latency layout needs at least one feature and one output")
    packed = _packed(n_features, complex_packing)
    for n, primes in _PRIMES.items():  # noqa: B007 - the loop picks n and primes, read after it
        if packed <= n // 2 and n_outputs <= n // 2:
            break
    else:
        top = max(_PRIMES) // 2
        raise InvalidArgument(f"{n_features} features / {n_outputs} outputs exceed the latency layout's limit "
                              f"({top * (2 if complex_packing else 1)} features, {top} outputs); use the batch layout")
    row_period, diagonals = plan(packed, n_outputs, n // 2)
    input_bits, output_bits = _scales(primes[0], score_bound)
    return CkksParams(poly_modulus_degree=n, coeff_modulus_bits=primes, input_scale_bits=input_bits,
                      output_scale_bits=output_bits, galois_steps=rotation_steps(row_period, diagonals, n // 2),
                      needs_conjugation_key=complex_packing, complex_packing=complex_packing,
                      needs_public_key=True)  # answers are re-randomized (docs/security.md)


def _scales(prime_bits: int, score_bound: float) -> tuple[int, int]:
    if not math.isfinite(score_bound) or score_bound < 0:
        raise InvalidArgument(f"score bound {score_bound!r} is not a finite non-negative number")
    product = prime_bits - 2 - max(0, math.ceil(math.log2(max(score_bound, 1.0))))
    if product < 24:
        raise InvalidArgument(f"scores up to {score_bound:.3g} leave only {product} bits of scale in a "
                              f"{prime_bits}-bit prime (at least 24 needed); rescale the model's inputs or weights")
    input_bits = (product + 1) // 2
    return input_bits, product


# ---------------------------------------------------------------- layout

@dataclass(frozen=True)
class LatencyLayout:
    """What a client needs to encrypt one sample and read the answer (GetModelInfo's latency entry).

    block_size: packed input positions (k*S/M); output_slots: slot of output j in the
    result (j; every slot j + t*M holds a replica). input_range: the values each
    feature may take (the server sized the scales for it). feature_indices: the
    features that are sent, when the model's other features have all-zero weights
    and dropping them saves a diagonal (empty: all features). Leaving them out when
    the server lists them is caught: the block size then does not match.
    """

    params: CkksParams
    n_features: int
    n_outputs: int
    block_size: int
    output_slots: tuple[int, ...]
    input_range: tuple[float, float] = (0.0, 1.0)
    feature_indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_slots", tuple(int(s) for s in self.output_slots))
        object.__setattr__(self, "input_range", tuple(float(v) for v in self.input_range))
        object.__setattr__(self, "feature_indices", tuple(int(i) for i in self.feature_indices))
        p, slots, idx = self.params, self.params.slots, self.feature_indices
        if self.n_features < 1 or self.n_outputs < 1:
            raise InvalidArgument("a latency layout needs at least one feature and one output")
        if idx and (any(not 0 <= i < self.n_features for i in idx)
                    or any(a >= b for a, b in zip(idx, idx[1:], strict=False))):
            raise InvalidArgument(f"feature_indices must be increasing and within 0..{self.n_features - 1}")
        m, k = plan(self.packed_features, self.n_outputs, slots)
        if self.block_size != k * slots // m:
            raise InvalidArgument(
                f"latency block_size is {self.block_size}; {len(self.used_features)} features sent and "
                f"{self.n_outputs} outputs at N={p.poly_modulus_degree} give {k * slots // m} (pass the "
                "layout's feature_indices, if the server lists any)")
        everything = _packed(self.n_features, p.complex_packing)
        if idx and everything <= slots and k >= plan(everything, self.n_outputs, slots)[1]:
            raise InvalidArgument("latency feature_indices are given only when dropping features saves a diagonal")
        if self.output_slots != tuple(range(self.n_outputs)):
            raise InvalidArgument("latency output_slots must be 0..n_outputs-1")
        missing = sorted(set(rotation_steps(m, k, slots)) - set(p.galois_steps))
        if missing:
            raise InvalidArgument(f"latency parameters lack rotation steps {missing}")
        if p.complex_packing and not p.needs_conjugation_key:
            raise InvalidArgument("complex packing needs the conjugation key")
        lo, hi = self.input_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise InvalidArgument(f"input_range {self.input_range!r} is not a finite interval")
        if not 0 < p.input_scale_bits < p.output_scale_bits < p.coeff_modulus_bits[0]:
            raise InvalidArgument("latency parameters need 0 < input_scale_bits < output_scale_bits < first prime")

    @property
    def row_period(self) -> int:
        return _next_pow2(self.n_outputs)

    @property
    def diagonals(self) -> int:
        return self.block_size * self.row_period // self.params.slots

    @property
    def used_features(self) -> tuple[int, ...] | range:
        return self.feature_indices or range(self.n_features)

    @property
    def packed_features(self) -> int:
        return _packed(len(self.used_features), self.params.complex_packing)

    def slot_columns(self) -> np.ndarray:
        """Packed column held by each slot (>= packed_features: zero)."""
        s = np.arange(self.params.slots)
        m, k = self.row_period, self.diagonals
        return (s % m) % k + k * (s // m)

    def pack(self, x: np.ndarray) -> np.ndarray:
        """The slot vector for one sample (complex with complex packing)."""
        if self.feature_indices:
            x = x[list(self.feature_indices)]
        if self.params.complex_packing:
            xp = np.zeros(self.packed_features, dtype=np.complex128)
            xp.real = x[0::2]
            xp.imag[: len(x) // 2] = x[1::2]
        else:
            xp = np.asarray(x, dtype=np.float64)
        cols = self.slot_columns()
        used = cols < len(xp)
        v = np.zeros(self.params.slots, dtype=xp.dtype)
        v[used] = xp[cols[used]]
        return v

    def unpack(self, slots: np.ndarray, scale_bits: int | None = None) -> np.ndarray:
        """The scores from decoded result slots; DataLoss when the slots are not a valid result."""
        m, n = self.row_period, self.n_outputs
        grid = np.asarray(slots).reshape(self.params.slots // m, m)
        scores = grid[:, :n].real.mean(axis=0)
        deviation = max(float(np.max(np.abs(grid[:, :n] - scores))),
                        float(np.max(np.abs(grid[:, n:]), initial=0.0)))
        capacity = 2.0 ** (self.params.coeff_modulus_bits[0] - 1
                           - (self.params.output_scale_bits if scale_bits is None else scale_bits))
        if not deviation <= _CONSISTENCY * capacity:
            raise DataLoss(f"the decrypted result is not consistent (replicas differ by {deviation:.3g}): it was "
                           "not computed from a ciphertext of this secret key for this model, or an input was "
                           "outside the model's input range")
        return scores

    def to_dict(self) -> dict:
        return {
            "params": self.params.to_json(),
            "n_features": self.n_features,
            "n_outputs": self.n_outputs,
            "block_size": self.block_size,
            "output_slots": list(self.output_slots),
            "input_range": list(self.input_range),
            **({"feature_indices": list(self.feature_indices)} if self.feature_indices else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LatencyLayout:
        try:
            params = d["params"]
            return cls(params=params if isinstance(params, CkksParams) else CkksParams.from_json(params),
                       n_features=int(d["n_features"]), n_outputs=int(d["n_outputs"]),
                       block_size=int(d["block_size"]), output_slots=tuple(int(s) for s in d["output_slots"]),
                       input_range=cast("tuple[float, float]",
                                        tuple(float(v) for v in d.get("input_range", (0.0, 1.0)))),
                       feature_indices=tuple(int(i) for i in d.get("feature_indices", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"not a latency layout description ({e!r})") from None


# ---------------------------------------------------------------- server side

def diagonal_values(weights: np.ndarray, bias: np.ndarray,
                    layout: LatencyLayout) -> tuple[list[np.ndarray], np.ndarray]:
    """The k diagonals' slot values and the bias' slot values (before encoding).

    Product i's slot s (holding packed column c) feeds output row (s - i) mod M:
    Horner's i rotations by one bring it to a slot of that residue, which the
    fold then sums.
    """
    slots, m, k, n = layout.params.slots, layout.row_period, layout.diagonals, layout.n_outputs
    weights = np.asarray(weights, dtype=np.float64)[:, list(layout.used_features)]
    packed: np.ndarray
    if layout.params.complex_packing:
        packed = np.zeros((n, layout.packed_features), dtype=np.complex128)
        packed.real = weights[:, 0::2] / 2
        packed.imag[:, : weights.shape[1] // 2] = -weights[:, 1::2] / 2
    else:
        packed = weights
    cols = layout.slot_columns()
    residue = np.arange(slots) % m
    diagonals = []
    for i in range(k):
        rows = (residue - i) % m
        use = (cols < layout.packed_features) & (rows < n)
        values = np.zeros(slots, dtype=packed.dtype)
        values[use] = packed[rows[use], cols[use]]
        diagonals.append(values)
    bias_values = np.zeros(slots)
    use = residue < n
    bias_values[use] = bias[residue[use]]
    return diagonals, bias_values


class LatencyModel:
    """A linear model (scores = weights @ x + bias) ready for latency-layout inference.

    Pre-encodes its k diagonals and the bias once (at the last level); `evaluate`
    is then k plain multiplies and (k - 1) + log2(S/M) (+1) key switches.
    weights: (n_outputs, n_features), or (n_features,) for one output.
    """

    def __init__(self, weights: np.ndarray, bias: np.ndarray | float, params: CkksParams | None = None, *,
                 input_range: tuple[float, float] = (0.0, 1.0)) -> None:
        W, b = linear_model(weights, bias)
        if not np.any(W):
            raise InvalidArgument("every weight is zero: the scores are the bias, nothing to compute")
        lo, hi = finite_interval(input_range)
        m, d = W.shape
        bound = score_bound(W, b, (lo, hi))
        used = np.flatnonzero(np.any(W != 0, axis=0))
        if params is None:
            params = choose_latency_params(len(used), m, score_bound=bound)
        capacity = 2.0 ** (params.coeff_modulus_bits[0] - 2 - params.output_scale_bits)
        if bound > capacity:
            raise InvalidArgument(f"scores up to {bound:.3g} overflow these parameters (at most {capacity:.3g} at "
                                  f"output scale 2^{params.output_scale_bits})")
        slots = params.slots
        row_period, diagonals = plan(_packed(len(used), params.complex_packing), m, slots)
        everything = _packed(d, params.complex_packing)
        # Drop zero-weight features only when that saves a diagonal (a multiply and a rotation):
        # then a client that ignores feature_indices fails on block_size instead of computing garbage.
        feature_indices: tuple[int, ...]
        if everything <= slots and plan(everything, m, slots)[1] == diagonals:
            feature_indices = ()
        else:
            feature_indices = tuple(int(i) for i in used)
        self.layout = LatencyLayout(params=params, n_features=d, n_outputs=m,
                                    block_size=diagonals * slots // row_period, output_slots=tuple(range(m)),
                                    input_range=(lo, hi), feature_indices=feature_indices)
        self.params = params
        self._context = params.context()
        self._parms_id = self._context.last_parms_id()
        self._first_parms_id = self._context.first_parms_id()
        self._evaluator = seal.Evaluator(self._context)
        self._fold = fold_steps(row_period, slots)
        weight_scale = 2.0 ** (params.output_scale_bits - params.input_scale_bits)
        self._diagonals, self._bias = self._encode(W, b, weight_scale)
        k = len(params.coeff_modulus_bits) - 1
        # A fresh ciphertext, uncompressed and not seeded, is the largest valid input.
        self._max_input_bytes = _FRESH_SIZE * k * params.poly_modulus_degree * 8 + 4096

    def _encode(self, W: np.ndarray, b: np.ndarray, weight_scale: float) -> tuple[list, seal.Plaintext]:
        diagonals, bias = diagonal_values(W, b, self.layout)
        if max(np.max(np.abs(d)) for d in diagonals) * weight_scale >= 2.0 ** (self.params.coeff_modulus_bits[0] - 2):
            raise InvalidArgument("weights are too large for these parameters' weight scale")
        encoder = seal.CKKSEncoder(self._context)
        plains = [self._plaintext(encoder, d, weight_scale) if np.any(d) else None for d in diagonals]
        return plains, self._plaintext(encoder, bias, 2.0 ** self.params.output_scale_bits)

    def _plaintext(self, encoder: seal.CKKSEncoder, values: np.ndarray, scale: float) -> seal.Plaintext:
        pt = seal.Plaintext()
        encoder.encode(values.tolist(), self._parms_id, scale, pt)
        return pt

    def _input(self, data: bytes) -> seal.Ciphertext:
        """The client's ciphertext, refused unless it is a fresh latency input for this model."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument("ciphertext must be bytes")
        if not data:
            raise InvalidArgument("ciphertext is empty; send one encrypted sample (latency layout)")
        if len(data) > self._max_input_bytes:
            raise InvalidArgument(f"ciphertext of {len(data)} bytes is larger than any fresh ciphertext for these "
                                  f"parameters ({self._max_input_bytes} bytes at most)")
        ct = serial.load_ciphertext(bytes(data), self._context, parms_id=self._first_parms_id)
        return serial.check_fresh_input(ct, self._context, self._first_parms_id, self.params.input_scale_bits)

    def _check_keys(self, keys: ServerKeys) -> None:
        p, q = keys.params, self.params
        if (p.poly_modulus_degree, p.coeff_modulus_bits) != (q.poly_modulus_degree, q.coeff_modulus_bits) or \
                not keys.has_elements(q.galois_elements()):
            raise FailedPrecondition("these keys were loaded for other parameters than this model's latency "
                                     "layout; load the bundle with load_key_bundle(data, model.layout.params)")

    def evaluate(self, keys: ServerKeys, ciphertext: bytes, zeros: CoeffKeys | None = None) -> bytes:
        """Scores for one encrypted sample, as one ciphertext at the last prime (serialized).

        zeros: the client's encryptions of zero (encinfer.he.coeff.CoeffKeys); one is added to
        the answer, so its c1 is no longer a function of the weights. The service always passes them.
        """
        self._check_keys(keys)
        ct = self._input(ciphertext)
        ev = self._evaluator
        try:
            if ct.parms_id() != self._parms_id:
                ev.mod_switch_to_inplace(ct, self._parms_id)
            acc = None
            for i in reversed(range(len(self._diagonals))):
                if acc is not None:
                    ev.rotate_vector_inplace(acc, 1, keys.rotation_key(1))
                if self._diagonals[i] is None:
                    continue
                product = seal.Ciphertext()
                ev.multiply_plain(ct, self._diagonals[i], product)
                if acc is None:
                    acc = product
                else:
                    ev.add_inplace(acc, product)
            assert acc is not None  # a model has at least one nonzero diagonal
            for step in self._fold:
                rotated = seal.Ciphertext()
                ev.rotate_vector(acc, step, keys.rotation_key(step), rotated)
                ev.add_inplace(acc, rotated)
            if self.params.complex_packing:
                conjugate = seal.Ciphertext()
                ev.complex_conjugate(acc, keys.conjugation_key(), conjugate)
                ev.add_inplace(acc, conjugate)
            ev.add_plain_inplace(acc, self._bias)
            if zeros is not None:
                zero = zeros.zero()
                zero.scale = acc.scale  # an encryption of zero has no scale of its own
                ev.add_inplace(acc, zero)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:  # validated input: a bug, not the caller's
            raise EncinferError(f"latency evaluation failed: {e}") from e
        return serial.dump(acc)


# ---------------------------------------------------------------- client side

def encrypt_latency(secret: SecretKeys, x: Sequence[float] | np.ndarray, layout: LatencyLayout) -> bytes:
    """One sample -> one seeded ciphertext for the latency layout.

    >>> ct = encrypt_latency(secret, image.ravel() / 255.0, layout)   # doctest: +SKIP
    """
    v = checked_sample(secret.params, layout.params, x, layout.n_features, layout.input_range)
    slots = layout.pack(v)
    pt = seal.Plaintext()
    scale = 2.0 ** layout.params.input_scale_bits
    try:
        secret.encoder.encode(slots.tolist(), secret.context.first_parms_id(), scale, pt)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InvalidArgument(f"cannot encode this input: {e}") from None
    return secret.encrypt_symmetric(pt)


def decrypt_latency(secret: SecretKeys, ciphertext: bytes, layout: LatencyLayout) -> np.ndarray:
    """The model's scores (n_outputs,) from the server's answer.

    InvalidArgument when the bytes are not a ciphertext of these parameters;
    DataLoss when they decrypt to something that is not a result for this key and
    model (e.g. the input was encrypted under another secret key).
    """
    check_keys_fit(secret.params, layout.params)
    ctx = secret.context
    ct = serial.load(lambda: seal.Ciphertext(ctx), ciphertext, ctx, "result ciphertext")
    if ct.scale != 2.0 ** layout.params.output_scale_bits:
        raise InvalidArgument(f"result scale is {ct.scale:.6g}; the layout's results are at "
                              f"2^{layout.params.output_scale_bits}")
    plain = secret.decrypt_ciphertext(ct)
    try:
        values = secret.encoder.decode_complex(plain) if layout.params.complex_packing \
            else secret.encoder.decode_double(plain)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InvalidArgument(f"cannot decode the result: {e}") from None
    return layout.unpack(np.asarray(values))
