"""CKKS parameter sets: what a layout needs, checked against 128-bit security.

A model states its parameters; the client builds its keys from them (GetModelInfo),
so the two cannot drift apart. The manifest hash names one parameter set: a key
built for another set is refused before any compute.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from encinfer.common.errors import FailedPrecondition, InvalidArgument

# SEAL's HomomorphicEncryption.org table for 128-bit classical security:
# the largest total coefficient-modulus bit count per ring degree.
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


def check_security(poly_modulus_degree: int, coeff_modulus_bits: list[int] | tuple[int, ...]) -> None:
    """Raises InvalidArgument unless the parameters give 128-bit security."""
    limit = MAX_COEFF_BITS_128.get(poly_modulus_degree)
    if limit is None:
        raise InvalidArgument(
            f"poly_modulus_degree {poly_modulus_degree} is not supported; use one of "
            f"{', '.join(map(str, sorted(MAX_COEFF_BITS_128)))}")
    total = sum(coeff_modulus_bits)
    if total > limit:
        raise InvalidArgument(
            f"coefficient modulus of {total} bits at N={poly_modulus_degree} is below 128-bit security "
            f"(at most {limit} bits at this ring degree)")
    if not coeff_modulus_bits or any(not 1 <= b <= 60 for b in coeff_modulus_bits):
        raise InvalidArgument("coefficient modulus primes must be 1 to 60 bits each")


def galois_element(step: int, poly_modulus_degree: int) -> int:
    """SEAL's Galois element for a CKKS slot rotation by `step` (3^step mod 2N)."""
    m = 2 * poly_modulus_degree
    return pow(3, step % (poly_modulus_degree // 2), m)


@dataclass(frozen=True)
class CkksParams:
    """One parameter set. Scales are powers of two, given as exponents."""

    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    input_scale_bits: int
    output_scale_bits: int
    galois_steps: tuple[int, ...] = ()
    needs_conjugation_key: bool = False
    needs_relin_keys: bool = False
    complex_packing: bool = False
    # The client uploads a public key: the server re-randomizes answers with it (coefficient layout).
    needs_public_key: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        check_security(self.poly_modulus_degree, self.coeff_modulus_bits)

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def manifest(self) -> dict:
        """The fields a key must match (everything that shapes the keys, nothing else)."""
        return {
            "scheme": "ckks",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_modulus_bits": list(self.coeff_modulus_bits),
            "galois_steps": sorted(self.galois_steps),
            "needs_conjugation_key": self.needs_conjugation_key,
            "needs_relin_keys": self.needs_relin_keys,
            # Only when set, so the hashes of layouts without it stay what they were.
            **({"needs_public_key": True} if self.needs_public_key else {}),
        }

    def manifest_sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest(), sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict:
        d = asdict(self)
        d["coeff_modulus_bits"] = list(self.coeff_modulus_bits)
        d["galois_steps"] = list(self.galois_steps)
        return d

    @classmethod
    def from_json(cls, d: dict) -> CkksParams:
        d = dict(d)
        d["coeff_modulus_bits"] = tuple(d["coeff_modulus_bits"])
        d["galois_steps"] = tuple(d.get("galois_steps", ()))
        return cls(**d)

    def galois_elements(self) -> list[int]:
        elts = [galois_element(s, self.poly_modulus_degree) for s in self.galois_steps]
        if self.needs_conjugation_key:
            elts.append(2 * self.poly_modulus_degree - 1)
        return sorted(set(elts))

    def seal_parameters(self) -> seal.EncryptionParameters:
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(self.poly_modulus_degree)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(self.poly_modulus_degree, list(self.coeff_modulus_bits)))
        return parms

    def context(self) -> seal.SEALContext:
        return _context(self.poly_modulus_degree, self.coeff_modulus_bits)


@functools.lru_cache(maxsize=16)
def _context(n: int, bits: tuple[int, ...]) -> seal.SEALContext:
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(n)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(n, list(bits)))
    # expand_mod_chain=True so mod switching works; TC128 makes SEAL refuse weaker sets too.
    return seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)


def score_bound(weights, bias, input_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """The largest |score| a linear model can produce for any input with every feature in
    input_range: what a layout's scales must leave room for (every layout asks this)."""
    lo, hi = input_range
    W = np.asarray(weights, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    top = b + np.maximum(W * lo, W * hi).sum(axis=1)
    bottom = b + np.minimum(W * lo, W * hi).sum(axis=1)
    return float(max(np.abs(top).max(), np.abs(bottom).max()))


def check_keys_fit(secret: CkksParams, layout: CkksParams) -> None:
    """FAILED_PRECONDITION when secret keys were made for other parameters than the layout's."""
    if (secret.poly_modulus_degree, secret.coeff_modulus_bits) != (layout.poly_modulus_degree,
                                                                    layout.coeff_modulus_bits):
        raise FailedPrecondition(
            f"secret keys are for N={secret.poly_modulus_degree}, moduli {list(secret.coeff_modulus_bits)}; "
            f"the layout needs N={layout.poly_modulus_degree}, moduli {list(layout.coeff_modulus_bits)}")


def checked_sample(secret: CkksParams, layout: CkksParams, x, n_features: int,
                   input_range: tuple[float, float]) -> np.ndarray:
    """One sample as floats, refused before anything is encrypted: keys made for other
    parameters (FAILED_PRECONDITION), and shapes or values the layout was not sized for."""
    check_keys_fit(secret, layout)
    try:
        v = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"input is not a vector of numbers ({e})") from None
    if v.shape != (n_features,):
        raise InvalidArgument(f"input has shape {v.shape}; the model takes a vector of {n_features} features")
    if not np.all(np.isfinite(v)):
        raise InvalidArgument("input has NaN or infinite values")
    lo, hi = input_range
    if v.min() < lo or v.max() > hi:
        raise InvalidArgument(f"input values must lie in [{lo:g}, {hi:g}] (got {v.min():g} to {v.max():g}); "
                              "scale the sample as the model was trained")
    return v


def linear_model(weights: Any, bias: Any) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) as floats (a vector of weights is one output row); INVALID_ARGUMENT unless they
    are an (outputs, features) matrix and an (outputs,) vector of finite numbers."""
    W = np.asarray(weights, dtype=np.float64)
    if W.ndim == 1:
        W = W[None, :]
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    if W.ndim != 2 or W.shape[0] < 1 or W.shape[1] < 1 or b.shape != (W.shape[0],):
        raise InvalidArgument(f"weights {np.shape(weights)} and bias {np.shape(bias)} are not an "
                              "(outputs, features) matrix and an (outputs,) vector")
    if not (np.all(np.isfinite(W)) and np.all(np.isfinite(b))):
        raise InvalidArgument("weights and bias must be finite")
    return W, b


def finite_interval(input_range: Any) -> tuple[float, float]:
    """The input range as (lo, hi) floats; INVALID_ARGUMENT unless it is a finite interval."""
    lo, hi = (float(v) for v in input_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise InvalidArgument(f"input_range {input_range!r} is not a finite interval")
    return lo, hi
