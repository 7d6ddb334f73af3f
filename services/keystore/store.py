"""The key store's core, transport-free: upload, verify, record, read, list, expire.

Layout in the object store (the same on S3 and on disk):

    keys/<key_id>               the key bytes, once per content (metadata: sha256, size)
    owners/<owner>/<key_id>     the owner's record (JSON: parameters, created, expires, labels)
    refs/<key_id>/<owner>       empty marker: who holds this key id

The content is shared, ownership is per owner: two tenants who upload identical
bytes get the same key id and one stored object, but each has its own record
(expiry, labels) and deleting one record leaves the other owner's key intact; the
bytes go when the last record goes. `refs/` lets the inference service (role
"service") find a key by id alone, and lets a delete know whether anyone else still
holds the bytes.

Visibility: a tenant sees only its own records. Another owner's key id answers
NOT_FOUND exactly as an unknown one does, so ids do not leak whose keys exist.
Expired records are invisible at once and removed by `cleanup()`.

Writes go ref -> bytes -> record, and deletes record -> ref -> bytes, so a crash
leaves at worst an unreferenced object that `cleanup()` removes later, never a
record without its bytes. Within one key-store process, puts and deletes of one
owner and one key id are serialized by locks (a multi-replica deployment could race
a delete of one owner against another owner's upload of the same bytes; run one
replica per bucket).

Damage found on read: bytes that fail their SHA-256, cannot be read back, or are
missing answer DATA_LOSS, and the key id is then removed for every owner (records,
refs, bytes), so Stat, List and Get agree that it is gone (NOT_FOUND from then on)
and the owner's next upload stores good bytes again. A record that is not valid
JSON answers DATA_LOSS on Stat and Get, is left out of List, is overwritten by an
upload and removed by DeleteKeys (which then answers deleted=True).

Bounded work per key id: concurrent reads of one key id share one download
(single flight), so one bad or slow key holds one storage thread, not all of them;
the health probe has threads of its own.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import functools
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

from prometheus_client import Counter, Gauge

from encinfer.common.auth import Principal
from encinfer.common.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from encinfer.he.keyinfo import KeyInfo, check_key_id
from encinfer.keystore.config import KeyStoreConfig
from encinfer.keystore.parser import ParserPool
from encinfer.keystore.record import KeyRecord
from encinfer.keystore.storage import DISK_FULL, READ_SIZE, CorruptObject, ObjectStore, disk_full

log = logging.getLogger(__name__)

MAX_CHUNK = 1024 * 1024          # the wire contract: chunks of at most 1 MiB, both ways
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 1000
MAX_LABELS, MAX_LABEL_KEY, MAX_LABEL_VALUE = 32, 63, 256
MIN_TRANSFER_RATE = 8 * 1024 * 1024  # bytes/s assumed when sizing a big transfer's deadline
ORPHAN_GRACE = 600.0             # an object without its record is left alone this long (uploads in flight)
SPOOL_MAX_AGE = 24 * 3600.0      # spool files older than this are leftovers of a crash
MIN_SPOOL_FREE = 1024 * 1024     # health is NOT_SERVING while the spool disk has less free than this

LABEL_KEY = re.compile(r"^[A-Za-z0-9._/-]+$")

KEY_BYTES = Counter("encinfer_keystore_bytes_total", "Key bytes received and sent", ["direction"])
KEYS_REJECTED = Counter("encinfer_keystore_rejected_total", "Uploads refused, by status code", ["code"])
BACKEND_UP = Gauge("encinfer_keystore_backend_up", "1 while the storage backend answers its health probe")
SPOOL_FULL = Counter("encinfer_keystore_spool_full_total",
                     "Uploads and downloads refused because the spool disk was full")
SPOOL_FREE = Gauge("encinfer_keystore_spool_free_bytes", "Free bytes on the spool disk at the last health probe")
KEYS_DAMAGED = Counter("encinfer_keystore_damaged_total",
                       "Key ids found damaged in storage (altered, unreadable or missing bytes) and removed")


@dataclass(frozen=True)
class PutHeader:
    labels: dict[str, str] = field(default_factory=dict)
    expected_size: int = 0  # 0 = unknown
    ttl_seconds: int = 0    # 0 = the configured default


@dataclass(frozen=True)
class _Spooled:
    path: Path
    size: int
    sha256: str
    seconds: float  # receiving took this long


class FetchedKey:
    """A key whose bytes were read from storage and verified; streams them from a spool file.

    Reading everything before sending anything is what makes a tampered object an
    error rather than data: the caller gets DATA_LOSS before the first byte.
    `release` (default: delete the file) runs once, on close.
    """

    def __init__(self, record: KeyRecord, path: Path, release: Callable[[], None] | None = None) -> None:
        self.record, self.path = record, path
        self._release: Callable[[], None] | None = release or (lambda: path.unlink(missing_ok=True))

    async def chunks(self, size: int = MAX_CHUNK) -> AsyncIterator[bytes]:
        with open(self.path, "rb") as f:  # noqa: ASYNC230 - a local spool file, read a chunk at a time
            while chunk := f.read(size):
                KEY_BYTES.labels("out").inc(len(chunk))
                yield chunk

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    async def __aenter__(self) -> FetchedKey:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class _Flight:
    """One download of a key id, shared by its concurrent readers; the file goes with the last one."""

    def __init__(self, task: asyncio.Future) -> None:
        self.task, self.readers = task, 0
        self.path: Path | None = None

    def release(self) -> None:
        self.readers -= 1
        if self.readers == 0 and self.path is not None:
            self.path.unlink(missing_ok=True)


class _KeyedLocks:
    """One asyncio.Lock per name, created on demand and dropped when unused."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = defaultdict(int)

    @asynccontextmanager
    async def hold(self, *names: str):
        # Callers always pass (owner, key id) in that order, so there is no lock cycle.
        for name in names:
            self._users[name] += 1
        acquired: list[asyncio.Lock] = []
        try:
            for name in names:
                lock = self._locks.setdefault(name, asyncio.Lock())
                await lock.acquire()
                acquired.append(lock)
            yield
        finally:
            for lock in reversed(acquired):
                lock.release()
            for name in names:
                self._users[name] -= 1
                if not self._users[name]:
                    del self._users[name]
                    self._locks.pop(name, None)


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} labels; at most {MAX_LABELS} are allowed")
    for k, v in labels.items():
        if not (0 < len(k) <= MAX_LABEL_KEY and LABEL_KEY.match(k)):
            raise InvalidArgument(f"label key {k[:80]!r}: 1 to {MAX_LABEL_KEY} of A-Z a-z 0-9 . _ / -")
        if len(v) > MAX_LABEL_VALUE:
            raise InvalidArgument(f"label {k!r}: value longer than {MAX_LABEL_VALUE} characters")
    return dict(labels)


