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

Why it is cheap: a weight is a constant polynomial, so multiplying by it is one
modular multiply per coefficient with no encoding FFT, and nothing is ever
rescaled (the product scale 2^output_scale_bits stays in one 60-bit prime). With
SEAL's evaluator that is about 19 us per multiply and 6 us per add at N=4096,
6,538 of each per MNIST batch; the numpy kernel does the same modular sums as
exact float64 matrix products (BLAS) and costs about half as much per image, most
of which is now SEAL deserializing the seeded inputs (see BatchModel).
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import tenseal.sealapi as seal

from encinfer.common.errors import FailedPrecondition, InvalidArgument
from encinfer.he import serial
from encinfer.he.memory import CiphertextMemory
from encinfer.he.params import MAX_COEFF_BITS_128, CkksParams, finite_interval, score_bound

if TYPE_CHECKING:  # pragma: no cover
    from encinfer.he.coeff import CoeffKeys
    from encinfer.he.secret import SecretKeys

log = logging.getLogger(__name__)

# Chosen by measurement (bench/he_batch.py, all 10,000 MNIST test images): see
# choose_batch_params for why N=4096 and one 60-bit prime.
DEFAULT_POLY_MODULUS_DEGREE = 4096
MAX_PRIME_BITS = 60
# What the parameters are sized for when a model states no input range: MNIST pixels.
DEFAULT_INPUT_RANGE = (0.0, 1.0)
# Bits more for inputs than for weights when splitting the product scale: balances
# fresh-noise error against weight rounding (see choose_batch_params).
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
    # The inputs the parameters were sized for (scores cannot overflow the prime for
    # inputs inside it); encrypt_batch refuses others. None: unknown, not checked.
    input_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        idx = self.feature_indices
        if self.n_features < 1 or self.n_outputs < 1:
            raise InvalidArgument("a batch layout needs at least one feature and one output")
        if not idx:
            raise InvalidArgument("a batch layout needs at least one feature index")
        if any(not 0 <= i < self.n_features for i in idx) or any(a >= b for a, b in zip(idx, idx[1:], strict=False)):
            raise InvalidArgument(f"feature_indices must be increasing and within 0..{self.n_features - 1}")
        expected = self.params.slots * (2 if self.params.complex_packing else 1)
        if self.max_samples != expected:
            raise InvalidArgument(f"max_samples is {self.max_samples}, but these parameters hold {expected}")
        if self.params.galois_steps or self.params.needs_relin_keys or self.params.needs_conjugation_key:
            raise InvalidArgument("the batch layout uses no evaluation keys; its parameters must ask for none")
        if not 0 < self.params.input_scale_bits < self.params.output_scale_bits:
            raise InvalidArgument("the batch layout needs 0 < input_scale_bits < output_scale_bits")
        if self.input_range is not None and not self.input_range[0] <= self.input_range[1]:
            raise InvalidArgument(f"input_range {self.input_range} is empty")

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
            "input_range": list(self.input_range) if self.input_range is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BatchLayout:
        try:
            params = d["params"]
            return cls(
                params=params if isinstance(params, CkksParams) else CkksParams.from_json(params),
                n_features=int(d["n_features"]),
                n_outputs=int(d["n_outputs"]),
                feature_indices=tuple(int(i) for i in d["feature_indices"]),
                max_samples=int(d["max_samples"]),
                input_range=(cast("tuple[float, float]", tuple(float(v) for v in d["input_range"]))
                             if d.get("input_range") is not None else None),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"not a batch layout description ({e!r})") from None


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
      per image with complex packing, whatever N. Measured on MNIST (full batches):
      N=2048 (one 54-bit prime) also reaches 100% agreement, but with a 10x larger
      score error (6e-5) and 40% more server time per image (15% with the seal
      kernel): per-ciphertext costs are amortized over half the samples. N=4096
      (29 us/image, error 6e-6) is the smallest degree that pays; N=8192 gains 3%
      and doubles the batch, so partial batches waste more.
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
    lo, hi = finite_interval(input_range)
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
        needs_public_key=True,  # answers are re-randomized (docs/security.md)
    )


def _check_headroom(W: np.ndarray, b: np.ndarray, params: CkksParams, input_range: tuple[float, float]) -> None:
    """Refuses parameters whose answers could overflow for inputs in input_range."""
    bound = score_bound(W, b, input_range) * (math.sqrt(2) if params.complex_packing else 1.0)
    room = params.coeff_modulus_bits[0] - 1  # the answer ends in the first prime alone
    if bound * 2.0 ** params.output_scale_bits >= 2.0 ** room:
        raise InvalidArgument(f"scores up to {bound:.3g} at scale 2^{params.output_scale_bits} overflow the "
                              f"{params.coeff_modulus_bits[0]}-bit prime the answer is read in")


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

