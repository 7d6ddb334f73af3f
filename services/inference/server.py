"""The Inference gRPC service: a thin adapter from protobuf to InferenceCore."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import AsyncIterator

import grpc
from prometheus_client import Counter

from encinfer.common import logs
from encinfer.common.auth import TokenTable
from encinfer.common.errors import InvalidArgument
from encinfer.common.rpc import add_health_and_reflection, bind, make_server, set_health
from encinfer.inference.config import InferenceConfig
from encinfer.inference.core import Answer, InferenceCore
from encinfer.inference.keys import KeySource
from encinfer.inference.workers import WorkerPool
from encinfer.v1 import inference_pb2 as pb
from encinfer.v1 import inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
LAYOUT_NAMES = {pb.LAYOUT_LATENCY: "latency", pb.LAYOUT_BATCH: "batch", pb.LAYOUT_COEFF: "coeff"}
LAYOUT_ENUM = {v: k for k, v in LAYOUT_NAMES.items()}
# A stream's RPC status says nothing of its items: each answer carries its own.
STREAM_ANSWERS = Counter("encinfer_stream_answers_total", "PredictStream answers (items and batches), by status code",
                         ["code"])


def model_info_pb(info: dict, worker: str = "", max_open_batches: int = 0) -> pb.ModelInfo:
    layouts = []
    for name, lay in info["layouts"].items():
        p = lay["params"]
        layouts.append(pb.LayoutInfo(
            layout=LAYOUT_ENUM[name],
            parameters=pb.CkksParameters(
                poly_modulus_degree=p["poly_modulus_degree"], coeff_modulus_bits=p["coeff_modulus_bits"],
                input_scale_bits=p["input_scale_bits"], output_scale_bits=p["output_scale_bits"],
                galois_steps=p.get("galois_steps", ()), needs_relin_keys=p.get("needs_relin_keys", False),
                needs_conjugation_key=p.get("needs_conjugation_key", False),
                complex_packing=p.get("complex_packing", False),
                needs_public_key=p.get("needs_public_key", False)),
            block_size=lay.get("block_size", 0), output_slots=lay.get("output_slots", ()),
            feature_indices=lay.get("feature_indices", ()), max_samples=lay.get("max_samples", 0),
            manifest_sha256=lay["manifest_sha256"],
            input_min=(lay.get("input_range") or (0.0, 0.0))[0],
            input_max=(lay.get("input_range") or (0.0, 0.0))[1],
            rows_per_product=lay.get("rows_per_product", 0), answer_bits=lay.get("answer_bits", 0)))
    return pb.ModelInfo(
        name=info["name"], version=info["version"], kind=info["kind"], n_features=info["n_features"],
        n_outputs=info["n_outputs"], class_labels=info["class_labels"], layouts=layouts, sha256=info["sha256"],
        limits=pb.Limits(max_message_bytes=4 * 1024 * 1024, max_open_batches=max_open_batches), worker=worker)


def answer_pb(a: Answer, counted: bool = False) -> pb.PredictResponse:
    if counted:
        STREAM_ANSWERS.labels(a.error.code if a.error is not None else "OK").inc()
    if a.error is not None:
        code = grpc.StatusCode[a.error.code].value[0]
        return pb.PredictResponse(request_id=a.request_id, status=pb.ItemStatus(code=code, message=str(a.error)))
    return pb.PredictResponse(request_id=a.request_id, ciphertexts=a.ciphertexts, n_samples=a.n_samples,
                              server_ms=a.server_ms, status=pb.ItemStatus(code=0))


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, core: InferenceCore, tokens: TokenTable, worker_name: str) -> None:
        self.core, self.tokens, self.worker_name = core, tokens, worker_name

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        self.tokens.authenticate(context.invocation_metadata())
        return pb.ListModelsResponse(models=[model_info_pb(m, self.worker_name, self.core.max_open_batches)
                                                  for m in self.core.models()])

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        self.tokens.authenticate(context.invocation_metadata())
        return model_info_pb(self.core.model_info(request.model), self.worker_name, self.core.max_open_batches)

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        principal = self.tokens.authenticate(context.invocation_metadata())
        ct, ms = await self.core.predict(principal, request.model, request.key_id, request.ciphertext,
                                         LAYOUT_NAMES.get(request.layout, "latency"))
        return answer_pb(Answer(request.request_id, [ct], 1, ms))

    async def PredictStream(self, requests: AsyncIterator[pb.PredictStreamRequest], context) -> AsyncIterator[pb.PredictResponse]:
        principal = self.tokens.authenticate(context.invocation_metadata())
        session = self.core.stream(principal)

        async def read() -> None:
            first = True
            async for req in requests:
                kind = req.WhichOneof("msg")
                if kind == "header":
                    if not first:
                        raise InvalidArgument("the stream header must be the first message")
                    session.header(req.header.model, req.header.key_id, LAYOUT_NAMES.get(req.header.layout, ""))
                elif kind == "item":
                    it = req.item
                    await session.item(it.request_id, it.model, it.key_id, it.ciphertext)
                elif kind == "batch_part":
                    bp = req.batch_part
                    await session.batch_part(bp.request_id, bp.position, bp.n_samples, bp.ciphertext)
                else:
                    raise InvalidArgument("empty stream message: send a header, an item or a batch part")
                first = False
            await session.finish()

        reader = asyncio.create_task(read())
        getter: asyncio.Future | None = None
        try:
            while True:
                getter = asyncio.ensure_future(session.answers.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    answer = getter.result()
                    if answer is None:
                        break
                    yield answer_pb(answer, counted=True)
                    continue
                getter.cancel()
                reader.result()  # raises a stream-level error (bad header, ...)
                # reader ended normally: the None sentinel is queued; keep draining.
                while (answer := await session.answers.get()) is not None:
                    yield answer_pb(answer, counted=True)
                break
        finally:
            if not reader.done():
                reader.cancel()
            if getter is not None and not getter.done():
                getter.cancel()  # a cancelled call leaves it waiting on the queue forever otherwise
            await session.cancel()


class InferenceServer:
    """Owns the gRPC server, the worker pool and the key source; start() then stop()."""

    def __init__(self, config: InferenceConfig) -> None:
        self.config = config
        self.port = 0

    async def start(self) -> int:
        config = self.config
        tokens = TokenTable.from_env()
        if not tokens.enabled:
            log.warning("authentication is OFF (no ENCINFER_TOKENS / ENCINFER_TOKENS_FILE): every caller is 'public'")
        if not config.models:
            raise SystemExit("no model to serve: pass --model PATH or set ENCINFER_MODELS")
        self.pool = WorkerPool(config.models, config.workers, config.key_cache_bytes)
        await self.pool.start()
        self.keys = KeySource(config.keystore_target, config.keystore_token, config.keystore_tls,
                              config.keystore_timeout, config.key_cache_bytes, config.key_recheck_seconds)
        core = InferenceCore(self.pool, self.keys, tokens.enabled, config.max_inflight_per_stream,
                             config.max_open_batches)
        self.server = make_server()
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceServicer(core, tokens, str(os.getpid())), self.server)
        self.health = add_health_and_reflection(self.server, [SERVICE])
        self.port = bind(self.server, config.address, config.tls)
        if config.metrics_port:
            from prometheus_client import start_http_server

            from encinfer.inference.metrics import export_worker_caches
            export_worker_caches(self.pool)
            start_http_server(config.metrics_port, addr=config.address.rsplit(":", 1)[0].strip("[]") or "127.0.0.1")
        await self.server.start()
        await set_health(self.health, [SERVICE], True)
        log.info("inference serving", extra={"fields": {
            "address": config.address, "port": self.port, "workers": config.workers,
            "tls": config.tls is not None, "models": [m["name"] for m in self.pool.models]}})
        return self.port

    async def stop(self) -> None:
        """Health turns NOT_SERVING first, then in-flight calls get the grace period."""
        log.info("inference stopping", extra={"fields": {"grace_seconds": self.config.grace_seconds}})
        await set_health(self.health, [SERVICE], False)
        await self.server.stop(self.config.grace_seconds)
        await self.keys.close()
        await self.pool.close()


async def serve(config: InferenceConfig) -> None:
    """Runs until SIGTERM or SIGINT."""
    server = InferenceServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(models: list[str] | None = None) -> None:
    logs.configure()
    asyncio.run(serve(InferenceConfig.from_env(models)))


if __name__ == "__main__":
    main()
