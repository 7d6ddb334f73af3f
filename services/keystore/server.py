"""The key store's gRPC face: a thin servicer over `KeyStore`, plus the process around it
(health probe, cleanup loop, graceful shutdown).

Start it with `encinfer keystore serve`, `python -m encinfer.keystore.server`, from
async code with `await start(config)`, or from sync code and tests with
`BackgroundKeyStore(config)` (its own event loop in a thread).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator

from prometheus_client import Counter

from encinfer.common import logs
from encinfer.common.auth import current_principal
from encinfer.common.background import BackgroundServer
from encinfer.common.errors import ConfigError, InvalidArgument
from encinfer.common.rpc import add_health_and_reflection, bind, make_server, set_health
from encinfer.keystore.config import KeyStoreConfig
from encinfer.keystore.storage import open_backend
from encinfer.keystore.store import KeyStore, PutHeader
from encinfer.v1 import keystore_pb2 as pb
from encinfer.v1 import keystore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KeyStore"].full_name
# A stop waits at most this long past the grace period for anything that will not end.
STOP_MARGIN_SECONDS = 5.0


async def split_put_stream(requests: AsyncIterator[pb.PutKeysRequest]) -> tuple[PutHeader, AsyncIterator[bytes]]:
    """Enforces the PutKeys shape: exactly one header, first, then chunks."""
    first = None
    async for first in requests:  # noqa: B007 - takes the first message, read after the loop
        break
    if first is None or first.WhichOneof("msg") != "header":
        raise InvalidArgument("PutKeys must start with a header message (labels, expected_size, ttl_seconds)")
    h = first.header
    header = PutHeader(labels=dict(h.labels), expected_size=h.expected_size, ttl_seconds=h.ttl_seconds)

    async def chunks() -> AsyncIterator[bytes]:
        async for message in requests:
            if message.WhichOneof("msg") != "chunk":
                raise InvalidArgument("PutKeys got a second header; after the header send only chunks")
            yield message.chunk
    return header, chunks()


class KeyStoreServicer(pb_grpc.KeyStoreServicer):
    """Converts messages and calls the core; the interceptor authenticates and maps errors."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    async def PutKeys(self, request_iterator, context):
        principal = current_principal()
        header, chunks = await split_put_stream(request_iterator)
        return (await self.store.put(principal, header, chunks)).to_pb()

    async def PutKeysUnary(self, request, context):
        """PutKeys for clients that cannot stream (browsers): the same store, checks and limits."""
        principal = current_principal()
        h = request.header
        header = PutHeader(labels=dict(h.labels), expected_size=h.expected_size, ttl_seconds=h.ttl_seconds)

        async def chunks() -> AsyncIterator[bytes]:
            yield request.bundle
        return (await self.store.put(principal, header, chunks())).to_pb()

    async def GetKeys(self, request, context):
        principal = current_principal()
        async with await self.store.fetch(principal, request.key_id, request.owner) as key:
            yield pb.GetKeysResponse(record=key.record.to_pb())
            async for chunk in key.chunks():
                yield pb.GetKeysResponse(chunk=chunk)

    async def StatKeys(self, request, context):
        principal = current_principal()
        return (await self.store.stat(principal, request.key_id, request.owner)).to_pb()

    async def DeleteKeys(self, request, context):
        principal = current_principal()
        return pb.DeleteKeysResponse(deleted=await self.store.delete(principal, request.key_id))

    async def ListKeys(self, request, context):
        principal = current_principal()
        records, token = await self.store.list(principal, request.page_size, request.page_token)
        return pb.ListKeysResponse(keys=[r.to_pb() for r in records], next_page_token=token)