KERNELS = ("numpy", "seal")
# Feature ciphertexts gathered before one matrix product (numpy kernel): a fixed buffer,
# so a batch's memory does not grow with the number of features.
NUMPY_CHUNK = 16


class BatchModel:
    """A linear model (scores = X @ weights.T + bias) ready for batch-layout inference.

    input_range is the range of every input feature the parameters must hold (default
    [0, 1] when choosing them; with explicit params, checked if given); the layout
    carries it so encrypt_batch refuses inputs outside it. Built once per model and
    process. Weights are rounded once to integers at the weight
    scale (the "pre-encoding"). Two kernels compute the same sums, bit for bit:
    - "numpy": each feature ciphertext's coefficients, split in 16-bit limbs, go into
      one float64 matrix product per NUMPY_CHUNK features (exact: every partial sum stays below
      2^53), reduced mod q once per batch. About 2x faster than "seal"; needs the
      zero-copy view of SEAL's buffers (checked once per process, see CiphertextMemory).
    - "seal": multiply_plain by each weight's constant plaintext (filled in place when
      used: 0.8 us, against 217 MB for 6,630 pre-encoded 32 KB plaintexts of an MNIST
      model) and add_inplace.
    kernel="auto" takes numpy when it is available and exact for these weights.
    """

    def __init__(self, weights: np.ndarray, bias: np.ndarray, params: CkksParams | None = None, *,
                 input_range: tuple[float, float] | None = None, kernel: str = "auto") -> None:
        if kernel not in (*KERNELS, "auto"):
            raise InvalidArgument(f"unknown kernel {kernel!r}; use one of auto, {', '.join(KERNELS)}")
        W = np.asarray(weights, dtype=np.float64)
        b = np.asarray(bias, dtype=np.float64).reshape(-1)
        if W.ndim != 2 or W.shape[0] != b.shape[0] or W.size == 0:
            raise InvalidArgument(f"weights {W.shape} and bias {b.shape} do not form a linear model")
        if not (np.isfinite(W).all() and np.isfinite(b).all()):
            raise InvalidArgument("weights and bias must be finite")
        if params is None:
            input_range = input_range or DEFAULT_INPUT_RANGE
            params = choose_batch_params(W, b, input_range=input_range)
        elif input_range is not None:
            _check_headroom(W, b, params, input_range)
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
                                  max_samples=_max_samples(params),
                                  input_range=(None if input_range is None
                                               else (float(input_range[0]), float(input_range[1]))))
        self.weights = W
        self.bias = b
        self.context = params.context()
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        self._parms_id = self.context.first_parms_id()
        self._last_parms_id = self.context.last_parms_id()
        self._weight_scale = 2.0 ** weight_bits
        self._input_scale = 2.0 ** params.input_scale_bits
        # The integer weights of the sent features; an output whose weights all round to 0
        # still needs a ciphertext (SEAL refuses a zero one): it gets the first feature at
        # the smallest weight, 1 (an error of at most |x| 2^-w).
        self._wq = np.ascontiguousarray(q[:, used])
        self._wq[~np.any(self._wq != 0, axis=1), 0] = 1.0
        # Per sent feature: (class, weight / 2^w as an exact float) for its non-zero weights.
        self._terms: list[tuple[tuple[int, float], ...]] = [
            tuple((c, float(self._wq[c, j]) / self._weight_scale) for c in range(q.shape[0]) if self._wq[c, j])
            for j in range(used.size)]
        self._one = seal.Plaintext()
        self.encoder.encode(1.0 / self._weight_scale, self._parms_id, self._weight_scale, self._one)
        self._bias_plain = []
        for c in range(q.shape[0]):
            pt = seal.Plaintext()
            value = complex(b[c], b[c]) if params.complex_packing else float(b[c])
            self.encoder.encode(value, self._parms_id, 2.0 ** params.output_scale_bits, pt)
            self._bias_plain.append(pt)
        k = len(params.coeff_modulus_bits)
        self._words = 2 * params.poly_modulus_degree * k  # uint64 coefficients of one fresh ciphertext
        primes = [m.value() for m in self.context.first_context_data().parms().coeff_modulus()]
        self._moduli = np.tile(np.repeat(np.array(primes, dtype=np.uint64), params.poly_modulus_degree), 2)
        self.kernel = self._pick_kernel(kernel)

    def _pick_kernel(self, wanted: str) -> str:
        if wanted == "seal":
            return "seal"
        # Exactness: a 16-bit limb times the integer weights, summed, must stay below 2^53.
        exact = float(np.abs(self._wq).sum(axis=1).max()) * 0xFFFF < 2.0 ** 53
        if exact and CiphertextMemory.supported(self.params):
            return "numpy"
        reason = "SEAL memory layout not recognized" if exact else "weights too large for exact float64 sums"
        if wanted == "numpy":
            raise FailedPrecondition(f"the numpy kernel is not available here ({reason})")
        log.warning("batch layout falls back to the seal kernel", extra={"fields": {"reason": reason}})
        return "seal"

    @property
    def n_terms(self) -> int:
        """Plaintext multiplies per batch with the seal kernel (whatever the number of samples)."""
        return sum(len(t) for t in self._terms)

    def start(self, n_samples: int, zeros: CoeffKeys | None = None) -> BatchAccumulator:
        """Opens one batch of n_samples (1..layout.max_samples); feed it with `add`.

        zeros: the client's encryptions of zero (encinfer.he.coeff.CoeffKeys); each answer
        gets a fresh one added before it is serialized, so its c1 is no longer a function of
        the weights the client could solve for. The service always passes them.
        """
        _check_n_samples(n_samples, self.layout)
        if self.kernel == "numpy":
            return _NumpyAccumulator(self, n_samples, zeros)
        return _SealAccumulator(self, n_samples, zeros)

    def evaluate(self, ciphertexts: Iterable[bytes], n_samples: int,
                 zeros: CoeffKeys | None = None) -> list[bytes]:
        """One-shot: all feature ciphertexts of a batch, in order -> one ciphertext per output."""
        acc = self.start(n_samples, zeros)
        for position, ct in enumerate(ciphertexts):
            acc.add(position, ct)
        return acc.finish()


