"""Public keys for the inference service, fetched from the key store over gRPC with
the service's own token (never from the bucket), checked against the model before
any compute, and cached.

A key-store outage is not an outage for cached keys. A cached record is re-checked
now and then (a deleted or expired key stops working), but stale-while-revalidate:
a due record is re-checked by one background call per (key, owner), a request waits
for it only a short moment (while the key store has been answering) and is otherwise
served the cached record; only a record older than a hard limit, or a NOT_FOUND or
PERMISSION answer, stops it. Uncached keys wait for one shared check and one shared
fetch per key id, and a failure that took long is shared with callers queued behind
it, so they fail together, fast, with the key store's own reason.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import grpc

from encinfer.common.auth import Principal, auth_metadata
from encinfer.common.errors import DataLoss, EncinferError, FailedPrecondition, NotFound, PermissionDenied, Unavailable
from encinfer.common.rpc import TlsFiles, channel
from encinfer.he.keyinfo import check_key_id
from encinfer.he.params import CkksParams
from encinfer.inference.cache import ByteLRU
from encinfer.v1 import keystore_pb2, keystore_pb2_grpc

if TYPE_CHECKING:
    from encinfer.inference.config import InferenceConfig

log = logging.getLogger(__name__)


# gRPC's default reconnect backoff grows toward 120 s: after a long key-store outage the
# next connection attempt came seconds after the key store was back. Loopback or LAN
# attempts are cheap, so try every half second at most; give each attempt 1 s to connect.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 1000),  # gRPC's name for the minimum connect timeout
]

# After a failed re-check the cached record is served without asking again for this long.
RETRY_SECONDS = 1.0
# A failure that took at least SLOW_SECONDS (a hung key store) is handed for HOLD_SECONDS to
# callers that arrive after it, instead of each starting a call and waiting its whole timeout.
SLOW_SECONDS = 0.5
HOLD_SECONDS = 1.0


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


class KeyStoreUnavailable(Unavailable):
    """UNAVAILABLE because of the key store; `reason` is the short why, for logs."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass
class Flight(Generic[T]):
    task: asyncio.Task[T]
    started: float


