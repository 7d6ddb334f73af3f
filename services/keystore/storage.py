"""Storage backends: a small object-store interface with two implementations.

`S3ObjectStore` (the minio SDK, production) and `FsObjectStore` (a local directory,
the embedded default) offer the same few calls on flat object names; everything
key-store specific (layout, records, ownership, expiry) lives in store.py on top,
so both backends behave the same by construction and one test suite covers both.

The calls are synchronous (the minio SDK is); the core runs them in threads with a
deadline. Both raise `Unavailable` when the storage cannot be reached, so a dead
backend is a clear status, never a hang or an INTERNAL; `CorruptObject` when the
storage is fine but one object cannot be read back (a bit flipped on MinIO's disk);
`ResourceExhausted` when the local disk is full.
"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from encinfer.common.errors import ConfigError, DataLoss, InvalidArgument, ResourceExhausted, Unavailable
from encinfer.keystore.config import KeyStoreConfig, S3Settings

log = logging.getLogger(__name__)

# Multipart part size for key uploads to S3: 16 MiB (S3's minimum is 5 MiB), parts sent
# one after the other. minio-py holds each part in memory, so a key of any size costs
# 16 MiB of buffers; parallel parts measured no faster here (the write overlaps the
# parse, which takes longer) and cost 16 MiB more each.
PART_SIZE = 16 * 1024 * 1024
PARALLEL_PARTS = 1
READ_SIZE = 1024 * 1024


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CorruptObject(DataLoss):
    """The storage answers, but this one object cannot be read back as it was written."""


def disk_full(where: str, e: OSError) -> ResourceExhausted:
    """The error for a write refused by a full disk (or an exhausted quota) under `where`."""
    return ResourceExhausted(f"key store spool disk full at {where}: {e.strerror or e}; "
                             f"free space there (or point ENCINFER_KEYSTORE_DATA_DIR at a bigger disk)")


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    metadata: dict[str, str]
    modified: float  # epoch seconds


class ObjectReader(Protocol):
    def read(self, n: int) -> bytes: ...
    def close(self) -> None: ...


class ObjectStore(Protocol):
    """What the key store needs from storage. Metadata: lowercase ASCII keys and values."""

    kind: str

    def ensure_ready(self) -> None:
        """Creates the bucket/directories when missing; Unavailable if it cannot."""

    def check(self) -> None:
        """A cheap reachability probe for health; Unavailable when not usable."""

    def put_file(self, name: str, path: Path, size: int, metadata: dict[str, str]) -> None:
        """Stores the file's bytes; `path` stays readable (the caller deletes it)."""

    def put_bytes(self, name: str, data: bytes, metadata: dict[str, str]) -> None: ...

    def head(self, name: str) -> ObjectInfo | None: ...

    def read_bytes(self, name: str) -> bytes | None:
        """A small object's bytes, or None when it does not exist."""

    def open(self, name: str) -> ObjectReader | None:
        """A reader for a big object (close it!), or None when it does not exist."""

    def delete(self, name: str) -> None:
        """Removes the object; a missing object is not an error."""

    def list(self, prefix: str, start_after: str = "", limit: int | None = None) -> list[str]:
        """Names under prefix, sorted, strictly after start_after, at most limit."""

    def degraded(self) -> bool:
        """True while the storage itself says it is not whole (a distributed MinIO without its
        write quorum): then a missing object may be a node's absence, not a loss."""

    def close(self) -> None: ...


def open_backend(config: KeyStoreConfig) -> ObjectStore:
    if config.backend == "s3":
        return S3ObjectStore(config.s3, timeout=config.backend_timeout)
    return FsObjectStore(config.data_dir)


# ---------------------------------------------------------------- filesystem