class BatchAccumulator:
    """Running class sums of one batch: memory O(n_outputs), whatever the number of features.

    `add(position, ciphertext)` for positions 0..total-1 in order, then `finish()`.
    """

    def __init__(self, model: BatchModel, n_samples: int, zeros: CoeffKeys | None = None) -> None:
        self.model = model
        self.zeros = zeros
        self.n_samples = n_samples
        self.total = len(model.layout.feature_indices)
        self.received = 0
        self._finished = False

    @property
    def nbytes(self) -> int:
        """Bytes this batch holds for its sums (allocated, not just used)."""
        raise NotImplementedError

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
        self._accumulate(position, self._load(position, ciphertext))
        self.received += 1

    def _load(self, position: int, data: bytes) -> seal.Ciphertext:
        m = self.model
        what = f"batch part {position}"
        ct = serial.load_ciphertext(data, m.context, what, parms_id=m._parms_id)  # checked before SEAL
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
        out = self._answers()
        self._finished = True
        return out

    def _accumulate(self, position: int, ct: seal.Ciphertext) -> None:
        raise NotImplementedError

    def _answers(self) -> list[bytes]:
        raise NotImplementedError

    def _to_last_level(self, answer: seal.Ciphertext) -> bytes:
        """The answer, re-randomized, at the last level: fewer primes, fewer bytes down (scale unchanged)."""
        m = self.model
        if self.zeros is not None:
            zero = self.zeros.zero()
            zero.scale = answer.scale  # an encryption of zero has no scale of its own
            m.evaluator.add_inplace(answer, zero)
        if answer.parms_id() != m._last_parms_id:
            m.evaluator.mod_switch_to_inplace(answer, m._last_parms_id)
        return serial.dump(answer)


class _SealAccumulator(BatchAccumulator):
    """SEAL's multiply_plain + add_inplace: n_outputs + 1 ciphertexts."""

    def __init__(self, model: BatchModel, n_samples: int, zeros: CoeffKeys | None = None) -> None:
        super().__init__(model, n_samples, zeros)
        self._sums = [seal.Ciphertext(model.context) for _ in range(model.layout.n_outputs)]
        self._started = [False] * model.layout.n_outputs
        self._product = seal.Ciphertext(model.context)
        self._weight = seal.Plaintext()

    @property
    def nbytes(self) -> int:
        per_poly = self.model._words // 2 * 8
        return sum(ct.size_capacity() * per_poly for ct in (*self._sums, self._product))

    def _accumulate(self, position: int, ct: seal.Ciphertext) -> None:
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

    def _answers(self) -> list[bytes]:
        m = self.model
        out = []
        for c, total in enumerate(self._sums):
            m.evaluator.add_plain_inplace(total, m._bias_plain[c])
            out.append(self._to_last_level(total))
        self._sums, self._product = [], seal.Ciphertext()
        return out


