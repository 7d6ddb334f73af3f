"""Zero-copy numpy views of SEAL ciphertexts' coefficient arrays, for the layouts whose
kernels work on the words themselves (the batch layout's numpy accumulator, the
coefficient layout's answers and public keys). One reader of foreign memory, probed
against SEAL's own accessors before it is trusted."""
from __future__ import annotations

import ctypes
import functools
import logging

import numpy as np
import tenseal.sealapi as seal

from encinfer.he.params import CkksParams

log = logging.getLogger(__name__)


class CiphertextMemory:
    """Zero-copy numpy views of a seal.Ciphertext's coefficient array.

    tenseal.sealapi has no buffer access (ct.data(i) returns one coefficient per call),
    so this reads the objects' memory: pybind11 keeps the C++ object's address right
    after the Python object header (twice: value pointer and unique_ptr holder), and
    SEAL 4's Ciphertext lays out parms_id, is_ntt_form, size, poly_modulus_degree,
    coeff_modulus_size, scale, correction_factor, then its DynArray (pool handle,
    capacity, size, data pointer). `supported` checks every one of these against
    SEAL's own accessors, and a write through the view against ct.data(), once per
    process and parameter set; `view` re-checks the shape fields of each ciphertext.
    Any mismatch means another tenseal build: the model then uses the seal kernel.
    """

    _VALUE, _HOLDER = 16, 24
    _NTT, _SIZE, _DEGREE, _PRIMES, _SCALE = 32, 40, 48, 56, 64
    _DYN_CAPACITY, _DYN_SIZE, _DYN_DATA = 96, 104, 112

    @staticmethod
    def _u64(address: int) -> int:
        return ctypes.c_uint64.from_address(address).value

    @classmethod
    def _object(cls, ct: seal.Ciphertext) -> int:
        return cls._u64(id(ct) + cls._VALUE)

    @classmethod
    def view(cls, ct: seal.Ciphertext, words: int) -> np.ndarray:
        """The ciphertext's `words` uint64 coefficients, as a writable array (no copy)."""
        p = cls._object(ct)
        if cls._u64(p + cls._SIZE) != 2 or cls._u64(p + cls._DYN_SIZE) != words:
            raise RuntimeError("ciphertext memory does not have the expected shape")
        return np.ctypeslib.as_array((ctypes.c_uint64 * words).from_address(cls._u64(p + cls._DYN_DATA)))

    @classmethod
    @functools.lru_cache(maxsize=8)
    def supported(cls, params: CkksParams) -> bool:
        try:
            return cls._probe(params)
        except Exception:  # any surprise in a foreign layout means: not supported
            log.exception("SEAL memory layout probe failed")
            return False

    @classmethod
    def _probe(cls, params: CkksParams) -> bool:
        ctx = params.context()
        ct = seal.Ciphertext(ctx)
        seal.Encryptor(ctx, seal.KeyGenerator(ctx).secret_key()).encrypt_zero_symmetric(ct)
        n, k = params.poly_modulus_degree, len(params.coeff_modulus_bits)
        words = 2 * n * k
        p = cls._object(ct)
        if p == 0 or p != cls._u64(id(ct) + cls._HOLDER):
            return False
        u = cls._u64
        fields_ok = (
            [u(p + 8 * i) for i in range(4)] == list(ct.parms_id())
            and ctypes.c_uint8.from_address(p + cls._NTT).value == int(ct.is_ntt_form())
            and u(p + cls._SIZE) == ct.size() == 2
            and u(p + cls._DEGREE) == ct.poly_modulus_degree() == n
            and u(p + cls._PRIMES) == ct.coeff_modulus_size() == k
            and ctypes.c_double.from_address(p + cls._SCALE).value == ct.scale
            and u(p + cls._DYN_SIZE) == words <= u(p + cls._DYN_CAPACITY)
            and u(p + cls._DYN_DATA) != 0)
        if not fields_ok:
            return False
        data = cls.view(ct, words)
        dyn = ct.dyn_array()
        if not (data[0] == ct.data(0) and data[n * k] == ct.data(1)
                and all(data[i] == dyn.at(i) for i in (1, n - 1, n * k + 7, words - 1))):
            return False
        data[n * k] = 12345
        return ct.data(1) == 12345
