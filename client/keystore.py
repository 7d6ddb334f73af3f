"""KeyStoreClient: put, get, stat, delete and list public key bundles on the key store.

Streams in 1 MiB chunks both ways, so a 50 MB Galois key set never sits in one
message; verifies every download's SHA-256 against its key id; raises the
project's errors (`encinfer.common.errors`: NotFound, InvalidArgument,
Unavailable, ...) instead of raw gRPC ones.

    from encinfer.client.keystore import KeyStoreClient

    with KeyStoreClient("127.0.0.1:50051", token="s3cret") as ks:
        record = ks.put("keys.bin", labels={"model": "mnist"})
        print(record.key_id, record.expires)
        data = ks.get(record.key_id)            # bytes, verified
        ks.get(record.key_id, dest="copy.bin")  # or straight to a file
        for r in ks.list():
            print(r.key_id, r.size_bytes)
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from encinfer.common import errors
from encinfer.common.auth import auth_metadata
from encinfer.common.routing import client_options, key_id_metadata
from encinfer.common.rpc import TlsFiles, channel
from encinfer.keystore.record import KeyRecord
from encinfer.v1 import keystore_pb2 as pb
from encinfer.v1 import keystore_pb2_grpc as pb_grpc

CHUNK = 1024 * 1024  # the wire contract's maximum chunk

Progress = Callable[[int], object]  # called with the number of bytes just sent or received


def error_from_rpc(e: grpc.RpcError) -> errors.EncinferError:
    """The project error for a failed call, carrying the status code's name and the server's message."""
    code = e.code() if hasattr(e, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    return errors.from_status(name, (e.details() if hasattr(e, "details") else None) or "")


# Transfers without a caller's deadline get this long plus one second per this many bytes:
# a 20 MB key gets 30 + 40 s; pass transfer_timeout for slower links.
TRANSFER_BASE_SECONDS = 30.0
TRANSFER_MIN_BYTES_PER_SECOND = 512 * 1024


class KeyStoreClient:
    """A connection to the key store; use as a context manager (closes the channel).

    `timeout` bounds the small calls (stat, delete, list); uploads and downloads
    are bounded by `transfer_timeout`, or when it is None by a deadline that grows
    with the key's size (TRANSFER_BASE_SECONDS + size / TRANSFER_MIN_BYTES_PER_SECOND).
    Every method also takes `timeout=` for that one call. Failures are
    `encinfer.common.errors` classes, never grpc's.
    """

    def __init__(self, target: str, token: str | None = None, tls: TlsFiles | None = None, *,
                 timeout: float = 30.0, transfer_timeout: float | None = None) -> None:
        self.target = target
        self._channel = channel(target, tls, options=client_options())
        self._stub = pb_grpc.KeyStoreStub(self._channel)
        self._metadata = auth_metadata(token)
        self.timeout, self.transfer_timeout = timeout, transfer_timeout

    def transfer_deadline(self, size: int) -> float:
        """Seconds an upload or download of `size` bytes may take."""
        if self.transfer_timeout is not None:
            return self.transfer_timeout
        return TRANSFER_BASE_SECONDS + size / TRANSFER_MIN_BYTES_PER_SECOND

    def _small(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def close(self) -> None:
        self._channel.close()

    def _keyed(self, key_id: str) -> list[tuple[str, str]]:
        """The call's metadata with its key id for routing (encinfer.common.routing)."""
        return [*self._metadata, *key_id_metadata(key_id)]

    def __enter__(self) -> KeyStoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, data_or_path: bytes | bytearray | memoryview | str | os.PathLike,
            labels: dict[str, str] | None = None, ttl_seconds: int = 0,
            progress: Progress | None = None, timeout: float | None = None) -> KeyRecord:
        """Uploads a key bundle (bytes, or a file path streamed from disk) and returns its record.

        The key id is the SHA-256 of the bytes: uploading the same bytes again stores
        nothing new and renews the expiry (`ttl_seconds`, 0 = the server's default).

            record = ks.put(Path("keys.bin"), labels={"model": "mnist"}, ttl_seconds=86400)
        """
        if isinstance(data_or_path, (bytes, bytearray, memoryview)):
            view = memoryview(data_or_path).cast("B")
            size, chunks = len(view), (bytes(view[i:i + CHUNK]) for i in range(0, len(view), CHUNK))
            return self._put(size, chunks, labels, ttl_seconds, progress, timeout)
        path = Path(data_or_path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return self._put(size, iter(lambda: f.read(CHUNK), b""), labels, ttl_seconds, progress, timeout)

    def _put(self, size: int, chunks: Iterator[bytes], labels, ttl_seconds: int, progress,
             timeout: float | None) -> KeyRecord:
        digest = hashlib.sha256()
        failed: list[BaseException] = []

        def requests() -> Iterator[pb.PutKeysRequest]:
            yield pb.PutKeysRequest(header=pb.PutKeysHeader(labels=labels or {}, expected_size=size,
                                                            ttl_seconds=ttl_seconds))
            try:
                for chunk in chunks:
                    digest.update(chunk)
                    yield pb.PutKeysRequest(chunk=chunk)
                    if progress:
                        progress(len(chunk))
            except Exception as e:  # noqa: BLE001 - re-raised below as itself, not as grpc's UNKNOWN
                failed.append(e)  # ending here sends fewer bytes than announced: the server refuses them
        try:
            reply = self._stub.PutKeys(requests(), metadata=self._metadata,
                                       timeout=timeout if timeout is not None else self.transfer_deadline(size))
        except grpc.RpcError as e:
            if failed:
                raise failed[0] from None
            raise error_from_rpc(e) from None
        if failed:
            raise failed[0]
        # The key id is the hash of what the server stored: it must be the hash of what we sent.
        # (A flipped bit inside key material can parse as a valid key; only this catches it.)
        if reply.key_id != digest.hexdigest():
            raise errors.DataLoss(f"the key store stored other bytes than were sent (key id {reply.key_id}, "
                                  f"sent {digest.hexdigest()}); upload again")
        return KeyRecord.from_pb(reply)

    def get(self, key_id: str, dest: str | os.PathLike | None = None,
            progress: Progress | None = None, timeout: float | None = None) -> bytes | Path:
        """Downloads a key: its bytes, or with `dest` the path of the file written (atomically).

        The SHA-256 is checked here too: a mismatch raises DataLoss and leaves no file.

            data = ks.get(key_id)
            path = ks.get(key_id, dest="keys.bin")
        """
        kid = key_id.strip().lower()
        if timeout is None and self.transfer_timeout is None:
            timeout = self.transfer_deadline(self._record(kid).size_bytes)  # the size its record states
        elif timeout is None:
            timeout = self.transfer_timeout
        assert timeout is not None  # one of the two branches above set it
        if dest is None:
            parts: list[bytes] = []
            self._download(kid, parts.append, progress, timeout)
            return b"".join(parts)
        dest = Path(dest)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                self._download(kid, f.write, progress, timeout)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def _download(self, kid: str, sink: Callable[[bytes], object], progress: Progress | None,
                  timeout: float) -> KeyRecord:
        digest, size, record = hashlib.sha256(), 0, None
        call = self._stub.GetKeys(pb.GetKeysRequest(key_id=kid), metadata=self._keyed(kid), timeout=timeout)
        try:
            for message in call:
                if message.WhichOneof("msg") == "record":
                    record = KeyRecord.from_pb(message.record)
                    continue
                if record is None:
                    raise errors.DataLoss("the key store sent key bytes before the key's record")
                digest.update(message.chunk)
                size += len(message.chunk)
                sink(message.chunk)
                if progress:
                    progress(len(message.chunk))
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        finally:
            call.cancel()  # a no-op after a complete stream; frees the call on an early exit
        if record is None:
            raise errors.DataLoss("the key store ended the stream without the key's record")
        if digest.hexdigest() != kid or record.sha256 != kid or size != record.size_bytes:
            raise errors.DataLoss(f"key {kid} arrived with a wrong SHA-256 or size; nothing was kept")
        return record

    def _record(self, key_id: str, timeout: float | None = None) -> KeyRecord:
        try:
            return KeyRecord.from_pb(self._stub.StatKeys(pb.StatKeysRequest(key_id=key_id),
                                                         metadata=self._keyed(key_id), timeout=self._small(timeout)))
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def stat(self, key_id: str, timeout: float | None = None) -> KeyRecord | None:
        """The key's record, or None when the key store has no live key by this id for you.

        The cheap way to decide whether to upload again:

            record = ks.stat(key_id)
            if record is None or record.expires_in() < 3600:
                ks.put(bundle)
        """
        try:
            return self._record(key_id, timeout)
        except errors.NotFound:
            return None

    def delete(self, key_id: str, timeout: float | None = None) -> bool:
        """Deletes your key; False when there was no live key of yours by this id."""
        try:
            return self._stub.DeleteKeys(pb.DeleteKeysRequest(key_id=key_id), metadata=self._keyed(key_id),
                                         timeout=self._small(timeout)).deleted
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def list(self, page_size: int = 0, timeout: float | None = None) -> Iterator[KeyRecord]:
        """Your live keys, in key-id order, fetched page by page as you iterate (`timeout`: per page)."""
        token = ""
        while True:
            try:
                reply = self._stub.ListKeys(pb.ListKeysRequest(page_size=page_size, page_token=token),
                                            metadata=self._metadata, timeout=self._small(timeout))
            except grpc.RpcError as e:
                raise error_from_rpc(e) from None
            for r in reply.keys:
                yield KeyRecord.from_pb(r)
            token = reply.next_page_token
            if not token:
                return