class _NumpyAccumulator(BatchAccumulator):
    """Exact integer sums in float64 matrix products over 16-bit limbs, reduced mod q at the end.

    A coefficient c < q < 2^60 is four 16-bit limbs; sum_f w_f c_f = sum_j 2^(16 j)
    sum_f w_f limb_j(c_f), and each inner sum is an integer below 2^53 (checked per
    model), so BLAS computes it exactly. Holds the limb sums (4 x n_outputs
    ciphertexts' worth of float64), one chunk of NUMPY_CHUNK limb rows and one
    ciphertext that gives the answers their SEAL metadata.
    """

    def __init__(self, model: BatchModel, n_samples: int, zeros: CoeffKeys | None = None) -> None:
        super().__init__(model, n_samples, zeros)
        width = 4 * model._words
        self._sums: np.ndarray = np.zeros((model.layout.n_outputs, width))
        self._chunk: np.ndarray = np.empty((min(NUMPY_CHUNK, self.total), width))
        self._filled = 0
        self._template = seal.Ciphertext(model.context)

    @property
    def nbytes(self) -> int:
        template = self._template.size_capacity() * self.model._words // 2 * 8
        return self._sums.nbytes + self._chunk.nbytes + template

    def _accumulate(self, position: int, ct: seal.Ciphertext) -> None:
        m = self.model
        if position == 0:  # a ciphertext at the answer's level and scale, to carry the answers
            m.evaluator.multiply_plain(ct, m._one, self._template)
        self._chunk[self._filled] = CiphertextMemory.view(ct, m._words).view(np.uint16)
        self._filled += 1
        if self._filled == len(self._chunk) or position == self.total - 1:
            first = position + 1 - self._filled
            with _one_blas_thread():
                self._sums += m._wq[:, first:position + 1] @ self._chunk[:self._filled]
            self._filled = 0

    def _answers(self) -> list[bytes]:
        m = self.model
        q = m._moduli
        limbs = self._sums.reshape(len(self._sums), m._words, 4)
        total = _mod(limbs[:, :, 3], q)
        for j in (2, 1, 0):
            total = _add_mod(_shift_mod(total, 16, q), _mod(limbs[:, :, j], q), q)
        out = []
        words = CiphertextMemory.view(self._template, m._words)
        answer = seal.Ciphertext(m.context)
        for c in range(len(total)):
            words[:] = total[c]
            m.evaluator.add_plain(self._template, m._bias_plain[c], answer)
            out.append(self._to_last_level(answer))
        self._sums = self._chunk = np.empty(0)
        self._template = seal.Ciphertext()
        return out


def _mod(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact integers held in float64 (|x| < 2^53) -> x mod q as uint64."""
    return np.mod(x.astype(np.int64), q.astype(np.int64)).astype(np.uint64)


def _add_mod(a: np.ndarray, b: np.ndarray, q: np.ndarray) -> np.ndarray:
    s = a + b  # both < q < 2^60: no overflow
    return np.where(s >= q, s - q, s)


def _shift_mod(a: np.ndarray, bits: int, q: np.ndarray) -> np.ndarray:
    """a * 2^bits mod q for a < q < 2^60, three bits at a time (a << 3 < 2^63)."""
    while bits:
        step = min(3, bits)
        a = np.remainder(a << np.uint64(step), q)
        bits -= step
    return a


@functools.lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - scikit-learn brings it
        return None
    return ThreadpoolController()


def _one_blas_thread():
    """One BLAS thread: the service parallelizes with worker processes, not BLAS threads."""
    import contextlib
    controller = _blas_controller()
    return controller.limit(limits=1, user_api="blas") if controller else contextlib.nullcontext()


# ---------------------------------------------------------------- client side

def _check_secret(secret: SecretKeys, layout: BatchLayout) -> None:
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
    if layout.input_range is not None:
        lo, hi = layout.input_range
        if X.min() < lo or X.max() > hi:
            raise InvalidArgument(
                f"sample values span [{X.min():.4g}, {X.max():.4g}], outside the model's input range "
                f"[{lo:g}, {hi:g}] that the encryption parameters are sized for (scale the inputs "
                "as the model was trained)")
    return X


def encrypt_batch(secret: SecretKeys, X: np.ndarray, layout: BatchLayout) -> Iterator[bytes]:
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


def _encrypt_columns(secret: SecretKeys, X: np.ndarray, layout: BatchLayout) -> Iterator[bytes]:
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


def decrypt_batch(secret: SecretKeys, ciphertexts: list[bytes], n_samples: int,
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