def encode_owner(owner: str) -> str:
    # One safe path segment on S3 and on disk ("." too, so ".." can never be a segment).
    return quote(owner, safe="").replace(".", "%2E")


def page_token(key_id: str) -> str:
    return base64.urlsafe_b64encode(bytes.fromhex(key_id)).decode().rstrip("=")


def parse_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise InvalidArgument("malformed page_token: pass back the next_page_token of a previous reply")
    return raw.hex()


class KeyStore:
    """Upload, verify, record, read, list and expire keys over one `ObjectStore`.

    `inspect` parses and validates an uploaded file (default:
    encinfer.he.keys.inspect_key_bundle); `clock` is injectable so expiry is testable.
    """

    def __init__(self, backend: ObjectStore, config: KeyStoreConfig, *,
                 inspect: Callable[[Path], object] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.backend, self.config, self.clock = backend, config, clock
        self._inspect_fn = inspect
        self.spool_dir = config.spool_dir
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        # Storage calls run here, so a hung backend cannot starve the loop's default executor;
        # the health probe has its own threads, so it never queues behind requests.
        self._io_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="keystore-io")
        self._probe_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="keystore-probe")
        self._flights: dict[str, _Flight] = {}
        self._damaged: set[str] = set()  # key ids whose stored bytes an upload must rewrite
        self.probe_error = ""            # why the last health probe failed ("" = it did not)
        # One parse at a time, in a child process (encinfer.keystore.parser); injected fakes in a thread.
        self._inspect_pool = ParserPool(in_process=inspect is not None)
        self._locks = _KeyedLocks()

    def close(self) -> None:
        self._io_pool.shutdown(wait=False, cancel_futures=True)
        self._probe_pool.shutdown(wait=False, cancel_futures=True)
        self._inspect_pool.close()
        self.backend.close()

    # ------------------------------------------------------------ plumbing

    async def _io(self, fn: Callable, *args, timeout: float | None = None, pool: ThreadPoolExecutor | None = None):
        """One storage call in a thread, bounded by the backend deadline."""
        deadline = timeout or self.config.backend_timeout
        future = asyncio.get_running_loop().run_in_executor(pool or self._io_pool, functools.partial(fn, *args))
        try:
            return await asyncio.wait_for(future, deadline)
        except TimeoutError:
            raise Unavailable(f"storage backend did not answer within {deadline:.1f} s") from None

    def _transfer_deadline(self, size: int) -> float:
        return self.config.backend_timeout + size / MIN_TRANSFER_RATE

    def _spool_error(self, e: OSError) -> Exception:
        """A spool write that failed: RESOURCE_EXHAUSTED for a full disk, UNAVAILABLE otherwise."""
        if e.errno in DISK_FULL:
            SPOOL_FULL.inc()
            log.error("spool disk full", extra={"fields": {"spool_dir": str(self.spool_dir), "error": str(e)}})
            return disk_full(str(self.spool_dir), e)
        return Unavailable(f"key store spool at {self.spool_dir} cannot be written: {e.strerror or e}")

    def _spool_file(self, prefix: str) -> Path:
        try:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=self.spool_dir)
        except OSError as e:
            raise self._spool_error(e) from None
        os.close(fd)
        return Path(name)

    def _check_spool_room(self, size: int) -> None:
        """Refuses a transfer of `size` bytes up front when the spool disk cannot hold it."""
        try:
            st = os.statvfs(self.spool_dir)
        except OSError:
            return  # the write itself will say what is wrong
        free = st.f_bavail * st.f_frsize
        if size > free:
            raise self._spool_error(OSError(errno.ENOSPC, f"{size} bytes needed, {free} free"))

    @staticmethod
    def _blob(kid: str) -> str:
        return f"keys/{kid}"

    @staticmethod
    def _record_name(owner: str, kid: str) -> str:
        return f"owners/{encode_owner(owner)}/{kid}"

    @staticmethod
    def _ref(kid: str, owner: str) -> str:
        return f"refs/{kid}/{encode_owner(owner)}"

    async def _read_record(self, name: str) -> KeyRecord | None:
        data = await self._io(self.backend.read_bytes, name)
        if data is None:
            return None
        try:
            return KeyRecord.from_bytes(data)
        except (ValueError, KeyError, TypeError) as e:
            log.error("unreadable key record", extra={"fields": {"object": name, "error": str(e)}})
            raise DataLoss(f"the record of key {name.rsplit('/', 1)[-1]} is corrupted in storage") from None

    async def _readable_record(self, name: str) -> KeyRecord | None:
        """The record, or None when it is missing or corrupted (for writers, who replace it)."""
        try:
            return await self._read_record(name)
        except DataLoss:
            return None

    async def _inspect(self, path: Path) -> KeyInfo:
        inspect = self._inspect_fn
        if inspect is None:
            from encinfer.he import keys as he_keys
            inspect = he_keys.inspect_key_bundle
        return await self._inspect_pool.run(inspect, path)

    async def warm_up(self) -> None:
        """Starts the parser process and imports the parser ahead of the first upload (TenSEAL takes a moment)."""
        if self._inspect_fn is None:
            from encinfer.keystore.parser import preload
            await self._inspect_pool.run(preload)

    def _ttl(self, ttl_seconds: int) -> int:
        if ttl_seconds == 0:
            return self.config.default_ttl
        if ttl_seconds > self.config.max_ttl:
            raise InvalidArgument(f"ttl_seconds {ttl_seconds} exceeds the maximum of {self.config.max_ttl}")
        return ttl_seconds

    # ------------------------------------------------------------ operations

    async def probe(self) -> bool:
        """True when the backend answers (creating the bucket or directories if needed) and
        the spool disk can be written; `probe_error` says why not."""
        try:
            await self._io(self.backend.ensure_ready, pool=self._probe_pool)
            await self._io(self.backend.check, pool=self._probe_pool)
        except (Unavailable, ResourceExhausted, OSError) as e:
            BACKEND_UP.set(0)
            self.probe_error = f"storage backend unreachable: {e}"
            log.debug("backend probe failed", extra={"fields": {"error": str(e)}})
            return False
        BACKEND_UP.set(1)
        self.probe_error = await asyncio.get_running_loop().run_in_executor(self._probe_pool, self._probe_spool)
        return not self.probe_error

    def _probe_spool(self) -> str:
        """'' when the spool disk takes a small file and has MIN_SPOOL_FREE free; else why not."""
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            st = os.statvfs(self.spool_dir)
            free = st.f_bavail * st.f_frsize
            SPOOL_FREE.set(free)
            with tempfile.TemporaryFile(prefix="probe-", dir=self.spool_dir) as f:
                f.write(b"\0" * 4096)  # no fsync: a probe every 2 s must stay cheap; statvfs says "full"
                f.flush()
        except OSError as e:
            reason = "disk full" if e.errno in DISK_FULL else "cannot be written"
            return f"key store spool {reason} at {self.spool_dir}: {e.strerror or e}"
        if free < MIN_SPOOL_FREE:
            return f"key store spool disk full at {self.spool_dir}: {free} bytes free, need {MIN_SPOOL_FREE}"
        return ""

    async def put(self, principal: Principal, header: PutHeader, chunks: AsyncIterator[bytes]) -> KeyRecord:
        """Spools, hashes and validates an upload, then stores it under its SHA-256.

        Uploading bytes the owner already holds stores nothing new: it renews the
        expiry and replaces the labels (`created` stays the first upload's time).
        """
        try:
            labels = check_labels(header.labels)
            ttl = self._ttl(header.ttl_seconds)
            if header.expected_size > self.config.max_key_bytes:
                raise ResourceExhausted(f"expected_size {header.expected_size} is over the key size limit "
                                        f"of {self.config.max_key_bytes} bytes")
            self._check_spool_room(header.expected_size)
            spool = await self._receive(chunks, header.expected_size)
        except (InvalidArgument, ResourceExhausted) as e:
            KEYS_REJECTED.labels(e.code).inc()
            raise
        try:
            return await self._commit(principal.owner, spool, labels, ttl)
        except (InvalidArgument, ResourceExhausted) as e:
            KEYS_REJECTED.labels(e.code).inc()
            raise
        finally:
            spool.path.unlink(missing_ok=True)

    async def _receive(self, chunks: AsyncIterator[bytes], expected: int) -> _Spooled:
        """Writes the stream to a spool file, hashing as it goes, stopping at the first byte over a limit."""
        limit = self.config.max_key_bytes
        path = self._spool_file("put-")
        digest, size, ok, start = hashlib.sha256(), 0, False, time.perf_counter()
        try:
            try:
                with open(path, "wb") as f:  # noqa: ASYNC230 - a local spool file, written a chunk at a time
                    async for chunk in chunks:
                        if len(chunk) > MAX_CHUNK:
                            raise InvalidArgument(f"chunk of {len(chunk)} bytes; chunks are at most {MAX_CHUNK} bytes")
                        size += len(chunk)
                        if size > limit:
                            raise ResourceExhausted(f"key is over the size limit of {limit} bytes")
                        if expected and size > expected:
                            raise InvalidArgument(f"more bytes than the expected_size of {expected}")
                        digest.update(chunk)
                        f.write(chunk)
            except OSError as e:  # the close's flush can hit a full disk too
                raise self._spool_error(e) from None
            if size == 0:
                raise InvalidArgument("no key bytes were sent")
            if expected and size != expected:
                raise InvalidArgument(f"stream ended after {size} of {expected} bytes: the upload is truncated")
            ok = True
            KEY_BYTES.labels("in").inc(size)
            return _Spooled(path, size, digest.hexdigest(), time.perf_counter() - start)
        finally:
            if not ok:
                path.unlink(missing_ok=True)

    async def _commit(self, owner: str, spool: _Spooled, labels: dict[str, str], ttl: int) -> KeyRecord:
        kid = spool.sha256
        record_name = self._record_name(owner, kid)
        async with self._locks.hold(f"owner:{owner}", f"key:{kid}"):
            now = self.clock()
            existing = await self._readable_record(record_name)  # a corrupted record is overwritten
            renewing = existing is not None and existing.live(now)
            if not renewing:
                await self._check_quota(owner, kid, now)
            await self._io(self.backend.put_bytes, self._ref(kid, owner), b"", {})
            blob = await self._io(self.backend.head, self._blob(kid))
            # Bytes found damaged are rewritten even when an object of the right size is there
            # (removing them may have failed).
            new_bytes = blob is None or blob.size != spool.size or kid in self._damaged
            t0 = time.perf_counter()
            # Parsing (CPU here) and storing (I/O, mostly the storage server's CPU) overlap:
            # on S3 that hides most of the parse. Bytes that fail to parse are removed again.
            store = asyncio.ensure_future(self._io(
                self.backend.put_file, self._blob(kid), spool.path, spool.size,
                {"sha256": kid, "size": str(spool.size)}, timeout=self._transfer_deadline(spool.size))
            ) if new_bytes else None
            try:
                # Parameters are a function of the bytes: an earlier record of these bytes has them.
                parameters = existing.parameters if existing else await self._inspect(spool.path)
                t1 = time.perf_counter()
                if store is not None:
                    await store
            except BaseException:
                if store is not None:
                    await asyncio.gather(store, return_exceptions=True)
                if existing is None:
                    await self._undo_upload(owner, kid)
                raise
            record = KeyRecord(
                key_id=kid, size_bytes=spool.size, sha256=kid, parameters=parameters, owner=owner,
                created=existing.created if renewing and existing is not None else now, expires=now + ttl,
                labels=labels)
            await self._io(self.backend.put_bytes, record_name, record.to_bytes(), {})
            if new_bytes:
                self._damaged.discard(kid)
        log.info("key stored", extra={"fields": {
            "key_id": kid, "owner": owner, "size_bytes": spool.size, "new_bytes": new_bytes, "renewed": renewing,
            "receive_ms": round(spool.seconds * 1000, 1), "parse_ms": round((t1 - t0) * 1000, 1),
            "store_ms": round((time.perf_counter() - t0) * 1000, 1)}})
        return record

    async def _undo_upload(self, owner: str, kid: str) -> None:
        """Takes back the ref (and the bytes, when no one else holds them) of a refused upload."""
        try:
            await self._io(self.backend.delete, self._ref(kid, owner))
            if not await self._io(self.backend.list, f"refs/{kid}/", "", 1):
                await self._io(self.backend.delete, self._blob(kid))
        except Unavailable:
            pass  # storage is down: cleanup() removes the leftovers later

    async def _check_quota(self, owner: str, kid: str, now: float) -> None:
        limit = self.config.max_keys_per_owner
        prefix = f"owners/{encode_owner(owner)}/"
        names = [n for n in await self._io(self.backend.list, prefix, "", None) if n != prefix + kid]
        if len(names) < limit:
            return
        live = 0
        for name in names:  # expired records still on storage do not count
            try:
                record = await self._read_record(name)
            except DataLoss:
                continue
            live += bool(record and record.live(now))
        if live >= limit:
            raise ResourceExhausted(f"owner {owner!r} holds {live} keys, the limit is {limit}: "
                                    f"delete some or let them expire")

    async def _find(self, principal: Principal, kid: str) -> KeyRecord | None:
        now = self.clock()
        own = await self._read_record(self._record_name(principal.owner, kid))
        if own is not None and own.live(now):
            return own
        if not principal.is_service:
            return None
        # The service role may read any owner's key: find a live record through refs/.
        for ref in await self._io(self.backend.list, f"refs/{kid}/", "", None):
            owner = unquote(ref.rsplit("/", 1)[-1])
            try:
                record = await self._read_record(self._record_name(owner, kid))
            except DataLoss:
                continue
            if record is not None and record.live(now):
                return record
        return None

    async def stat(self, principal: Principal, key_id: str, owner: str = "") -> KeyRecord:
        """The record of a live key the caller may see; NOT_FOUND otherwise, DATA_LOSS while
        the record itself is corrupted (an upload overwrites it, a delete removes it).

        `owner` (service role): that owner's record only -- identical bytes can be held
        by several tenants, and the inference service checks the caller's own."""
        kid = check_key_id(key_id)
        if owner and owner != principal.owner:
            principal.require_service()
            record = await self._read_record(self._record_name(owner, kid))
            if record is None or not record.live(self.clock()):
                raise NotFound(f"key {kid} not found for owner {owner!r}")
            return record
        record = await self._find(principal, kid)
        if record is None:
            raise NotFound(f"key {kid} not found (unknown, expired, deleted, or not yours)")
        return record

    async def fetch(self, principal: Principal, key_id: str, owner: str = "") -> FetchedKey:
        """Reads and verifies a key's bytes; use as `async with await store.fetch(...) as key`.

        `owner` as in stat(): the inference service names the tenant it fetches for, so a first
        fetch costs two storage reads (that record, the bytes). Concurrent fetches of one key
        id share one download (and one spool file)."""
        record = await self.stat(principal, key_id, owner)
        kid = record.key_id
        flight = self._flights.get(kid)
        if flight is None:
            flight = _Flight(asyncio.ensure_future(self._download_verified(kid, record.size_bytes)))
            self._flights[kid] = flight
            flight.task.add_done_callback(functools.partial(self._landed, kid, flight))
        flight.readers += 1
        try:
            path = await asyncio.shield(flight.task)
        except BaseException:
            flight.release()
            raise
        return FetchedKey(record, path, release=flight.release)

    def _landed(self, kid: str, flight: _Flight, task: asyncio.Future) -> None:
        """Runs first when a download ends: later fetches start a new one; unclaimed files go."""
        if self._flights.get(kid) is flight:
            del self._flights[kid]
        if task.cancelled() or task.exception() is not None:
            return
        flight.path = task.result()
        if flight.readers == 0:  # every reader gave up while it ran
            flight.path.unlink(missing_ok=True)

    async def _download_verified(self, kid: str, size: int) -> Path:
        """The key's bytes in a new spool file, verified against their id and size; DATA_LOSS if damaged."""
        self._check_spool_room(size)
        path, stop, start = self._spool_file("get-"), threading.Event(), time.perf_counter()
        try:
            try:
                result = await self._io(self._download, self._blob(kid), path, stop,
                                        timeout=self._transfer_deadline(size))
            except CorruptObject as e:
                removed = await self._discard_damaged(kid, "unreadable", str(e))
                raise DataLoss(f"key {kid} cannot be read back from storage (the stored object is corrupted)"
                               f"{removed}; upload the key again") from None
            if result is None:
                if await self._io(self.backend.degraded):
                    # A distributed MinIO missing a node's drives can answer "no such object" for one
                    # it holds: an answer to retry, never a reason to remove the key.
                    raise Unavailable(f"object storage cannot find the bytes of key {kid} while it is degraded "
                                      "(MinIO reports no write quorum); the key is kept: retry once storage "
                                      "has recovered")
                removed = await self._discard_damaged(kid, "missing", "no object")
                raise DataLoss(f"the bytes of key {kid} are missing from storage{removed}; upload the key again")
            got, digest = result
            if digest != kid or got != size:
                removed = await self._discard_damaged(kid, "altered", f"stored sha256 {digest}, size {got}")
                raise DataLoss(f"key {kid} failed its SHA-256 check: the stored object was altered{removed}; "
                               f"upload the key again")
        except BaseException:
            stop.set()  # a download still running in its thread stops at its next chunk
            path.unlink(missing_ok=True)
            raise
        log.info("key read and verified", extra={"fields": {
            "key_id": kid, "size_bytes": got, "read_ms": round((time.perf_counter() - start) * 1000, 1)}})
        return path

    def _download(self, name: str, path: Path, stop: threading.Event) -> tuple[int, str] | None:
        """Copies an object into the spool file at `path`, hashing it; stops early once `stop` is set."""
        try:
            out = open(path, "r+b")  # never re-creates a file the caller already gave up and removed
        except FileNotFoundError:
            raise Unavailable("the download was given up before it started") from None
        with out:
            reader = self.backend.open(name)
            if reader is None:
                return None
            digest, size = hashlib.sha256(), 0
            try:
                while not stop.is_set() and (chunk := reader.read(READ_SIZE)):
                    digest.update(chunk)
                    try:
                        out.write(chunk)
                    except OSError as e:
                        raise self._spool_error(e) from None
                    size += len(chunk)
                try:
                    out.flush()
                except OSError as e:
                    raise self._spool_error(e) from None
            finally:
                reader.close()
        return size, digest.hexdigest()

    async def _discard_damaged(self, kid: str, how: str, detail: str) -> str:
        """Removes a damaged key id for every owner (records, refs, bytes), so Stat, List and Get
        agree it is gone and the next upload stores good bytes; says how that went, for the message."""
        KEYS_DAMAGED.inc()
        self._damaged.add(kid)
        owners: list[str] = []
        try:
            async with self._locks.hold(f"key:{kid}"):
                if how == "missing" and await self._io(self.backend.head, self._blob(kid)) is not None:
                    self._damaged.discard(kid)
                    return " (it has been uploaded again since)"
                for ref in await self._io(self.backend.list, f"refs/{kid}/", "", None):
                    owner = unquote(ref.rsplit("/", 1)[-1])
                    await self._io(self.backend.delete, self._record_name(owner, kid))
                    await self._io(self.backend.delete, ref)
                    owners.append(owner)
                await self._io(self.backend.delete, self._blob(kid))
        except (Unavailable, DataLoss) as e:
            log.error("damaged key found; removing it failed, the next upload rewrites it", extra={"fields": {
                "key_id": kid, "damage": how, "detail": detail, "error": str(e)}})
            return " (removing the damaged key failed; an upload rewrites it)"
        log.error("damaged key found in storage and removed; its owners must upload it again", extra={"fields": {
            "key_id": kid, "damage": how, "detail": detail, "owners": owners}})
        return ", and the key was removed"

    async def delete(self, principal: Principal, key_id: str) -> bool:
        """Deletes the caller's own record; True if a live key (or a corrupted record) was deleted.

        Idempotent: an unknown, expired or other owner's key id answers False (and
        the other owner's key is untouched). The bytes go with the last record.
        """
        kid = check_key_id(key_id)
        owner = principal.owner
        async with self._locks.hold(f"owner:{owner}", f"key:{kid}"):
            try:
                record = await self._read_record(self._record_name(owner, kid))
                corrupted = False
            except DataLoss:
                record, corrupted = None, True  # a corrupted record is removed like any other
            if record is None and not corrupted:
                return False
            await self._remove(owner, kid)
        log.info("key deleted", extra={"fields": {"key_id": kid, "owner": owner, "corrupted_record": corrupted}})
        return corrupted or (record is not None and record.live(self.clock()))

    async def _remove(self, owner: str, kid: str) -> None:
        """Record, then ref, then the bytes if no owner holds them any more (caller holds the locks)."""
        await self._io(self.backend.delete, self._record_name(owner, kid))
        await self._io(self.backend.delete, self._ref(kid, owner))
        if not await self._io(self.backend.list, f"refs/{kid}/", "", 1):
            await self._io(self.backend.delete, self._blob(kid))

    async def list(self, principal: Principal, page_size: int = 0, token: str = "") -> tuple[list[KeyRecord], str]:
        """One page of the caller's own live keys, in key-id order, and the next page's token."""
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
        after = parse_page_token(token)
        prefix = f"owners/{encode_owner(principal.owner)}/"
        names = await self._io(self.backend.list, prefix, prefix + after if after else "", None)
        now, page = self.clock(), []
        for i, name in enumerate(names):
            try:
                record = await self._read_record(name)
            except DataLoss:
                continue  # logged; one bad record must not hide the others
            if record is not None and record.live(now):
                page.append(record)
            if len(page) == size:
                more = i + 1 < len(names)
                return page, page_token(name.rsplit("/", 1)[-1]) if more else ""
        return page, ""

    async def cleanup(self) -> dict[str, int]:
        """Removes expired records, objects left by interrupted uploads, and stale spool files."""
        now = self.clock()
        counts = {"expired": 0, "orphan_refs": 0, "orphan_blobs": 0, "spool_files": 0}
        for name in await self._io(self.backend.list, "owners/", "", None):
            _, enc_owner, kid = name.split("/")
            owner = unquote(enc_owner)
            async with self._locks.hold(f"owner:{owner}", f"key:{kid}"):
                try:
                    record = await self._read_record(name)
                except DataLoss:
                    continue  # left for an operator to look at; it is invisible anyway
                if record is not None and not record.live(now):
                    await self._remove(owner, kid)
                    counts["expired"] += 1
        for name in await self._io(self.backend.list, "refs/", "", None):
            _, kid, enc_owner = name.split("/")
            owner = unquote(enc_owner)
            async with self._locks.hold(f"owner:{owner}", f"key:{kid}"):
                if await self._io(self.backend.head, self._record_name(owner, kid)) is None:
                    info = await self._io(self.backend.head, name)
                    if info is not None and info.modified < now - ORPHAN_GRACE:
                        await self._io(self.backend.delete, name)
                        counts["orphan_refs"] += 1
        for name in await self._io(self.backend.list, "keys/", "", None):
            kid = name.split("/")[1]
            async with self._locks.hold(f"key:{kid}"):
                if not await self._io(self.backend.list, f"refs/{kid}/", "", 1):
                    info = await self._io(self.backend.head, name)
                    if info is not None and info.modified < now - ORPHAN_GRACE:
                        await self._io(self.backend.delete, name)
                        counts["orphan_blobs"] += 1
        for path in self.spool_dir.glob("*-*"):
            try:
                if path.stat().st_mtime < time.time() - SPOOL_MAX_AGE:
                    path.unlink()
                    counts["spool_files"] += 1
            except FileNotFoundError:
                pass
        if any(counts.values()):
            log.info("cleanup", extra={"fields": counts})
        return counts
