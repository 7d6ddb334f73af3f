"""Public keys for the inference service, fetched from the key store over gRPC with
the service's own token (never from the bucket), checked against the model before
any compute, and cached: records are re-checked now and then (a deleted or expired
key stops working), bytes are shared by concurrent first requests (one fetch).
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass

import grpc

from encinfer.common.auth import Principal, auth_metadata
from encinfer.common.errors import (DataLoss, EncinferError, FailedPrecondition, InvalidArgument, NotFound,
                                    PermissionDenied, Unavailable)
from encinfer.common.rpc import TlsFiles, channel
from encinfer.he.params import CkksParams
from encinfer.inference.cache import ByteLRU
from encinfer.v1 import keystore_pb2, keystore_pb2_grpc

log = logging.getLogger(__name__)

KEY_ID = re.compile(r"[0-9a-f]{64}")


def check_key_id(key_id: str) -> None:
    if not KEY_ID.fullmatch(key_id or ""):  # fullmatch: "$" alone accepts a trailing newline
        raise InvalidArgument("key_id must be the 64 hex characters the key store returned on upload")


def check_key_fits(params: keystore_pb2.KeyParameters, needed: CkksParams, layout: str) -> None:
    """FAILED_PRECONDITION, with what to do, when a key cannot serve this model layout."""
    if params.poly_modulus_degree != needed.poly_modulus_degree or \
            list(params.coeff_modulus_bits) != list(needed.coeff_modulus_bits):
        raise FailedPrecondition(
            f"key parameters (N={params.poly_modulus_degree}, moduli {list(params.coeff_modulus_bits)}) do not "
            f"match the model's {layout} layout (N={needed.poly_modulus_degree}, moduli "
            f"{list(needed.coeff_modulus_bits)}); generate keys from GetModelInfo")
    missing = sorted(set(needed.galois_steps) - set(params.galois_steps))
    if missing:
        raise FailedPrecondition(f"key lacks Galois keys for rotation steps {missing} that the {layout} layout "
                                 "needs; generate keys from GetModelInfo")
    if needed.needs_conjugation_key and not params.has_conjugation_key:
        raise FailedPrecondition(f"key lacks the conjugation key the {layout} layout needs")
    if needed.needs_public_key and not params.has_public_key:
        raise FailedPrecondition(f"key lacks the public key the {layout} layout needs (answers are re-randomized "
                                 "with it); generate keys from GetModelInfo")
    if needed.needs_relin_keys and not params.has_relin_keys:
        raise FailedPrecondition(f"key lacks relinearization keys the {layout} layout needs")


@dataclass
class _Entry:
    record: keystore_pb2.KeyRecord
    checked: float


class KeySource:
    def __init__(self, target: str, token: str, tls: TlsFiles | None, timeout: float,
                 cache_bytes: int, recheck_seconds: float) -> None:
        self.target = target
        self._channel = channel(target, tls, aio=True)
        self._stub = keystore_pb2_grpc.KeyStoreStub(self._channel)
        self._metadata = auth_metadata(token)
        self.timeout = timeout
        self.recheck_seconds = recheck_seconds
        self._records: dict[tuple[str, str], _Entry] = {}
        self._bytes: ByteLRU[str, bytes] = ByteLRU(cache_bytes, size_of=len, name="server-bytes")
        self._inflight: dict[str, asyncio.Task] = {}

    async def close(self) -> None:
        await self._channel.close()

    async def record(self, key_id: str, principal: Principal, auth_enabled: bool) -> keystore_pb2.KeyRecord:
        """The caller's own record of the key: a tenant predicts only with keys it uploaded.

        Asked per (key, owner): identical bytes (a batch-layout key is the parameters
        only) may be held by several tenants, each with its own record and expiry."""
        check_key_id(key_id)
        owner = principal.owner if auth_enabled and not principal.is_service else ""
        slot = (key_id, owner)
        entry = self._records.get(slot)
        now = time.monotonic()
        if entry is None or now - entry.checked > self.recheck_seconds:
            try:
                rec = await self._call(self._stub.StatKeys(
                    keystore_pb2.StatKeysRequest(key_id=key_id, owner=owner),
                    metadata=self._metadata, timeout=self.timeout), key_id)
            except Unavailable:
                if entry is None:
                    raise
                log.warning("key store unreachable; using the cached key record", extra={"fields": {"key_id": key_id}})
                rec = entry.record
            except NotFound:
                self._records.pop(slot, None)
                if owner and await self._exists(key_id):
                    raise PermissionDenied(f"key {key_id} belongs to another tenant; use a key id you uploaded") from None
                raise
            entry = self._records[slot] = _Entry(rec, now)
        if entry.record.expires.seconds and entry.record.expires.seconds < time.time():
            raise NotFound(f"key {key_id} has expired; upload it again")
        return entry.record

    async def _exists(self, key_id: str) -> bool:
        try:
            await self._call(self._stub.StatKeys(keystore_pb2.StatKeysRequest(key_id=key_id),
                                                 metadata=self._metadata, timeout=self.timeout), key_id)
            return True
        except NotFound:
            self._bytes.pop(key_id)
            return False

    async def data(self, key_id: str) -> bytes:
        """The key bytes; concurrent callers for one key id share one fetch."""
        cached = self._bytes.get(key_id)
        if cached is not None:
            return cached
        task = self._inflight.get(key_id)
        if task is None:
            task = asyncio.ensure_future(self._fetch(key_id))
            self._inflight[key_id] = task
            task.add_done_callback(lambda _: self._inflight.pop(key_id, None))
        return await asyncio.shield(task)

    async def _fetch(self, key_id: str) -> bytes:
        import hashlib

        call = self._stub.GetKeys(keystore_pb2.GetKeysRequest(key_id=key_id), metadata=self._metadata,
                                  timeout=self.timeout)
        record, parts = None, []
        try:
            async for msg in call:
                if msg.HasField("record"):
                    record = msg.record
                else:
                    parts.append(msg.chunk)
        except grpc.aio.AioRpcError as e:
            raise _translate(e, key_id) from None
        data = b"".join(parts)
        if record is None or hashlib.sha256(data).hexdigest() != record.sha256 or record.key_id != key_id:
            raise DataLoss(f"key {key_id} arrived from the key store with a wrong checksum")
        self._bytes.put(key_id, data)
        log.info("key fetched", extra={"fields": {"key_id": key_id, "bytes": len(data)}})
        return data

    async def _call(self, coro, key_id: str):
        try:
            return await coro
        except grpc.aio.AioRpcError as e:
            raise _translate(e, key_id) from None


def _translate(e: grpc.aio.AioRpcError, key_id: str) -> EncinferError:
    code = e.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"key {key_id} is not in the key store (never uploaded, deleted or expired)")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"the key store is unreachable ({code.name}); retry shortly")
    if code == grpc.StatusCode.DATA_LOSS:
        return DataLoss(f"the key store found key {key_id} corrupted; upload it again")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        log.error("the key store refused the inference service's credentials", extra={"fields": {"code": code.name}})
        return Unavailable("the inference service cannot read keys (its key-store credentials were refused)")
    return Unavailable(f"the key store answered {code.name}: {e.details()}")