class FsObjectStore:
    """Objects as files under <root>/objects, metadata in a sidecar under <root>/meta.

    An object exists when its sidecar exists: data is written first and the sidecar
    last, both atomically (temp file in <root>/tmp, fsync, os.replace), and delete
    removes the sidecar first, so a reader never sees half an object.
    """

    kind = "fs"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects, self.meta, self.tmp = self.root / "objects", self.root / "meta", self.root / "tmp"

    def ensure_ready(self) -> None:
        try:
            for d in (self.objects, self.meta, self.tmp):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Unavailable(f"cannot create the key store directory {self.root}: {e.strerror}") from None

    def check(self) -> None:
        if not (os.access(self.objects, os.W_OK) and os.access(self.meta, os.W_OK) and os.access(self.tmp, os.W_OK)):
            raise Unavailable(f"key store directory {self.root} is missing or not writable")

    def _paths(self, name: str) -> tuple[Path, Path]:
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise InvalidArgument(f"bad object name {name!r}")
        return self.objects.joinpath(*parts), self.meta.joinpath(*parts[:-1], parts[-1] + ".json")

    def _atomic_write(self, target: Path, write) -> None:
        tmp = self.tmp / f"w-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            self._replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _replace(src: Path, target: Path) -> None:
        # A concurrent delete may remove the (empty) parent between mkdir and replace.
        for attempt in range(3):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(src, target)
                return
            except FileNotFoundError:
                if attempt == 2 or not src.exists():
                    raise

    def _io(self, what: str, fn, *args):
        try:
            return fn(*args)
        except (InvalidArgument, FileNotFoundError):
            raise
        except OSError as e:
            if e.errno in DISK_FULL:
                raise disk_full(str(self.root), e) from None
            raise Unavailable(f"key store directory: {what} failed: {e.strerror or e}") from None

    def _put(self, name: str, write_data, metadata: dict[str, str]) -> None:
        data, meta = self._paths(name)
        self._atomic_write(data, write_data)
        sidecar = json.dumps({"metadata": metadata}).encode()
        self._atomic_write(meta, lambda f: f.write(sidecar))

    def put_file(self, name: str, path: Path, size: int, metadata: dict[str, str]) -> None:
        def put() -> None:
            data, meta = self._paths(name)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            # The spool file lives in <root>/tmp: a hard link and a rename, no copy, and the
            # spool path stays valid for the parser running alongside.
            link = self.tmp / f"l-{uuid.uuid4().hex}"
            os.link(path, link)
            try:
                self._replace(link, data)
            finally:
                link.unlink(missing_ok=True)
            sidecar = json.dumps({"metadata": metadata}).encode()
            self._atomic_write(meta, lambda f: f.write(sidecar))
        self._io("write", put)

    def put_bytes(self, name: str, data: bytes, metadata: dict[str, str]) -> None:
        self._io("write", self._put, name, lambda f: f.write(data), metadata)

    def head(self, name: str) -> ObjectInfo | None:
        data, meta = self._paths(name)
        try:
            sidecar = json.loads(meta.read_bytes())
            st = data.stat()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise Unavailable(f"key store directory: cannot read {name}: {e}") from None
        return ObjectInfo(name=name, size=st.st_size, metadata=dict(sidecar.get("metadata", {})), modified=st.st_mtime)

    def read_bytes(self, name: str) -> bytes | None:
        data, meta = self._paths(name)
        if not meta.exists():
            return None
        try:
            return data.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise Unavailable(f"key store directory: cannot read {name}: {e.strerror}") from None

    def open(self, name: str) -> ObjectReader | None:
        data, meta = self._paths(name)
        if not meta.exists():
            return None
        try:
            return open(data, "rb")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise Unavailable(f"key store directory: cannot read {name}: {e.strerror}") from None

    def delete(self, name: str) -> None:
        data, meta = self._paths(name)
        try:
            meta.unlink(missing_ok=True)
            data.unlink(missing_ok=True)
        except OSError as e:
            raise Unavailable(f"key store directory: cannot delete {name}: {e.strerror}") from None
        for base, leaf in ((self.meta, meta), (self.objects, data)):
            self._prune(base, leaf.parent)

    @staticmethod
    def _prune(base: Path, d: Path) -> None:
        # Empty directories left by deleted objects go too (a race with a writer is
        # handled in _replace).
        while d != base and base in d.parents:
            try:
                d.rmdir()
            except OSError:
                return
            d = d.parent

    def list(self, prefix: str, start_after: str = "", limit: int | None = None) -> list[str]:
        # Walk only the directory the prefix points into, then filter: names are few per prefix.
        head, _, _ = prefix.rpartition("/")
        base = self.meta.joinpath(*head.split("/")) if head else self.meta
        names: list[str] = []
        try:
            for dirpath, _dirs, files in os.walk(base):
                rel = Path(dirpath).relative_to(self.meta).as_posix()
                for f in files:
                    if not f.endswith(".json"):
                        continue
                    name = (f[:-5] if rel == "." else f"{rel}/{f[:-5]}")
                    if name.startswith(prefix) and name > start_after:
                        names.append(name)
        except OSError as e:
            raise Unavailable(f"key store directory: cannot list {prefix}: {e.strerror}") from None
        names.sort()
        return names if limit is None else names[:limit]

    def degraded(self) -> bool:
        return False

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- S3 / MinIO


