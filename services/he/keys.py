"""Public key bundles ("encinfer-keys-v1"): what a client uploads to the key store.

INTERFACE DRAFT (owned by the HE engineer; signatures are fixed, bodies to come).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

FORMAT = "encinfer-keys-v1"


@dataclass(frozen=True)
class KeyInfo:
    """What inspecting a bundle tells: recorded by the key store in KeyParameters."""

    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    has_public_key: bool
    has_relin_keys: bool
    galois_steps: tuple[int, ...]
    has_conjugation_key: bool
    format: str = FORMAT


def inspect_key_bundle(path: str | os.PathLike) -> KeyInfo:
    """Parses a bundle file and validates it.

    Raises encinfer.common.errors.InvalidArgument for: bytes that are not a bundle,
    a non-CKKS scheme (BFV/BGV), anything carrying a secret key (also a TenSEAL
    context serialized with its secret key), parameters under 128-bit security.
    Works from a file so a 50 MB key set is never one bytes object; peak memory
    stays under about 2x the file size.
    """
    raise NotImplementedError
