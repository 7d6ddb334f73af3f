"""The client's CKKS secret key: generate, save (owner-only), load, encrypt, decrypt.

Layout-neutral: the latency and batch layouts both build on it. Only public
material ever leaves it, through `public_bundle()` (parameters plus exactly the
evaluation keys the parameters ask for, in SEAL's seeded form).

File format ("encinfer-secret-v1"): magic, u32 LE length + JSON {"params": ...},
u64 LE length + SEAL SecretKey.
"""
from __future__ import annotations

import json
import logging
import os
import secrets as _random
import stat
import struct
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal

from encinfer.common.errors import InvalidArgument
from encinfer.common.files import write_atomic
from encinfer.he import serial
from encinfer.he.keys import build_key_bundle
from encinfer.he.params import CkksParams

log = logging.getLogger(__name__)

FORMAT = "encinfer-secret-v1"
_MAGIC = b"encinfer-secret1"
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class SecretKeys:
    """A secret key with its parameters. Never serialize it anywhere but `save`.

    >>> from encinfer.he.params import CkksParams
    >>> sk = SecretKeys.generate(CkksParams(4096, (58, 51), 25, 50, galois_steps=(1,)))
    >>> bundle = sk.public_bundle()          # upload this, keep sk
    """

    def __init__(self, params: CkksParams, secret_key: seal.SecretKey) -> None:
        self.params = params
        self.context = params.context()
        self._secret_key = secret_key
        self.encoder = seal.CKKSEncoder(self.context)
        self._encryptor = seal.Encryptor(self.context, secret_key)
        self._decryptor = seal.Decryptor(self.context, secret_key)

    def __repr__(self) -> str:  # never the key itself
        return f"SecretKeys(N={self.params.poly_modulus_degree}, moduli={list(self.params.coeff_modulus_bits)})"

    @classmethod
    def generate(cls, params: CkksParams) -> SecretKeys:
        return cls(params, seal.KeyGenerator(params.context()).secret_key())

    # ------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Writes the key to `path` with mode 0600, atomically.

        The file is created 0600 under a temporary name in the same directory and
        renamed over `path`, so it is never readable by others, not even briefly,
        and an interrupted save leaves the old file intact.
        """
        path = Path(path)
        meta = json.dumps({"format": FORMAT, "params": self.params.to_json()}, sort_keys=True).encode()
        key = _secret_key_bytes(self._secret_key)
        write_atomic(path, _MAGIC + _U32.pack(len(meta)) + meta + _U64.pack(len(key)) + key, mode=0o600)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SecretKeys:
        """Reads a file written by `save`; InvalidArgument when it is not one."""
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read()
        except OSError as e:
            raise InvalidArgument(f"cannot read secret key file {os.fspath(path)!r}: {e.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("secret key file is readable by others; chmod 600 it",
                        extra={"fields": {"path": os.fspath(path), "mode": oct(stat.S_IMODE(mode))}})
        what = f"{os.fspath(path)!r} is not an encinfer secret key file"
        if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _U32.size:
            raise InvalidArgument(what)
        pos = len(_MAGIC)
        (n,) = _U32.unpack_from(data, pos)
        pos += _U32.size
        try:
            meta = json.loads(data[pos:pos + n])
            params = CkksParams.from_json(meta["params"])
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(f"{what} (bad header: {e})") from None
        pos += n
        if len(data) < pos + _U64.size:
            raise InvalidArgument(f"{what} (truncated)")
        (k,) = _U64.unpack_from(data, pos)
        pos += _U64.size
        if len(data) != pos + k:
            raise InvalidArgument(f"{what} (truncated or padded)")
        return cls(params, _secret_key_from(data[pos:], params))

    # ------------------------------------------------------------ public material
    def public_bundle(self, *, include_public_key: bool | None = None) -> bytes:
        """The encinfer-keys-v1 bundle to upload: parameters and the evaluation keys they need.

        Galois keys only for params.galois_steps (plus conjugation when asked for),
        one per section, seeded; relinearization keys only when needed. A public key
        only when the parameters ask for one (the server re-randomizes answers with it):
        the client itself encrypts with the secret key (seeded, half size).
        """
        if include_public_key is None:
            include_public_key = self.params.needs_public_key
        keygen = seal.KeyGenerator(self.context, self._secret_key)
        galois = {elt: serial.dump(keygen.create_galois_keys([elt])) for elt in self.params.galois_elements()}
        relin = serial.dump(keygen.create_relin_keys()) if self.params.needs_relin_keys else None
        public = None
        if include_public_key and self.params.needs_public_key:
            from encinfer.he.coeff import make_public_key  # with the common `a` the server insists on
            public = make_public_key(self.params, self._secret_key)
        elif include_public_key:  # sealapi does not expose the seeded form of a public key
            public_key = seal.PublicKey()
            keygen.create_public_key(public_key)
            public = serial.dump(public_key)
        return build_key_bundle(serial.dump(self.params.seal_parameters()), public_key=public,
                                relin_keys=relin, galois_keys=galois)

    # ------------------------------------------------------------ encrypt / decrypt
    def encrypt_symmetric(self, plaintext: seal.Plaintext) -> bytes:
        """A seeded symmetric encryption of `plaintext` (half the bytes of a public-key one)."""
        try:
            return serial.dump(self._encryptor.encrypt_symmetric(plaintext))
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidArgument(f"cannot encrypt this plaintext: {e}") from None

    def coefficients(self) -> np.ndarray:
        """The secret polynomial's coefficients (int8 in {-1, 0, 1}, one prime's worth).

        For layouts whose answers the client decrypts itself from coefficient arrays
        (encinfer.he.coeff). SEAL keeps the key in NTT form; it is turned back through a
        ciphertext's memory (c0 = the key, c1 = 1) and transform_from_ntt. Computed once.
        """
        cached = getattr(self, "_coefficients", None)
        if cached is None:
            from encinfer.he.coeff import secret_coefficients
            cached = self._coefficients = secret_coefficients(self.context, self._secret_key)
        return cached

    def decrypt(self, data: bytes) -> seal.Plaintext:
        """Decrypts a serialized ciphertext at any level; InvalidArgument when it is not one."""
        ciphertext = serial.load(lambda: seal.Ciphertext(self.context), data, self.context, "ciphertext")
        return self.decrypt_ciphertext(ciphertext)

    def decrypt_ciphertext(self, ciphertext: seal.Ciphertext) -> seal.Plaintext:
        plain = seal.Plaintext()
        try:
            self._decryptor.decrypt(ciphertext, plain)
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidArgument(f"cannot decrypt this ciphertext: {e}") from None
        return plain


def _secret_key_bytes(secret_key: seal.SecretKey) -> bytes:
    """SEAL writes files only: through the 0700 scratch directory, removed at once."""
    path = serial.scratch_dir() / f"sk-{_random.token_hex(6)}"
    try:
        secret_key.save(str(path))
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


def _secret_key_from(data: bytes, params: CkksParams) -> seal.SecretKey:
    path = serial.scratch_dir() / f"sk-{_random.token_hex(6)}"
    try:
        path.write_bytes(data)
        return serial.load_file(seal.SecretKey, path, params.context(), "secret key")
    finally:
        path.unlink(missing_ok=True)