# MinIO's answers that it cannot serve a call just now (cmd/api-errors.go): no write or read
# quorum for a moment after a node died (SlowDownWrite, SlowDownRead: also what a corrupt
# object answers, which therefore persists), S3's generic SlowDown, a node still starting.
BUSY_CODES = frozenset({"SlowDownWrite", "SlowDownRead", "SlowDown", "XMinioServerNotInitialized"})


class S3ObjectStore:
    """An S3 bucket through the minio SDK (keyword arguments only, as minio 8 requires).

    Its urllib3 pool has short timeouts and bounded retries, so a stopped or hung
    MinIO turns into Unavailable within about the configured deadline instead of
    minio-py's default 5 minutes with 5 retries.

    A bit flipped in one of MinIO's parts (measured, MinIO single drive): a GET whose
    first block fails its bitrot check answers `503 SlowDownRead` with `Retry-After: 60`
    (MinIO's name for "insufficient read quorum"); a later block fails mid-body, after
    a 200, as a broken connection at the same offset every time. Both are also what
    lost drives or a dying server look like, so the object is called corrupt only when
    MinIO's cluster read-health endpoint says the cluster itself can read (200), and a
    broken body is resumed once from where it broke before it counts.
    """

    kind = "s3"

    def __init__(self, settings: S3Settings, timeout: float) -> None:
        import certifi
        import urllib3
        from minio import Minio
        from minio.helpers import check_bucket_name

        try:
            check_bucket_name(settings.bucket)
        except ValueError:
            raise ConfigError(f"ENCINFER_S3_BUCKET={settings.bucket!r} is not a valid bucket name "
                              "(3-63 characters: a-z 0-9 . -)") from None
        self.settings, self.bucket, self.timeout = settings, settings.bucket, timeout
        # urllib3 warns on every retried connection: during an outage the health probe
        # and our own UNAVAILABLE lines already say it, once.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout, 2.0), read=timeout),
            maxsize=16,
            cert_reqs="CERT_REQUIRED",
            ca_certs=settings.ca_file or certifi.where(),
            # One retry for a refused/reset connection or a 5xx, none after a read timeout:
            # a retried slow read would double the deadline. Never sleep a server's
            # Retry-After (MinIO says 60 s for a corrupt object) inside our deadline, and
            # hand the last 5xx to minio-py so its S3 error code can be classified.
            retries=urllib3.Retry(total=2, connect=1, read=0, status=1, backoff_factor=0.1,
                                  status_forcelist=(500, 502, 503, 504),
                                  respect_retry_after_header=False, raise_on_status=False),
        )
        self.client = Minio(
            endpoint=settings.endpoint,
            access_key=settings.access_key or None,
            secret_key=settings.secret_key or None,
            secure=settings.secure,
            region=settings.region or None,
            http_client=self._http,
        )

    def _call(self, what: str, fn, *args, busy_retry: bool = False, **kwargs):
        """Runs one SDK call, turning storage failures into Unavailable (missing objects: None).

        busy_retry (the data calls, all idempotent here: objects are named by content or
        replaced whole): MinIO's answers that it cannot serve a call for a moment
        (SlowDownWrite or SlowDownRead while a node that just died still counts for its
        quorum, a node still starting) are retried with backoff for up to 80% of the
        deadline, which stays the bound of the whole call; a connection that broke after
        the request was sent (a node killed behind a proxy) is tried once more. So an
        object is called corrupt only when it stays unreadable that long while MinIO
        says the cluster can read, never in the seconds after a node died."""
        import urllib3
        from minio.error import MinioException, S3Error

        give_up, delay, broke = time.monotonic() + 0.8 * self.timeout, 0.1, False
        while True:
            try:
                return fn(*args, **kwargs)
            except S3Error as e:
                if not (busy_retry and e.code in BUSY_CODES and time.monotonic() + delay < give_up):
                    return self._refused(what, e)
                log.info("object storage busy; retrying", extra={"fields": {"doing": what, "code": e.code}})
            except (urllib3.exceptions.HTTPError, OSError, MinioException) as e:
                reason = getattr(e, "reason", None) or e
                if not (busy_retry and not broke and isinstance(reason, urllib3.exceptions.ProtocolError)
                        and time.monotonic() + delay < give_up):
                    raise Unavailable(f"object storage at {self.settings.endpoint} unreachable during {what}: "
                                      f"{type(reason).__name__}") from None
                broke = True
            time.sleep(delay)
            delay = min(2 * delay, 1.0)

    def _refused(self, what: str, e) -> None:
        """An S3 error answer: None for a missing object, otherwise the error it stands for."""
        if e.code in ("NoSuchKey", "NoSuchObject"):
            return None
        if e.code == "SlowDownRead" and self.cluster_readable():
            raise CorruptObject(f"object storage cannot read {e.object_name or what} back "
                                f"({e.code}: {e.message}) although the cluster can read: "
                                f"the stored object is corrupted") from None
        raise Unavailable(f"object storage refused {what}: {e.code}: {e.message}") from None

    def degraded(self) -> bool:
        """MinIO's cluster health endpoint answering 503 (no write quorum); anything else, including
        a storage that is not MinIO (no such endpoint), is not a proof of a degraded cluster."""
        return self._health("/minio/health/cluster") == 503

    def cluster_readable(self) -> bool:
        """True when MinIO's read-health endpoint says the cluster has read quorum (never retried)."""
        return self._health("/minio/health/cluster/read") == 200

    def _health(self, path: str) -> int | None:
        """The status of one MinIO health endpoint, or None when it cannot be asked (never retried)."""
        scheme = "https" if self.settings.secure else "http"
        try:
            return self._http.request("GET", f"{scheme}://{self.settings.endpoint}{path}", timeout=2.0,
                                      retries=False).status
        except Exception:  # noqa: BLE001 - unreachable, or not MinIO: the caller's own call says so
            return None

    def ensure_ready(self) -> None:
        def ensure() -> None:
            from minio.error import S3Error
            if self.client.bucket_exists(bucket_name=self.bucket):
                return
            try:
                self.client.make_bucket(bucket_name=self.bucket, location=self.settings.region or None)
                log.info("created bucket", extra={"fields": {"bucket": self.bucket}})
            except S3Error as e:
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self._call("bucket creation", ensure)

    def check(self) -> None:
        if not self._call("health check", self.client.bucket_exists, bucket_name=self.bucket):
            raise Unavailable(f"bucket {self.bucket} does not exist")

    def put_file(self, name: str, path: Path, size: int, metadata: dict[str, str]) -> None:
        def put() -> None:
            with open(path, "rb") as f:
                self.client.put_object(bucket_name=self.bucket, object_name=name, data=f, length=size,
                                       metadata=metadata,  # type: ignore[arg-type]  # minio: dict of str|list|tuple
                                       part_size=PART_SIZE,
                                       num_parallel_uploads=PARALLEL_PARTS)
        self._call("upload", put, busy_retry=True)

    def put_bytes(self, name: str, data: bytes, metadata: dict[str, str]) -> None:
        def put() -> None:  # a fresh stream for every attempt
            self.client.put_object(bucket_name=self.bucket, object_name=name, data=io.BytesIO(data),
                                   length=len(data), metadata=metadata)  # type: ignore[arg-type]
        self._call("write", put, busy_retry=True)

    def head(self, name: str) -> ObjectInfo | None:
        st = self._call("stat", self.client.stat_object, busy_retry=True, bucket_name=self.bucket, object_name=name)
        if st is None:
            return None
        meta = {k.lower()[len("x-amz-meta-"):]: v for k, v in (st.metadata or {}).items()
                if k.lower().startswith("x-amz-meta-")}
        return ObjectInfo(name=name, size=int(st.size or 0), metadata=meta,
                          modified=st.last_modified.timestamp() if st.last_modified else 0.0)

    def read_bytes(self, name: str) -> bytes | None:
        def read() -> bytes | None:
            response = self._call("read", self.client.get_object, busy_retry=True, bucket_name=self.bucket,
                                  object_name=name)
            if response is None:
                return None
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        return self._call("read", read)

    def open(self, name: str) -> ObjectReader | None:
        response = self._call("read", self.client.get_object, busy_retry=True, bucket_name=self.bucket,
                              object_name=name)
        return None if response is None else _S3Reader(self, name, response)

    def delete(self, name: str) -> None:
        self._call("delete", self.client.remove_object, busy_retry=True, bucket_name=self.bucket, object_name=name)

    def list(self, prefix: str, start_after: str = "", limit: int | None = None) -> list[str]:
        def names() -> list[str]:
            out: list[str] = []
            for obj in self.client.list_objects(bucket_name=self.bucket, prefix=prefix, recursive=True,
                                                start_after=start_after or None):
                if limit is not None and len(out) >= limit:
                    break
                out.append(obj.object_name)
            return out
        return self._call("list", names, busy_retry=True)

    def close(self) -> None:
        self._http.clear()


