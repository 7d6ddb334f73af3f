"""Throughput ("batch") layout: many samples per ciphertext, no evaluation keys.

The client sends one ciphertext per used feature f, holding feature f of every
sample of the batch, one sample per slot (two with complex packing: real part =
samples 0..slots-1, imaginary part = samples slots..2*slots-1). Each class score
is then sum_f w[c, f] * ct_f + b[c]: plaintext-scalar multiplies and additions
only, so the server needs no Galois and no relinearization keys -- only the
encryption parameters. The server accumulates the n_outputs sums as feature
ciphertexts arrive (memory O(n_outputs) ciphertexts, never O(features)) and
returns one ciphertext per output.

Wire formats (SEAL's own serialization, default compression):
- up: one *seeded* symmetric ciphertext per feature in `feature_indices`, at the
  first data level, scale 2^input_scale_bits (the second polynomial travels as a
  64-byte seed: half the bytes of a public-key ciphertext);
- down: one ordinary ciphertext per output, at the last level, scale
  2^output_scale_bits; decode, then read slot i (real part) for sample i and,
  with complex packing, the imaginary part of slot i for sample slots + i.

Why it is cheap: a weight is a constant polynomial, so `multiply_plain` by it is
one modular multiply per coefficient with no encoding FFT, and nothing is ever
rescaled (the product scale 2^output_scale_bits stays in one 60-bit prime). What
remains is SEAL's own per-coefficient work: about 19 us per multiply and 6 us
per add at N=4096, so the cost per image is (multiplies + adds) / samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import tenseal.sealapi as seal

from encinfer.common.errors import FailedPrecondition, InvalidArgument
from encinfer.he import serial
from encinfer.he.params import MAX_COEFF_BITS_128, CkksParams

if TYPE_CHECKING:  # pragma: no cover
    from encinfer.he.secret import SecretKeys

# Chosen by measurement (bench/he_batch.py, all 10,000 MNIST test images): see
# choose_batch_params for why N=4096 and one 60-bit prime.
DEFAULT_POLY_MODULUS_DEGREE = 4096
MAX_PRIME_BITS = 60
# Ratio of the fresh-noise error to the weight-rounding error we balance when
# splitting the product scale between inputs and weights (see choose_batch_params).
_INPUT_EXTRA_BITS = 10
MIN_WEIGHT_SCALE_BITS = 12
MIN_INPUT_SCALE_BITS = 20


# ---------------------------------------------------------------- layout and parameters

@dataclass(frozen=True)
class BatchLayout:
    """What a client needs to encrypt a batch and read the answer (GetModelInfo's batch entry)."""

    params: CkksParams
    n_features: int
    n_outputs: int
    feature_indices: tuple[int, ...]
    max_samples: int

    def __post_init__(self) -> None:
        idx = self.feature_indices
        if self.n_features < 1 or self.n_outputs < 1:
            raise InvalidArgument("a batch layout needs at least one feature and one output")
        if not idx:
            raise InvalidArgument("a batch layout needs at least one feature index")
        if any(not 0 <= i < self.n_features for i in idx) or any(a >= b for a, b in zip(idx, idx[1:])):
            raise InvalidArgument(f"feature_indices must be increasing and within 0..{self.n_features - 1}")
        expected = self.params.slots * (2 if self.params.complex_packing else 1)
        if self.max_samples != expected:
            raise InvalidArgument(f"max_samples is {self.max_samples}, but these parameters hold {expected}")
        if self.params.galois_steps or self.params.needs_relin_keys or self.params.needs_conjugation_key:
            raise InvalidArgument("the batch layout uses no evaluation keys; its parameters must ask for none")
        if not 0 < self.params.input_scale_bits < self.params.output_scale_bits:
            raise InvalidArgument("the batch layout needs 0 < input_scale_bits < output_scale_bits")

    @property
    def weight_scale_bits(self) -> int:
        return self.params.output_scale_bits - self.params.input_scale_bits

    def to_dict(self) -> dict:
        return {
            "params": self.params.to_json(),
            "n_features": self.n_features,
            "n_outputs": self.n_outputs,
            "feature_indices": list(self.feature_indices),
            "max_samples": self.max_samples,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BatchLayout":
        try:
            params = d["params"]
            return cls(
                params=params if isinstance(params, CkksParams) else CkksParams.from_json(params),
                n_features=int(d["n_features"]),
                n_outputs=int(d["n_outputs"]),
                feature_indices=tuple(int(i) for i in d["feature_indices"]),
                max_samples=int(d["max_samples"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"not a batch layout description ({e!r})") from None


def score_bound(weights: np.ndarray, bias: np.ndarray, input_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """The largest |score| any input with every feature in input_range can produce."""
    lo, hi = input_range
    W = np.asarray(weights, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    top = b + np.maximum(W * lo, W * hi).sum(axis=1)
    bottom = b + np.minimum(W * lo, W * hi).sum(axis=1)
    return float(max(np.abs(top).max(), np.abs(bottom).max()))


def choose_batch_params(weights: np.ndarray, bias: np.ndarray, *,
                        input_range: tuple[float, float] = (0.0, 1.0),
                        poly_modulus_degree: int = DEFAULT_POLY_MODULUS_DEGREE,
                        complex_packing: bool = True) -> CkksParams:
    """Parameters for the batch layout of one model: N=4096, one 60-bit prime, scales from the model.

    Why these (measured with bench/he_batch.py on the 10,000 MNIST test images):
    - No rescale, ever: the score is a sum of (input at 2^in) x (weight at 2^w), so it
      sits at 2^(in + w) in the same prime it arrived in. One data prime is all the
      chain needs; with no key switching there is no special prime either, so the
      modulus is a single 60-bit prime (far inside 128-bit security at any N >= 2048).
    - Bytes per image do not depend on N (one coefficient per slot either way): a
      seeded ciphertext is ~8 bytes per coefficient, so about 8 * features / 2 bytes
      per image with complex packing, whatever N. N=2048 (one <= 54-bit prime) also
      reaches 100% agreement but spends ~20% more time per image (SEAL's per-call
      cost is amortized over half the samples) and 6 bits less headroom, so the
      smallest degree that pays is N=4096; larger N only adds latency per batch.
    - Scales: the score must fit the prime, |score| * 2^(in + w) < 2^(p - 2) (a sign
      bit and a margin bit), where |score| is bounded for any input in input_range
      (times sqrt(2) with complex packing, which puts two samples in one complex
      slot). The product scale in + w is the rest of the prime; it is split so that
      the fresh encryption noise (about 3.2 * sqrt(N) per slot, times ||w_c||) and
      the rounding of weights to integers (2^-w per weight, times ||x||) cost about
      the same: inputs get ~10 bits more than weights. MNIST (|score| < 84 over
      [0, 1]^784): inputs at 2^30, weights at 2^21, max score error ~1e-5.
    - Weights are pre-rounded to integers at 2^w; features whose every rounded weight
      is 0 are never sent (121 MNIST border pixels).

    Raises InvalidArgument when the model's scores are too large for the prime.
    """
    if poly_modulus_degree not in MAX_COEFF_BITS_128 or poly_modulus_degree < 2048:
        raise InvalidArgument(f"poly_modulus_degree {poly_modulus_degree} is not usable for the batch layout")
    lo, hi = (float(v) for v in input_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise InvalidArgument(f"input_range {input_range!r} is not a finite interval")
    prime_bits = min(MAX_PRIME_BITS, MAX_COEFF_BITS_128[poly_modulus_degree])
    bound = score_bound(weights, bias, (lo, hi)) * (math.sqrt(2) if complex_packing else 1.0)
    value_bits = max(0, math.ceil(math.log2(max(bound, 1.0))))
    product_bits = prime_bits - 2 - value_bits
    input_bits = (product_bits + _INPUT_EXTRA_BITS) // 2
    weight_bits = product_bits - input_bits
    if weight_bits < MIN_WEIGHT_SCALE_BITS or input_bits < MIN_INPUT_SCALE_BITS:
        raise InvalidArgument(
            f"scores up to {bound:.3g} leave only {product_bits} bits of scale in a {prime_bits}-bit prime; "
            "the batch layout needs at least "
            f"{MIN_WEIGHT_SCALE_BITS + MIN_INPUT_SCALE_BITS} (rescale the model's inputs or weights)")
    return CkksParams(
        poly_modulus_degree=poly_modulus_degree,
        coeff_modulus_bits=(prime_bits,),
        input_scale_bits=input_bits,
        output_scale_bits=input_bits + weight_bits,
        complex_packing=complex_packing,
    )


def _max_samples(params: CkksParams) -> int:
    return params.slots * (2 if params.complex_packing else 1)


def split_batches(n_samples: int, layout: BatchLayout) -> list[slice]:
    """Slices of at most layout.max_samples rows covering 0..n_samples-1, in order."""
    if n_samples < 0:
        raise InvalidArgument(f"n_samples must be >= 0, got {n_samples}")
    step = layout.max_samples
    return [slice(i, min(i + step, n_samples)) for i in range(0, n_samples, step)]


def _check_n_samples(n_samples: int, layout: BatchLayout) -> None:
    if not 1 <= n_samples <= layout.max_samples:
        raise InvalidArgument(f"a batch holds 1 to {layout.max_samples} samples, got {n_samples}")


# ---------------------------------------------------------------- server side

class BatchModel:
    """A linear model (scores = X @ weights.T + bias) ready for batch-layout inference.

    Built once per model and process: weights are rounded once to integers at the
    weight scale; each term's constant plaintext is filled in place when used (0.8 us,
    against 217 MB for 6,630 pre-encoded 32 KB plaintexts of an MNIST model).
    """

    def __init__(self, weights: np.ndarray, bias: np.ndarray, params: CkksParams | None = None, *,
                 input_range: tuple[float, float] = (0.0, 1.0)) -> None:
        W = np.asarray(weights, dtype=np.float64)
        b = np.asarray(bias, dtype=np.float64).reshape(-1)
        if W.ndim != 2 or W.shape[0] != b.shape[0] or W.size == 0:
            raise InvalidArgument(f"weights {W.shape} and bias {b.shape} do not form a linear model")
        if not (np.isfinite(W).all() and np.isfinite(b).all()):
            raise InvalidArgument("weights and bias must be finite")
        if params is None:
            params = choose_batch_params(W, b, input_range=input_range)
        self.params = params
        weight_bits = params.output_scale_bits - params.input_scale_bits
        q = np.rint(W * 2.0 ** weight_bits)
        if np.abs(q).max() >= 2.0 ** 52:
            raise InvalidArgument("weights too large for this weight scale")
        used = np.flatnonzero(np.any(q != 0, axis=0))
        if used.size == 0:
            raise InvalidArgument("every weight rounds to 0 at this scale: nothing to compute")
        self.layout = BatchLayout(params=params, n_features=W.shape[1], n_outputs=W.shape[0],
                                  feature_indices=tuple(int(i) for i in used),
                                  max_samples=_max_samples(params))
        self.weights = W
        self.bias = b
        self.context = params.context()
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        self._parms_id = self.context.first_parms_id()
        self._last_parms_id = self.context.last_parms_id()
        self._weight_scale = 2.0 ** weight_bits
        self._input_scale = 2.0 ** params.input_scale_bits
        # Per sent feature: (class, weight / 2^w as an exact float) for its non-zero integer weights.
        self._terms: list[tuple[tuple[int, float], ...]] = [
            tuple((c, float(q[c, f]) / self._weight_scale) for c in range(q.shape[0]) if q[c, f] != 0)
            for f in used]
        # An output whose weights all round to 0 still needs a ciphertext (SEAL refuses a
        # zero one): it gets the first feature at the smallest weight, 2^-w (error <= |x| 2^-w).
        covered = {c for terms in self._terms for c, _ in terms}
        if len(covered) < q.shape[0]:
            first = dict(self._terms[0])
            for c in range(q.shape[0]):
                if c not in covered:
                    first[c] = 1.0 / self._weight_scale
            self._terms[0] = tuple(sorted(first.items()))
        self._bias_plain = []
        for c in range(q.shape[0]):
            pt = seal.Plaintext()
            value = complex(b[c], b[c]) if params.complex_packing else float(b[c])
            self.encoder.encode(value, self._parms_id, 2.0 ** params.output_scale_bits, pt)
            self._bias_plain.append(pt)
        self._ct_bytes = 2 * params.poly_modulus_degree * len(params.coeff_modulus_bits) * 8

    @property
    def n_terms(self) -> int:
        """Plaintext multiplies per batch (whatever the number of samples in it)."""
        return sum(len(t) for t in self._terms)

    def start(self, n_samples: int) -> "BatchAccumulator":
        """Opens one batch of n_samples (1..layout.max_samples); feed it with `add`."""
        _check_n_samples(n_samples, self.layout)
        return BatchAccumulator(self, n_samples)

    def evaluate(self, ciphertexts: Iterable[bytes], n_samples: int) -> list[bytes]:
        """One-shot: all feature ciphertexts of a batch, in order -> one ciphertext per output."""
        acc = self.start(n_samples)
        for position, ct in enumerate(ciphertexts):
            acc.add(position, ct)
        return acc.finish()


class BatchAccumulator:
    """Running class sums of one batch: O(n_outputs) ciphertexts, whatever the number of features."""

    def __init__(self, model: BatchModel, n_samples: int) -> None:
        self.model = model
        self.n_samples = n_samples
        self.total = len(model.layout.feature_indices)
        self.received = 0
        self._finished = False
        ctx = model.context
        self._sums = [seal.Ciphertext(ctx) for _ in range(model.layout.n_outputs)]
        self._started = [False] * model.layout.n_outputs
        self._product = seal.Ciphertext(ctx)
        self._weight = seal.Plaintext()

    @property
    def nbytes(self) -> int:
        """Bytes of ciphertext data this batch holds (allocated capacity, not just used)."""
        per_poly = self.model.params.poly_modulus_degree * len(self.model.params.coeff_modulus_bits) * 8
        return sum(ct.size_capacity() * per_poly for ct in (*self._sums, self._product))

    def add(self, position: int, ciphertext: bytes) -> None:
        """Adds feature ciphertext number `position` (0..total-1, in order) into every class sum."""
        if self._finished:
            raise InvalidArgument("this batch is already finished")
        if position != self.received:
            if not 0 <= position < self.total:
                raise InvalidArgument(f"batch part {position} is out of range: this model takes "
                                      f"{self.total} parts (0..{self.total - 1})")
            raise InvalidArgument(f"batch part {position} arrived, expected part {self.received} of "
                                  f"{self.total} (parts of a batch are sent in order)")
        ct = self._load(position, ciphertext)
        m = self.model
        ev, enc, pid, scale = m.evaluator, m.encoder, m._parms_id, m._weight_scale
        for c, w in m._terms[position]:
            enc.encode(w, pid, scale, self._weight)
            if self._started[c]:
                ev.multiply_plain(ct, self._weight, self._product)
                ev.add_inplace(self._sums[c], self._product)
            else:
                ev.multiply_plain(ct, self._weight, self._sums[c])
                self._started[c] = True
        self.received += 1

    def _load(self, position: int, data: bytes) -> seal.Ciphertext:
        m = self.model
        what = f"batch part {position}"
        ct = serial.load_ciphertext(data, m.context, what)
        if ct.parms_id() != m._parms_id:
            raise InvalidArgument(f"{what} is at a lower level than a fresh ciphertext; encrypt it at the "
                                  "first data level of the layout's parameters")
        if not ct.is_ntt_form():
            raise InvalidArgument(f"{what} is not in NTT form (not a CKKS ciphertext)")
        if ct.scale != m._input_scale:
            got = f"2^{math.log2(ct.scale):.4g}" if ct.scale > 0 else repr(ct.scale)
            raise InvalidArgument(f"{what} has scale {got}; the layout encodes inputs at "
                                  f"2^{m.params.input_scale_bits}")
        return ct

    def finish(self) -> list[bytes]:
        """Adds the bias and returns one ciphertext per output (last level, scale 2^output_scale_bits)."""
        if self._finished:
            raise InvalidArgument("this batch is already finished")
        if self.received != self.total:
            raise InvalidArgument(f"batch has {self.received} of {self.total} parts; "
                                  "every part must arrive before the answer")
        m = self.model
        out = []
        for c, acc in enumerate(self._sums):
            m.evaluator.add_plain_inplace(acc, m._bias_plain[c])
            if acc.parms_id() != m._last_parms_id:
                m.evaluator.mod_switch_to_inplace(acc, m._last_parms_id)
            out.append(serial.dump(acc))
        self._finished = True
        self._sums, self._product = [], seal.Ciphertext()
        return out


# ---------------------------------------------------------------- client side

def _check_secret(secret: "SecretKeys", layout: BatchLayout) -> None:
    if secret.params.manifest() != layout.params.manifest():
        raise FailedPrecondition("the secret key was made for other parameters than this batch layout "
                                 f"(key {secret.params.manifest()}, layout {layout.params.manifest()})")


def _check_samples(X: np.ndarray, layout: BatchLayout) -> np.ndarray:
    try:
        X = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"samples are not numbers ({e})") from None
    if X.ndim != 2 or X.shape[1] != layout.n_features:
        raise InvalidArgument(f"samples must be an array of shape (n_samples, {layout.n_features}), "
                              f"got {X.shape}")
    _check_n_samples(X.shape[0], layout)
    if not np.isfinite(X).all():
        raise InvalidArgument("samples contain NaN or infinite values")
    return X


def encrypt_batch(secret: "SecretKeys", X: np.ndarray, layout: BatchLayout) -> Iterator[bytes]:
    """Yields one seeded ciphertext per feature of layout.feature_indices, in order.

    X is (n_samples, n_features) with 1 <= n_samples <= layout.max_samples; rows become
    slots (with complex packing rows slots.. go to the imaginary parts). Validates
    eagerly (InvalidArgument), then encrypts lazily, so a stream can send part i
    while part i+1 is being encrypted.

    >>> parts = list(encrypt_batch(secret, X[:4096], layout))   # doctest: +SKIP
    >>> scores = decrypt_batch(secret, model.evaluate(parts, 4096), 4096, layout)  # doctest: +SKIP
    """
    _check_secret(secret, layout)
    X = _check_samples(X, layout)
    return _encrypt_columns(secret, X, layout)


def _encrypt_columns(secret: "SecretKeys", X: np.ndarray, layout: BatchLayout) -> Iterator[bytes]:
    slots = layout.params.slots
    scale = 2.0 ** layout.params.input_scale_bits
    n = X.shape[0]
    columns = np.zeros((len(layout.feature_indices), slots), dtype=np.complex128 if n > slots else np.float64)
    cols = X[:, list(layout.feature_indices)].T
    columns.real[:, :min(n, slots)] = cols[:, :slots]
    if n > slots:
        columns.imag[:, :n - slots] = cols[:, slots:]
    pt = seal.Plaintext()
    for values in columns:
        secret.encoder.encode(values.tolist(), scale, pt)
        yield secret.encrypt_symmetric(pt)


def decrypt_batch(secret: "SecretKeys", ciphertexts: list[bytes], n_samples: int,
                  layout: BatchLayout) -> np.ndarray:
    """The (n_samples, n_outputs) scores of one batch from its n_outputs result ciphertexts."""
    _check_secret(secret, layout)
    _check_n_samples(n_samples, layout)
    if len(ciphertexts) != layout.n_outputs:
        raise InvalidArgument(f"a batch answer has {layout.n_outputs} ciphertexts, got {len(ciphertexts)}")
    slots = layout.params.slots
    scores = np.empty((n_samples, layout.n_outputs))
    for c, data in enumerate(ciphertexts):
        pt = secret.decrypt(data)
        if n_samples > slots:
            values = np.asarray(secret.encoder.decode_complex(pt))
            scores[:slots, c] = values.real
            scores[slots:, c] = values.imag[:n_samples - slots]
        else:
            scores[:, c] = np.asarray(secret.encoder.decode_double(pt))[:n_samples]
    return scores
