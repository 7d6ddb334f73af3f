"""What a key bundle holds, as the key store records it: no SEAL import, so the key
store's records and the client library can use it without loading TenSEAL."""
from __future__ import annotations

from dataclasses import dataclass

FORMAT = "encinfer-keys-v1"


@dataclass(frozen=True)
class KeyInfo:
    """What inspecting a bundle tells; the key store records it with every key."""

    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    has_public_key: bool
    has_relin_keys: bool
    galois_steps: tuple[int, ...]
    has_conjugation_key: bool
    format: str = FORMAT
    scheme: str = "ckks"

    def __post_init__(self) -> None:  # one canonical form, whoever built it
        object.__setattr__(self, "coeff_modulus_bits", tuple(int(b) for b in self.coeff_modulus_bits))
        object.__setattr__(self, "galois_steps", tuple(sorted(int(s) for s in self.galois_steps)))

    @classmethod
    def from_json(cls, d: dict) -> "KeyInfo":
        return cls(**d)
