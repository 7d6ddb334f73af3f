"""The Inference gRPC service: a thin adapter from protobuf to InferenceCore."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import Counter

from encinfer.common import logs
from encinfer.common.auth import current_principal
from encinfer.common.errors import EncinferError, InvalidArgument
from encinfer.common.preflight import StartupError, check_client_tls, check_port_free, check_server_tls, split_address
from encinfer.common.rpc import add_health_and_reflection, bind, make_server, set_health
from encinfer.inference.artifact import load_model
from encinfer.inference.config import InferenceConfig
from encinfer.inference.core import Answer, InferenceCore, StreamBatchPart, StreamHeader, StreamItem, StreamMessage
from encinfer.inference.keys import KeySource
from encinfer.inference.pool import WorkerPool, kill_workers
from encinfer.modelinfo import LAYOUT_NAMES
from encinfer.v1 import inference_pb2 as pb
from encinfer.v1 import inference_pb2_grpc

log = logging.getLogger(__name__)

# A stop gets the drain delay, the grace period and this much more (workers: 3 s to exit, then SIGKILL).
STOP_MARGIN_SECONDS = 10.0

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
# A stream's RPC status says nothing of its items: each answer carries its own.
STREAM_ANSWERS = Counter("encinfer_stream_answers_total", "PredictStream answers (items and batches), by status code",
                         ["code"])


def answer_pb(a: Answer, counted: bool = False) -> pb.PredictResponse:
    if counted:
        STREAM_ANSWERS.labels(a.error.code if a.error is not None else "OK").inc()
    if a.error is not None:
        code = grpc.StatusCode[a.error.code].value[0]
        return pb.PredictResponse(request_id=a.request_id, status=pb.ItemStatus(code=code, message=str(a.error)))
    return pb.PredictResponse(request_id=a.request_id, ciphertexts=a.ciphertexts, n_samples=a.n_samples,
                              server_ms=a.server_ms, status=pb.ItemStatus(code=0))


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, core: InferenceCore, worker_name: str) -> None:
        self.core, self.worker_name = core, worker_name

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[m.to_pb(self.worker_name, self.core.max_open_batches)
                                             for m in self.core.models()])

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        return self.core.model_info(request.model).to_pb(self.worker_name, self.core.max_open_batches)

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        principal = current_principal()
        ct, ms = await self.core.predict(principal, request.model, request.key_id, request.ciphertext,
                                         LAYOUT_NAMES.get(request.layout, "latency"))
        return answer_pb(Answer(request.request_id, [ct], 1, ms))

    async def PredictStream(self, requests: AsyncIterator[pb.PredictStreamRequest],
                            context) -> AsyncIterator[pb.PredictResponse]:
        async for answer in self.core.stream(current_principal()).run(stream_messages(requests)):
            yield answer_pb(answer, counted=True)


async def stream_messages(requests: AsyncIterator[pb.PredictStreamRequest]) -> AsyncIterator[StreamMessage]:
    """PredictStream's messages as the core's plain values (header, item or batch part)."""
    async for req in requests:
        kind = req.WhichOneof("msg")
        if kind == "header":
            h = req.header
            yield StreamHeader(h.model, h.key_id, LAYOUT_NAMES.get(h.layout, ""))
        elif kind == "item":
            it = req.item
            yield StreamItem(it.request_id, it.model, it.key_id, it.ciphertext)
        elif kind == "batch_part":
            bp = req.batch_part
            yield StreamBatchPart(bp.request_id, bp.position, bp.n_samples, bp.ciphertext)
        else:
            raise InvalidArgument("empty stream message: send a header, an item or a batch part")


class InferenceServer:
    """Owns the gRPC server, the worker pool and the key source; start() then stop().

    start() checks everything it can before it spawns a worker (models, TLS files, free
    ports), binds the gRPC port last, and on any failure undoes what it did: no listener
    and no worker outlives a failed start."""

    def __init__(self, config: InferenceConfig) -> None:
        self.config = config
        self.port = 0
        self.server: grpc.aio.Server | None = None
        self.health = None
        self.pool: WorkerPool | None = None
        self.keys: KeySource | None = None
        self._metrics: Any = None

    async def start(self) -> int:
        try:
            return await self._start()
        except BaseException:
            await self._undo()
            raise

    def preflight(self) -> None:
        """Raises StartupError for what would otherwise fail later, or in a worker."""
        config = self.config
        if not config.models:
            raise StartupError("no model to serve: pass --model PATH or set ENCINFER_MODELS")
        names: dict[str, str] = {}
        for path in config.models:
            try:
                name = load_model(path).name
            except (EncinferError, OSError) as e:
                raise StartupError(f"model {path!r} cannot be served: {e} (fix --model or ENCINFER_MODELS)") from None
            if name in names:
                raise StartupError(f"models {names[name]!r} and {path!r} are both named {name!r}; names must be unique")
            names[name] = path
        if config.tls is not None:
            check_server_tls(config.tls)
        if config.keystore_tls is not None:
            check_client_tls(config.keystore_tls)
        host, port = split_address(config.address)
        check_port_free(host, port, "ENCINFER_INFERENCE_ADDRESS")
        if config.metrics_port:
            if config.metrics_port == port:
                raise StartupError(f"ENCINFER_METRICS_PORT={port} is the gRPC port too: choose another")
            check_port_free(self._metrics_host(), config.metrics_port, "ENCINFER_METRICS_PORT")

    def _metrics_host(self) -> str:
        return self.config.address.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"

    async def _start(self) -> int:
        config = self.config
        tokens = config.tokens
        if not tokens.enabled:
            log.warning("authentication is OFF (no ENCINFER_TOKENS / ENCINFER_TOKENS_FILE): every caller is 'public'")
        self.preflight()
        if config.metrics_port:
            from prometheus_client import start_http_server
            try:
                self._metrics = start_http_server(config.metrics_port, addr=self._metrics_host())
            except OSError as e:
                raise StartupError(f"cannot serve metrics on port {config.metrics_port} ({e.strerror}): "
                                   "stop the process that holds it or change ENCINFER_METRICS_PORT") from None
        self.pool = WorkerPool(config.models, config.workers, config.key_cache_bytes)
        try:
            await self.pool.start()
        except EncinferError as e:
            raise StartupError(f"the inference workers cannot start: {e}") from None
        if config.metrics_port:
            from encinfer.inference.metrics import export_worker_caches
            export_worker_caches(self.pool)
        self.keys = KeySource.from_config(config)
        core = InferenceCore(self.pool, self.keys, tokens.enabled, config.max_inflight_per_stream,
                             config.max_open_batches)
        self.server = make_server(tokens)
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(core, str(os.getpid())), self.server)
        self.health = add_health_and_reflection(self.server, [SERVICE])
        try:
            self.port = bind(self.server, config.address, config.tls)
        except (RuntimeError, StartupError):  # taken since preflight, or TLS files grpc refuses
            raise StartupError(f"cannot listen on {config.address}: the port is in use or the TLS files are "
                               "unusable; fix ENCINFER_INFERENCE_ADDRESS or ENCINFER_TLS_CERT/KEY") from None
        await self.server.start()
        await set_health(self.health, [SERVICE], True)
        log.info("inference serving", extra={"fields": {
            "address": config.address, "port": self.port, "workers": config.workers,
            "tls": config.tls is not None, "models": [m.name for m in self.pool.models]}})
        return self.port

    async def _undo(self) -> None:
        """Releases whatever a failed start got: the gRPC port, the workers, the metrics port."""
        if self.server is not None:
            await self.server.stop(0)
        if self.keys is not None:
            await self.keys.close()
        if self.pool is not None:
            await self.pool.close(timeout=1)
        self._stop_metrics()

    def _stop_metrics(self) -> None:
        if self._metrics is not None:
            httpd, _thread = self._metrics
            httpd.shutdown()
            httpd.server_close()
            self._metrics = None

    async def stop(self, delay: float = 0.0) -> None:
        """Health turns NOT_SERVING first and stays visible on the open port for `delay`
        seconds; then in-flight calls get the grace period; then the workers stop."""
        log.info("inference stopping", extra={"fields": {"grace_seconds": self.config.grace_seconds,
                                                         "delay_seconds": delay}})
        assert self.server is not None and self.keys is not None and self.pool is not None  # start() ran
        try:
            await set_health(self.health, [SERVICE], False)
            if delay > 0:
                await asyncio.sleep(delay)  # pollers see NOT_SERVING, not a refused connection
            await self.server.stop(self.config.grace_seconds)
            await self.keys.close()
        finally:
            await self.pool.close()
            self._stop_metrics()


async def serve(config: InferenceConfig) -> None:
    """Runs until SIGTERM or SIGINT; then stops within delay + grace + a few seconds, whatever
    state the server is in (a stop that overruns that is abandoned, and main() kills the workers).
    A signal during start-up abandons the start (undone: no worker, no port left)."""
    server = InferenceServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        log.info("inference stopped before it was serving")
        return
    error = starting.exception()
    if error is not None:
        stopping.cancel()
        raise error  # a StartupError, after start() has undone what it did
    await stopping
    bound = config.shutdown_delay + config.grace_seconds + STOP_MARGIN_SECONDS
    try:
        await asyncio.wait_for(server.stop(config.shutdown_delay), bound)
    except TimeoutError:
        log.error("inference did not stop in time; killing its workers", extra={"fields": {"seconds": bound}})
    log.info("inference stopped")


def main(models: list[str] | None = None) -> int:
    """The process: 0 after a clean stop, 1 (and one ERROR line) when it cannot start."""
    logs.configure()
    try:
        config = InferenceConfig.from_env(models)
        asyncio.run(serve(config))
        return 0
    except StartupError as e:  # encinfer.common.errors.ConfigError
        log.error(f"inference cannot start: {e}")
        return 1
    except OSError as e:  # a token file that cannot be read, ...
        log.error(f"inference cannot start: {e}")
        return 1
    except Exception:  # a bug: one JSON line with the traceback, and an exit code
        log.exception("inference failed")
        return 1
    finally:
        kill_workers()  # no worker outlives the server, whatever happened


if __name__ == "__main__":
    sys.exit(main())