class _S3Reader:
    """A get_object response that is always closed and its connection released.

    A body that breaks off is resumed once from the byte where it broke; breaking
    again at that byte, with MinIO answering, means the object is corrupt there.
    """

    def __init__(self, store: S3ObjectStore, name: str, response) -> None:
        self._store, self._name, self._response = store, name, response
        self._offset, self._resumed_at = 0, -1

    def read(self, n: int) -> bytes:
        import urllib3

        while True:
            try:
                data = self._response.read(n)
            except urllib3.exceptions.ProtocolError:
                self.close()
                self._response = None
                if self._resumed_at == self._offset:
                    if self._store.cluster_readable():
                        raise CorruptObject(f"object storage breaks off {self._name} at byte {self._offset} "
                                            f"every time although the cluster can read: the stored object "
                                            f"is corrupted") from None
                    raise Unavailable(f"object storage at {self._store.settings.endpoint} broke off reading "
                                      f"{self._name}") from None
                self._resumed_at = self._offset
                self._response = self._store._call(
                    "read", self._store.client.get_object, busy_retry=True, bucket_name=self._store.bucket,
                    object_name=self._name, offset=self._offset)
                if self._response is None:
                    raise Unavailable(f"{self._name} disappeared from object storage while it was read") from None
                continue
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise Unavailable(f"object storage at {self._store.settings.endpoint} unreachable during read: "
                                  f"{type(e).__name__}") from None
            self._offset += len(data)
            return data

    def close(self) -> None:
        if self._response is None:
            return
        try:
            self._response.close()
        finally:
            self._response.release_conn()
