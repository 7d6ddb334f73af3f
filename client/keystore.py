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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import grpc

from encinfer.common import errors
from encinfer.common.auth import auth_metadata
from encinfer.common.routing import client_options, key_id_metadata
from encinfer.common.rpc import TlsFiles, channel
from encinfer.he.keyinfo import KeyInfo
from encinfer.v1 import keystore_pb2 as pb
from encinfer.v1 import keystore_pb2_grpc as pb_grpc

CHUNK = 1024 * 1024  # the wire contract's maximum chunk

Progress = Callable[[int], object]  # called with the number of bytes just sent or received


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    size_bytes: int
    sha256: str
    parameters: KeyInfo
    owner: str
    created: datetime
    expires: datetime
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, r: pb.KeyRecord) -> "KeyRecord":
        p = r.parameters
        return cls(
            key_id=r.key_id, size_bytes=r.size_bytes, sha256=r.sha256, owner=r.owner,
            created=r.created.ToDatetime(tzinfo=timezone.utc), expires=r.expires.ToDatetime(tzinfo=timezone.utc),
            labels=dict(r.labels),
            parameters=KeyInfo(
                scheme=p.scheme, poly_modulus_degree=p.poly_modulus_degree,
                coeff_modulus_bits=tuple(p.coeff_modulus_bits), has_public_key=p.has_public_key,
                has_relin_keys=p.has_relin_keys, galois_steps=tuple(p.galois_steps),
                has_conjugation_key=p.has_conjugation_key, format=p.format))

    def expires_in(self) -> float:
        """Seconds until expiry (negative once expired)."""
        return (self.expires - datetime.now(timezone.utc)).total_seconds()


_ERRORS = {cls.code: cls for cls in vars(errors).values()
           if isinstance(cls, type) and issubclass(cls, errors.EncinferError) and cls is not errors.EncinferError}


