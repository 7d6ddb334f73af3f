"""A key's record: what the key store keeps about a key, and the one place where it
becomes JSON (in storage) or a protobuf message (on the wire, both ways), shared by the
key store, the inference service and the client library.

Times are epoch seconds (the store's clock arithmetic and its JSON); `created_at` and
`expires_at` give them as aware datetimes for people.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from time import time

from google.protobuf.timestamp_pb2 import Timestamp

from encinfer.he.keyinfo import KeyInfo
from encinfer.v1 import keystore_pb2 as pb


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    size_bytes: int
    sha256: str
    parameters: KeyInfo  # what parsing the upload told (encinfer.he.keys)
    owner: str
    created: float  # epoch seconds
    expires: float
    labels: dict[str, str] = field(default_factory=dict)

    def live(self, now: float) -> bool:
        return now < self.expires

    def expires_in(self) -> float:
        """Seconds until expiry (negative once expired)."""
        return self.expires - time()

    @property
    def created_at(self) -> datetime:
        return datetime.fromtimestamp(self.created, UTC)

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.expires, UTC)

    # ------------------------------------------------------------ storage
    def to_bytes(self) -> bytes:
        return json.dumps({"version": 1, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyRecord:
        d = json.loads(data)
        d.pop("version", None)
        d["parameters"] = KeyInfo.from_json(d["parameters"])
        return cls(**d)

    # ------------------------------------------------------------ wire
    def to_pb(self) -> pb.KeyRecord:
        p = self.parameters
        return pb.KeyRecord(
            key_id=self.key_id, size_bytes=self.size_bytes, sha256=self.sha256, owner=self.owner,
            created=_timestamp(self.created), expires=_timestamp(self.expires), labels=self.labels,
            parameters=pb.KeyParameters(
                scheme=p.scheme, poly_modulus_degree=p.poly_modulus_degree, coeff_modulus_bits=p.coeff_modulus_bits,
                has_public_key=p.has_public_key, has_relin_keys=p.has_relin_keys, galois_steps=p.galois_steps,
                has_conjugation_key=p.has_conjugation_key, format=p.format))

    @classmethod
    def from_pb(cls, r: pb.KeyRecord) -> KeyRecord:
        p = r.parameters
        return cls(
            key_id=r.key_id, size_bytes=r.size_bytes, sha256=r.sha256, owner=r.owner,
            created=r.created.ToNanoseconds() / 1e9, expires=r.expires.ToNanoseconds() / 1e9, labels=dict(r.labels),
            parameters=KeyInfo(
                scheme=p.scheme, poly_modulus_degree=p.poly_modulus_degree,
                coeff_modulus_bits=tuple(p.coeff_modulus_bits), has_public_key=p.has_public_key,
                has_relin_keys=p.has_relin_keys, galois_steps=tuple(p.galois_steps),
                has_conjugation_key=p.has_conjugation_key, format=p.format))


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