class SharedCalls(Generic[K, T]):
    """At most one call per key at a time; callers that come while it runs share its outcome.

    A call's task is independent of its callers: a caller's deadline cancels only its own
    wait (`await asyncio.shield(flight.task)`), so the result still serves the next one.
    A slow UNAVAILABLE is held for a moment: callers queued behind it (8 items of a stream
    at a time) fail at once instead of each waiting a timeout of its own."""

    def __init__(self, slow_seconds: float = SLOW_SECONDS, hold_seconds: float = HOLD_SECONDS) -> None:
        self.slow_seconds, self.hold_seconds = slow_seconds, hold_seconds
        self._flights: dict[K, Flight[T]] = {}
        self._held: dict[K, tuple[float, Flight[T]]] = {}

    def start(self, key: K, call: Callable[[], Awaitable[T]]) -> Flight[T]:
        flight = self._flights.get(key)
        if flight is not None:
            return flight
        now = time.monotonic()
        held = self._held.pop(key, None)
        if held is not None and now < held[0]:
            self._held[key] = held
            return held[1]
        flight = Flight(asyncio.ensure_future(call()), now)
        self._flights[key] = flight
        flight.task.add_done_callback(lambda task: self._landed(key, flight))
        return flight

    def running(self, key: K) -> bool:
        return key in self._flights

    def _landed(self, key: K, flight: Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if flight.task.cancelled():
            return
        exc = flight.task.exception()  # retrieved here too: no "exception was never retrieved" if nobody waited
        now = time.monotonic()
        if isinstance(exc, Unavailable) and now - flight.started >= self.slow_seconds:
            for old in [k for k, (until, _) in self._held.items() if until <= now]:
                del self._held[old]
            self._held[key] = (now + self.hold_seconds, flight)

    async def close(self) -> None:
        tasks = [f.task for f in self._flights.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._flights.clear()
        self._held.clear()


@dataclass
class _Entry:
    record: keystore_pb2.KeyRecord
    checked: float         # monotonic time of the key store's last answer for it
    retry_at: float = 0.0  # after a failed re-check: no new one before this
    outage: str = ""       # why the last re-check failed; "" while the key store answers


class _Records:
    """The key records, least recently used evicted beyond `capacity` entries."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def get(self, slot: tuple[str, str]) -> _Entry | None:
        entry = self._items.get(slot)
        if entry is not None:
            self._items.move_to_end(slot)
        return entry

    def peek(self, slot: tuple[str, str]) -> _Entry | None:
        return self._items.get(slot)

    def put(self, slot: tuple[str, str], entry: _Entry) -> None:
        self._items[slot] = entry
        self._items.move_to_end(slot)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def pop(self, slot: tuple[str, str]) -> None:
        self._items.pop(slot, None)

    def __len__(self) -> int:
        return len(self._items)


def record_owner(principal: Principal, auth_enabled: bool) -> str:
    """Whose record a request is checked against: the tenant's own ("" for the service role,
    or with auth off: any holder of the key)."""
    return principal.owner if auth_enabled and not principal.is_service else ""


class KeySource:
    def __init__(self, target: str, token: str, tls: TlsFiles | None, timeout: float,
                 cache_bytes: int, recheck_seconds: float, *, max_stale_seconds: float = 3600.0,
                 recheck_wait_seconds: float = 0.25, record_entries: int = 10_000) -> None:
        self.target = target
        self._channel = channel(target, tls, aio=True, options=RECONNECT_OPTIONS)
        self._stub = keystore_pb2_grpc.KeyStoreStub(self._channel)
        self._metadata = auth_metadata(token)
        self.timeout = timeout
        self.recheck_seconds = recheck_seconds
        self.max_stale_seconds = max_stale_seconds
        self.recheck_wait_seconds = recheck_wait_seconds
        self._records = _Records(record_entries)
        self._bytes: ByteLRU[str, bytes] = ByteLRU(cache_bytes, size_of=len, name="server-bytes")
        self._checks: SharedCalls[tuple[str, str], _Entry] = SharedCalls()
        self._fetches: SharedCalls[str, tuple[keystore_pb2.KeyRecord, bytes]] = SharedCalls()

    @classmethod
    def from_config(cls, config: InferenceConfig) -> KeySource:
        return cls(config.keystore_target, config.keystore_token, config.keystore_tls, config.keystore_timeout,
                   config.key_cache_bytes, config.key_recheck_seconds,
                   max_stale_seconds=config.key_record_max_stale_seconds,
                   recheck_wait_seconds=config.key_recheck_wait_seconds,
                   record_entries=config.key_record_cache_entries)

    async def close(self) -> None:
        await self._checks.close()
        await self._fetches.close()
        await self._channel.close()

    # ------------------------------------------------------------ records
    async def record(self, key_id: str, principal: Principal, auth_enabled: bool) -> keystore_pb2.KeyRecord:
        """The caller's own record of the key: a tenant predicts only with keys it uploaded.

        Asked per (key, owner): identical bytes (a batch-layout key is the parameters
        only) may be held by several tenants, each with its own record and expiry."""
        key_id = check_key_id(key_id)
        owner = record_owner(principal, auth_enabled)
        slot = (key_id, owner)
        entry = self._records.get(slot)
        if entry is None:
            entry = await asyncio.shield(self._checks.start(slot, lambda: self._check(slot)).task)
        elif time.monotonic() - entry.checked >= self.recheck_seconds:
            entry = await self._revalidate(slot, entry)
        if entry.record.expires.seconds and entry.record.expires.seconds < time.time():
            raise NotFound(f"key {key_id} has expired; upload it again")
        return entry.record

    async def _revalidate(self, slot: tuple[str, str], entry: _Entry) -> _Entry:
        """A due record: re-checked in the background, served unless the answer stops it."""
        now = time.monotonic()
        age = now - entry.checked
        if age > self.max_stale_seconds:
            # Too old to vouch for: wait for the check like an uncached key would.
            try:
                return await asyncio.shield(self._checks.start(slot, lambda: self._check(slot)).task)
            except Unavailable as e:
                raise Unavailable(f"{e} (the cached record of key {slot[0]} was checked {age:.0f} s ago, "
                                  f"past the {self.max_stale_seconds:g} s a record is served unchecked)") from None
        if now < entry.retry_at:
            return entry
        flight = self._checks.start(slot, lambda: self._check(slot))
        if entry.outage:
            return entry  # the key store is not answering: do not make this request wait for it
        # The key store was answering: give it a moment, so a deleted key stops at once.
        # Every request waits until the same instant, however many arrive while it runs.
        wait = flight.started + self.recheck_wait_seconds - now
        if wait > 0:
            await asyncio.wait({flight.task}, timeout=wait)
        if not flight.task.done() or flight.task.cancelled():
            return entry
        exc = flight.task.exception()
        if exc is None:
            return flight.task.result()
        if isinstance(exc, Unavailable):
            return entry
        raise exc

    async def _check(self, slot: tuple[str, str]) -> _Entry:
        """Asks the key store for the record; updates or drops the cached entry.

        A key whose bytes are not here yet is read with GetKeys, whose first message is
        the same owner's record: a first request costs one key-store call (two storage
        reads), not a StatKeys and then a GetKeys (three)."""
        key_id, owner = slot
        try:
            if self._bytes.get(key_id) is not None:  # a re-check, or another tenant's copy of the bytes
                rec = await self._call(self._stub.StatKeys(
                    keystore_pb2.StatKeysRequest(key_id=key_id, owner=owner), metadata=self._metadata,
                    timeout=self.timeout), key_id, f"checking key {key_id} with the key store")
            else:
                rec, _ = await self._fetch(key_id, owner, f"checking key {key_id} with the key store")
        except KeyStoreUnavailable as e:
            self._outage(slot, e)
            raise
        except DataLoss:
            self._records.pop(slot)  # the key store says its record is corrupted: stop vouching for it
            raise
        except NotFound:
            self._records.pop(slot)
            if owner and await self._exists(key_id):
                raise PermissionDenied(f"key {key_id} belongs to another tenant; use a key id you uploaded") from None
            raise
        old = self._records.peek(slot)
        if old is not None and old.outage:
            log.info("key store answering again; key record re-checked",
                     extra={"fields": {"key_id": key_id, "owner": owner, "outage": old.outage}})
        entry = _Entry(rec, time.monotonic())
        self._records.put(slot, entry)
        return entry

    def _outage(self, slot: tuple[str, str], error: KeyStoreUnavailable) -> None:
        entry = self._records.peek(slot)
        if entry is None:
            return
        now = time.monotonic()
        entry.retry_at = now + RETRY_SECONDS
        # one warning per key per outage, not one per request
        if not entry.outage and now - entry.checked <= self.max_stale_seconds:
            log.warning(f"key store unreachable ({error.reason}); serving cached record of key {slot[0]} "
                        f"checked {now - entry.checked:.0f} s ago",
                        extra={"fields": {"key_id": slot[0], "owner": slot[1], "reason": error.reason}})
        entry.outage = error.reason

    async def _exists(self, key_id: str) -> bool:
        try:
            await self._call(self._stub.StatKeys(keystore_pb2.StatKeysRequest(key_id=key_id),
                                                 metadata=self._metadata, timeout=self.timeout),
                             key_id, f"checking key {key_id} with the key store")
            return True
        except NotFound:
            self._bytes.pop(key_id)
            return False

    # ------------------------------------------------------------ bytes
    async def data(self, key_id: str, owner: str = "") -> bytes:
        """The key bytes, read through `owner`'s record (record_owner(); "" = any holder);
        concurrent callers for one key id share one fetch."""
        cached = self._bytes.get(key_id)
        if cached is not None:
            return cached
        return (await asyncio.shield(self._fetches.start(key_id, lambda: self._fetch(key_id, owner)).task))[1]

    async def _fetch(self, key_id: str, owner: str, doing: str = "") -> tuple[keystore_pb2.KeyRecord, bytes]:
        """`owner`'s record of the key and the key's bytes (checked against the record), cached."""
        call = self._stub.GetKeys(keystore_pb2.GetKeysRequest(key_id=key_id, owner=owner), metadata=self._metadata,
                                  timeout=self.timeout)
        record, parts = None, []
        try:
            async for msg in call:
                if msg.HasField("record"):
                    record = msg.record
                else:
                    parts.append(msg.chunk)
        except grpc.aio.AioRpcError as e:
            raise self._translate(e, key_id, doing or f"fetching key {key_id} from the key store") from None
        data = b"".join(parts)
        if record is None or hashlib.sha256(data).hexdigest() != record.sha256 or record.key_id != key_id:
            raise DataLoss(f"key {key_id} arrived from the key store with a wrong checksum")
        self._bytes.put(key_id, data)
        log.info("key fetched", extra={"fields": {"key_id": key_id, "bytes": len(data)}})
        return record, data

    # ------------------------------------------------------------ errors
    async def _call(self, coro, key_id: str, doing: str):
        try:
            return await coro
        except grpc.aio.AioRpcError as e:
            raise self._translate(e, key_id, doing) from None

    def _translate(self, e: grpc.aio.AioRpcError, key_id: str, doing: str) -> EncinferError:
        """The key store's answer as our error; UNAVAILABLE says what inference was doing and why."""
        code, details = e.code(), (e.details() or "").strip()
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(f"key {key_id} is not in the key store (never uploaded, deleted or expired)")
        if code == grpc.StatusCode.DATA_LOSS:
            return DataLoss(f"the key store found key {key_id} corrupted; upload it again")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            log.error("the key store refused the inference service's credentials",
                      extra={"fields": {"code": code.name}})
            return KeyStoreUnavailable(
                "the inference service cannot read keys (its key-store credentials were refused)",
                f"credentials refused: {code.name}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            reason = f"no answer within {self.timeout:g} s"
            message = f"the key store is unreachable: it did not answer within {self.timeout:g} s"
        elif code == grpc.StatusCode.UNAVAILABLE and self._channel.get_state() != grpc.ChannelConnectivity.READY:
            # No connection: the failure is the transport's, not an answer of the key store.
            reason = details or "no connection"
            if "timed out" in reason:  # it accepted the connection but never spoke (hung, or packets dropped)
                message = f"the key store is unreachable: it did not answer ({reason})"
            else:
                message = f"the key store is unreachable ({reason})"
        else:
            # The key store answered, e.g. UNAVAILABLE because its object storage is down:
            # its own words say what is wrong better than ours.
            reason = f"it answered {code.name}: {details}"
            message = f"the key store answered {code.name}: {details}"
        if "retry" not in message:
            message += "; retry shortly"
        return KeyStoreUnavailable(f"{doing}: {message}", reason)