def error_from_rpc(e: grpc.RpcError) -> errors.EncinferError:
    """The project error for a failed call, carrying the server's message."""
    code = e.code() if hasattr(e, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    details = (e.details() if hasattr(e, "details") else None) or name
    exc = _ERRORS.get(name, errors.EncinferError)(details)
    if type(exc) is errors.EncinferError:
        exc.code = name
    return exc


class KeyStoreClient:
    """A connection to the key store; use as a context manager (closes the channel).

    `timeout` bounds the small calls (stat, delete, list); uploads and downloads
    are bounded by `transfer_timeout` (None = no deadline: big keys on slow links).
    """

    def __init__(self, target: str, token: str | None = None, tls: TlsFiles | None = None, *,
                 timeout: float = 30.0, transfer_timeout: float | None = None) -> None:
        self.target = target
        self._channel = channel(target, tls, options=client_options())
        self._stub = pb_grpc.KeyStoreStub(self._channel)
        self._metadata = auth_metadata(token)
        self.timeout, self.transfer_timeout = timeout, transfer_timeout

    def close(self) -> None:
        self._channel.close()

    def _keyed(self, key_id: str) -> list[tuple[str, str]]:
        """The call's metadata with its key id for routing (encinfer.common.routing)."""
        return [*self._metadata, *key_id_metadata(key_id)]

    def __enter__(self) -> "KeyStoreClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, data_or_path: bytes | bytearray | memoryview | str | os.PathLike,
            labels: dict[str, str] | None = None, ttl_seconds: int = 0,
            progress: Progress | None = None) -> KeyRecord:
        """Uploads a key bundle (bytes, or a file path streamed from disk) and returns its record.

        The key id is the SHA-256 of the bytes: uploading the same bytes again stores
        nothing new and renews the expiry (`ttl_seconds`, 0 = the server's default).

            record = ks.put(Path("keys.bin"), labels={"model": "mnist"}, ttl_seconds=86400)
        """
        if isinstance(data_or_path, (bytes, bytearray, memoryview)):
            view = memoryview(data_or_path).cast("B")
            size, chunks = len(view), (bytes(view[i:i + CHUNK]) for i in range(0, len(view), CHUNK))
            return self._put(size, chunks, labels, ttl_seconds, progress)
        path = Path(data_or_path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return self._put(size, iter(lambda: f.read(CHUNK), b""), labels, ttl_seconds, progress)

    def _put(self, size: int, chunks: Iterator[bytes], labels, ttl_seconds: int, progress) -> KeyRecord:
        digest = hashlib.sha256()

        def requests() -> Iterator[pb.PutKeysRequest]:
            yield pb.PutKeysRequest(header=pb.PutKeysHeader(labels=labels or {}, expected_size=size,
                                                            ttl_seconds=ttl_seconds))
            for chunk in chunks:
                digest.update(chunk)
                yield pb.PutKeysRequest(chunk=chunk)
                if progress:
                    progress(len(chunk))
        try:
            reply = self._stub.PutKeys(requests(), metadata=self._metadata, timeout=self.transfer_timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        # The key id is the hash of what the server stored: it must be the hash of what we sent.
        # (A flipped bit inside key material can parse as a valid key; only this catches it.)
        if reply.key_id != digest.hexdigest():
            raise errors.DataLoss(f"the key store stored other bytes than were sent (key id {reply.key_id}, "
                                  f"sent {digest.hexdigest()}); upload again")
        return KeyRecord.from_pb(reply)

    def get(self, key_id: str, dest: str | os.PathLike | None = None,
            progress: Progress | None = None) -> bytes | Path:
        """Downloads a key: its bytes, or with `dest` the path of the file written (atomically).

        The SHA-256 is checked here too: a mismatch raises DataLoss and leaves no file.

            data = ks.get(key_id)
            path = ks.get(key_id, dest="keys.bin")
        """
        kid = key_id.strip().lower()
        if dest is None:
            parts: list[bytes] = []
            self._download(kid, parts.append, progress)
            return b"".join(parts)
        dest = Path(dest)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                self._download(kid, f.write, progress)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def _download(self, kid: str, sink: Callable[[bytes], object], progress: Progress | None) -> KeyRecord:
        digest, size, record = hashlib.sha256(), 0, None
        call = self._stub.GetKeys(pb.GetKeysRequest(key_id=kid), metadata=self._keyed(kid),
                                  timeout=self.transfer_timeout)
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

    def stat(self, key_id: str) -> KeyRecord | None:
        """The key's record, or None when the key store has no live key by this id for you.

        The cheap way to decide whether to upload again:

            record = ks.stat(key_id)
            if record is None or record.expires_in() < 3600:
                ks.put(bundle)
        """
        try:
            return KeyRecord.from_pb(self._stub.StatKeys(pb.StatKeysRequest(key_id=key_id),
                                                         metadata=self._keyed(key_id), timeout=self.timeout))
        except grpc.RpcError as e:
            exc = error_from_rpc(e)
            if isinstance(exc, errors.NotFound):
                return None
            raise exc from None

    def delete(self, key_id: str) -> bool:
        """Deletes your key; False when there was no live key of yours by this id."""
        try:
            return self._stub.DeleteKeys(pb.DeleteKeysRequest(key_id=key_id), metadata=self._keyed(key_id),
                                         timeout=self.timeout).deleted
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def list(self, page_size: int = 0) -> Iterator[KeyRecord]:
        """Your live keys, in key-id order, fetched page by page as you iterate."""
        token = ""
        while True:
            try:
                reply = self._stub.ListKeys(pb.ListKeysRequest(page_size=page_size, page_token=token),
                                            metadata=self._metadata, timeout=self.timeout)
            except grpc.RpcError as e:
                raise error_from_rpc(e) from None
            for r in reply.keys:
                yield KeyRecord.from_pb(r)
            token = reply.next_page_token
            if not token:
                return
