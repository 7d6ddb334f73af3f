"""What a key bundle holds, as the key store records it: no SEAL import, so the key
store's records and the client library can use it without loading TenSEAL."""
from __future__ import annotations

import re
from dataclasses import dataclass

from encinfer.common.errors import InvalidArgument

FORMAT = "encinfer-keys-v1"
KEY_ID = re.compile(r"[0-9a-f]{64}")


def check_key_id(key_id: str) -> str:
    """A key id in its one form: the 64 lower-case hex digits of the bundle's SHA-256, as the key
    store returned it on upload (upper case is forgiven: a hash is a hash; anything else is not)."""
    kid = (key_id or "").lower()
    if not KEY_ID.fullmatch(kid):  # fullmatch: "$" alone would accept a trailing newline
        raise InvalidArgument(f"malformed key id {(key_id or '')[:80]!r}: expected the 64 hex characters "
                              "(a SHA-256) the key store returned on upload")
    return kid


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
    def from_json(cls, d: dict) -> KeyInfo:
        return cls(**d)