class KeyStoreServer:
    """A running key store: the gRPC server, its health probe and its cleanup loop."""

    def __init__(self, config: KeyStoreConfig, store: KeyStore) -> None:
        self.config, self.store = config, store
        self.server = make_server(config.tokens)
        pb_grpc.add_KeyStoreServicer_to_server(KeyStoreServicer(store), self.server)
        self.health = add_health_and_reflection(self.server, [SERVICE_NAME])
        self.port = 0
        self.serving: bool | None = None  # unknown until the first probe
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        host = self.config.address.rsplit(":", 1)[0] or "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> int:
        self.port = bind(self.server, self.config.address, self.config.tls)
        await self.server.start()
        await self._probe_once()  # SERVING before start returns when the backend is there
        self._tasks = [asyncio.create_task(self._probe_loop(), name="keystore-health"),
                       asyncio.create_task(self._cleanup_loop(), name="keystore-cleanup"),
                       asyncio.create_task(self._warm_up(), name="keystore-warm-up")]
        if not self.config.tokens.enabled:
            log.warning("authentication is off (no ENCINFER_TOKENS/ENCINFER_TOKENS_FILE): "
                        "every caller is the owner 'public'")
        log.info("key store listening", extra={"fields": {
            "address": self.address, "port": self.port, "backend": self.store.backend.kind,
            "tls": bool(self.config.tls), "serving": self.serving}})
        return self.port

    async def _probe_once(self) -> None:
        ok = await self.store.probe()
        if ok != self.serving:
            await set_health(self.health, [SERVICE_NAME], ok)
            if ok:
                log.info("storage backend reachable and spool writable: SERVING",
                         extra={"fields": {"backend": self.store.backend.kind}})
            else:
                log.warning(f"{self.store.probe_error}: NOT_SERVING", extra={"fields": {
                    "backend": self.store.backend.kind, "reason": self.store.probe_error}})
        self.serving = ok

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                await self._probe_once()
            except Exception:  # the probe must outlive any one failure
                log.exception("health probe failed")

    async def _warm_up(self) -> None:
        try:
            await self.store.warm_up()
        except Exception:  # the first upload will report it
            log.exception("cannot load the key parser")

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.cleanup_interval)
            try:
                await self.store.cleanup()
            except Exception as e:  # noqa: BLE001 - retried next interval
                log.warning("cleanup failed; retrying next interval", extra={"fields": {"error": str(e)}})

    async def stop(self, grace: float | None = None, delay: float = 0.0) -> None:
        """NOT_SERVING (answered on the open port for `delay` seconds, so pollers see it rather
        than a refused connection), stop accepting, let in-flight RPCs finish within the grace period."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        for task in self._tasks:  # first, so no probe can flip health back to SERVING
            task.cancel()
        # Bounded: a probe or clean-up stuck in a storage thread must not hold the shutdown.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_MARGIN_SECONDS)
        self.serving = False
        await set_health(self.health, [SERVICE_NAME], False)
        if delay > 0:
            await asyncio.sleep(delay)
        grace = self.config.shutdown_grace if grace is None else grace
        try:
            await asyncio.wait_for(self.server.stop(grace), grace + STOP_MARGIN_SECONDS)
        except TimeoutError:
            log.error("the gRPC server did not stop within its grace period; closing anyway",
                      extra={"fields": {"grace_seconds": grace}})
        self.store.close()
        log.info("key store stopped", extra={"fields": {"address": self.address}})

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


BACKEND_ERRORS = Counter("encinfer_keystore_backend_errors_total", "Storage backend calls that failed",
                         ["operation", "code"])


class CountedBackend:
    """A storage backend whose failed calls are counted (by operation and error), then re-raised."""

    def __init__(self, backend) -> None:
        self._backend = backend

    def __getattr__(self, name: str):
        attr = getattr(self._backend, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception as e:
                code = getattr(e, "code", None)
                BACKEND_ERRORS.labels(name, code if isinstance(code, str) else type(e).__name__).inc()
                raise
        return call


def build(config: KeyStoreConfig, store: KeyStore | None = None) -> KeyStoreServer:
    """A key store server (not started) over `store`, or over the configured backend."""
    if store is None:
        store = KeyStore(CountedBackend(open_backend(config)), config)
    return KeyStoreServer(config, store)


async def start(config: KeyStoreConfig, store: KeyStore | None = None) -> KeyStoreServer:
    """Starts a key store on the running loop; `config.address` may use port 0."""
    server = build(config, store)
    await server.start()
    return server


class BackgroundKeyStore(BackgroundServer):
    """A key store on its own event loop in a daemon thread, for sync code and tests.

        with BackgroundKeyStore(config) as ks:
            KeyStoreClient(ks.target).stat(key_id)
    """

    def __init__(self, config: KeyStoreConfig, store_factory=None) -> None:
        super().__init__(lambda: build(config, store_factory(config) if store_factory else None),
                         name="keystore-loop", timeout=30.0)

    @property
    def target(self) -> str:
        return self.server.address

    @property
    def store(self) -> KeyStore:
        return self.server.store

    def stop(self, grace: float = 0.5) -> None:
        super().stop(grace)


async def serve(config: KeyStoreConfig) -> int:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    metrics_port = config.metrics_port
    if metrics_port:
        from prometheus_client import start_http_server
        # The gRPC listener's host: 0.0.0.0 in a container, so the published port reaches it.
        host = config.address.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
        start_http_server(metrics_port, addr=host)
        log.info("metrics listening", extra={"fields": {"address": f"{host}:{metrics_port}"}})
    server = await start(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"fields": {"grace_seconds": config.shutdown_grace,
                                                "delay_seconds": config.shutdown_delay}})
    await server.stop(delay=config.shutdown_delay)
    return 0


def tune_malloc() -> None:
    """Lets transient buffers (1 MiB chunks, S3 parts) go back to the OS.

    glibc otherwise raises its mmap threshold after the first freed big buffer and
    keeps later ones in one arena per thread: about 30 MB more peak RSS per 50 MB
    key here, for no speed gained.
    """
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)            # M_ARENA_MAX
        libc.mallopt(-3, 256 * 1024)   # M_MMAP_THRESHOLD (fixed, so it no longer grows)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main() -> int:
    """The process: 0 after a clean stop, 1 (and one ERROR line) when it cannot start."""
    tune_malloc()
    try:
        config = KeyStoreConfig.from_env()
    except (ConfigError, OSError) as e:
        logs.configure()
        log.error(f"key store cannot start: {e}")
        return 1
    logs.configure(config.log_level)
    try:
        return asyncio.run(serve(config))
    except ConfigError as e:
        log.error(f"key store cannot start: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
