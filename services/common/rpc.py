"""The gRPC frame both services share: error mapping, access logs, metrics, health,
reflection, TLS, and client channels.

Errors are decided here and only here: handlers raise `EncinferError`s and the
interceptor turns each into its status code; bytes that are no valid request message
are INVALID_ARGUMENT; a call that went away (client cancel, deadline, server stop) is
CANCELLED; anything else is a bug, logged with its traceback and answered INTERNAL
without details. One JSON access-log line per call; a failed call's line has its
message as `details` (our words, never key or token bytes; capped).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

from encinfer.common.auth import TokenTable, set_principal
from encinfer.common.errors import ConfigError, EncinferError, InvalidArgument

log = logging.getLogger("encinfer.rpc")

# gRPC's default; every message we define stays below it (big payloads are chunked).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

RPCS = Counter("encinfer_rpcs_total", "RPCs handled, by method and status code", ["method", "code"])
RPC_SECONDS = Histogram(
    "encinfer_rpc_seconds", "RPC handling time", ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


# Calls this process makes to other services (the inference service to the key store).
CLIENT_RPCS = Counter("encinfer_client_rpcs_total", "Outgoing RPCs to other services, by method and status code",
                      ["method", "code"])


def status_code(exc: EncinferError) -> grpc.StatusCode:
    return grpc.StatusCode[exc.code]


def request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return str(value)[:128]
    return uuid.uuid4().hex[:16]


# Health checks and reflection answer anyone (probes, ghz, grpcurl); every other method needs a token.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, maps errors to status codes, logs one JSON line per RPC, counts metrics.

    The caller is authenticated here, once per call, and handlers read it with
    `encinfer.common.auth.current_principal()`.

    grpc.aio builds the handler anew for every call, so each call gets its own
    `_Decoder`: a request that is not a valid message becomes INVALID_ARGUMENT here,
    on every method, instead of grpc's UNKNOWN (unary) or a handler's INTERNAL (streams).
    """

    def __init__(self, tokens: TokenTable | None = None) -> None:
        self.tokens = tokens if tokens is not None else TokenTable(None)

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        tokens = None if method.startswith(UNAUTHENTICATED_PREFIXES) else self.tokens
        decoder = _Decoder(handler.request_deserializer, tokens)
        deserializer = decoder if handler.request_deserializer is not None else None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, decoder), deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method, decoder, streaming=True), deserializer,
                handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, decoder), deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, method, decoder, streaming=True), deserializer,
            handler.response_serializer)


class _Undecodable:
    """What the decoder hands grpc instead of raising: grpc.aio answers a raising
    request deserializer with UNKNOWN before any handler (or this interceptor) runs."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class _Decoder:
    """A call's request deserializer that never raises; the first failure is kept on it."""

    def __init__(self, deserializer: Callable[[bytes], Any] | None, tokens: TokenTable | None = None) -> None:
        self.deserializer = deserializer
        self.tokens = tokens
        self.error: str | None = None
        descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
        self.type_name = getattr(descriptor, "full_name", "") or "request"

    def __call__(self, raw: bytes) -> Any:
        assert self.deserializer is not None  # installed as grpc's deserializer only when there is one
        try:
            return self.deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - any deserializer failure means these bytes are no such message
            reason = str(exc)
            # upb says "Error parsing message with type 'x.Y': <why>": the type is in our own words already.
            if reason.startswith("Error parsing message") and "': " in reason:
                reason = reason.split("': ", 1)[1]
            failure = _Undecodable(f"request is not a valid {self.type_name} message: "
                                   f"it could not be decoded ({reason or type(exc).__name__})")
            if self.error is None:
                self.error = failure.message
            return failure

    def check(self, request: Any) -> Any:
        if isinstance(request, _Undecodable):
            raise InvalidArgument(request.message)
        return request

    def authenticate(self, context: grpc.aio.ServicerContext) -> None:
        """Sets the call's principal (UNAUTHENTICATED without a known token)."""
        if self.tokens is not None:
            set_principal(self.tokens.authenticate(context.invocation_metadata()))

    async def messages(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The request stream; a message that cannot be decoded ends it with InvalidArgument."""
        async for request in requests:
            yield self.check(request)

    def raise_if_failed(self) -> None:
        """A handler that swallowed a decoding failure (or read one with context.read()) still fails the call."""
        if self.error is not None:
            raise InvalidArgument(self.error)


# A failed call's message in its access-log line: ours (never key or token bytes), but bounded.
MAX_LOGGED_MESSAGE = 300
CANCELLED_MESSAGE = "the call was cancelled (by the client, its deadline or the server's shutdown)"


# What grpc.aio raises inside a handler whose call is gone: a read or write on a call
# the client closed (its core batch fails), or on a server that has stopped.
_CALL_GONE = ("ExecuteBatchError", "_ServerStoppedError")


def _is_cancellation(exc: BaseException) -> bool:
    """The call went away under the handler: the client cancelled, its deadline passed or
    the server stopped. GeneratorExit: grpc dropped a streaming handler at a `yield`
    (a write failed because the client was gone) and it was closed later."""
    return isinstance(exc, (asyncio.CancelledError, GeneratorExit)) or type(exc).__name__ in _CALL_GONE


def _is_abort(exc: BaseException) -> bool:
    # context.abort raises to unwind the handler; its status is already set.
    return isinstance(exc, grpc.aio.AbortError) or type(exc).__name__ == "AbortError"


class _Call:
    """Times one RPC and turns its outcome into a status, a log line and metrics."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext, decoder: _Decoder) -> None:
        self.method, self.context, self.decoder = method, context, decoder
        self.rid = request_id(context)
        self.start = time.perf_counter()
        self.finished = False

    def settle(self, exc: BaseException) -> bool:
        """Records a cancellation or an abort, which the caller re-raises as is (True).

        Synchronous on purpose: a generator being closed (GeneratorExit) must not await."""
        if _is_cancellation(exc):
            echo = "" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__
            self.done(grpc.StatusCode.CANCELLED, CANCELLED_MESSAGE, error=echo)
            return True
        if _is_abort(exc):
            self.done(None)
            return True
        return False

    async def fail(self, exc: BaseException) -> None:
        """Ends the call for any other exception with its status (context.abort raises).

        Returns only when the call already has a status; the caller re-raises exc then."""
        if self.context.done():
            # The status was sent already (the handler swallowed an abort and went on).
            self.done(None, error=type(exc).__name__)
            return
        if self.context.cancelled():
            # A handler that set CANCELLED and then raised: the cancellation's echo, not a bug.
            code, message = grpc.StatusCode.CANCELLED, CANCELLED_MESSAGE
        elif self.decoder.error is not None:
            # The request could not be decoded: whatever the handler made of that, this is the answer.
            code, message = grpc.StatusCode.INVALID_ARGUMENT, self.decoder.error
        elif isinstance(exc, EncinferError):
            code, message = status_code(exc), str(exc)
        else:
            code = grpc.StatusCode.INTERNAL
            message = f"internal error; the server log has request id {self.rid}"
            log.error("unhandled error", exc_info=exc,
                      extra={"fields": {"method": self.method, "request_id": self.rid}})
        self.done(code, message)
        await self.context.abort(code, message)

    def done(self, code: grpc.StatusCode | None = None, message: str = "", error: str = "") -> None:
        """Counts and logs the call once: the first outcome decided is the call's."""
        if self.finished:
            return
        self.finished = True
        if code is None:
            code = self.context.code() or grpc.StatusCode.OK
            if isinstance(code, int):
                code = grpc.StatusCode.OK if code == 0 else grpc.StatusCode.UNKNOWN
            if code is not grpc.StatusCode.OK and not message:
                message = str(self.context.details() or "")
        elapsed = time.perf_counter() - self.start
        RPCS.labels(self.method, code.name).inc()
        RPC_SECONDS.labels(self.method).observe(elapsed)
        if not self.method.startswith("/grpc.health"):
            fields = {"method": self.method, "code": code.name, "request_id": self.rid,
                      "duration_ms": round(elapsed * 1000, 3)}
            if code is not grpc.StatusCode.OK:
                fields["details"] = _bounded(message)
            if error:
                fields["error"] = error
            log.info("rpc", extra={"fields": fields})


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_LOGGED_MESSAGE else message[:MAX_LOGGED_MESSAGE - 3] + "..."


def _wrap_unary(behavior: Callable, method: str, decoder: _Decoder, streaming: bool = False) -> Callable:
    """A handler answering one response (unary or stream-unary, or writing with context.write)."""
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(method, context, decoder)
        try:
            request = decoder.messages(request) if streaming else decoder.check(request)
            decoder.authenticate(context)
            response = await behavior(request, context)
            decoder.raise_if_failed()
        except BaseException as exc:  # decided in call.settle / call.fail
            if call.settle(exc):
                raise
            await call.fail(exc)  # raises AbortError, unless the call already had a status
            raise
        call.done()
        return response
    return wrapper


def _wrap_stream(behavior: Callable, method: str, decoder: _Decoder, streaming: bool = False) -> Callable:
    if not inspect.isasyncgenfunction(behavior):
        # A handler that writes with context.write() (grpc's HealthServicer.Watch) is a
        # coroutine, not an async generator: wrap it like a unary one.
        return _wrap_unary(behavior, method, decoder, streaming)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext):
        call = _Call(method, context, decoder)
        responses = None
        try:
            request = decoder.messages(request) if streaming else decoder.check(request)
            decoder.authenticate(context)
            responses = behavior(request, context)
            async for response in responses:
                yield response
            decoder.raise_if_failed()
        except BaseException as exc:  # decided in call.settle / call.fail
            # GeneratorExit: grpc dropped this generator at a `yield` because the call went away.
            if call.settle(exc):
                raise
            await call.fail(exc)  # raises AbortError, unless the call already had a status
            raise
        else:
            call.done()
        finally:
            if responses is not None:
                # Close the handler now, where its cleanup (finally blocks) runs in this call,
                # rather than whenever the garbage collector finalizes it.
                await responses.aclose()
    return wrapper


@dataclass(frozen=True)
class TlsFiles:
    """Paths to PEM files. Server: cert+key, optional client_ca for mutual TLS.
    Client: ca to verify the server, optional cert+key for mutual TLS."""

    cert: str = ""
    key: str = ""
    ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key) or bool(self.ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key = Path(self.cert).read_bytes(), Path(self.key).read_bytes()
        ca = Path(self.ca).read_bytes() if self.ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca).read_bytes() if self.ca else None,
            private_key=Path(self.key).read_bytes() if self.key else None,
            certificate_chain=Path(self.cert).read_bytes() if self.cert else None,
        )


SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 1),
]


def make_server(tokens: TokenTable | None = None, options: Iterable[tuple[str, Any]] = ()) -> grpc.aio.Server:
    """A server whose calls are authenticated against `tokens` (None: auth off) and mapped by
    ServiceInterceptor."""
    merged = dict(SERVER_OPTIONS)
    merged.update(dict(options))
    return grpc.aio.server(interceptors=[ServiceInterceptor(tokens)], options=list(merged.items()))


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> health.aio.HealthServicer:
    """Health starts NOT_SERVING for every service; the caller flips it when ready."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1]
    pool = MethodAwarePool()
    reflection.enable_server_reflection(names, server, pool=pool)
    _add_reflection_v1(server, names, pool)
    return servicer


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection_v1(server: grpc.aio.Server, names: list[str], pool: Any) -> None:
    """Server reflection v1, which grpcurl and newer tools ask for first. grpcio-reflection
    ships only v1alpha; v1 is the same protocol with the package renamed (identical messages
    and field numbers), so v1alpha's servicer answers it with v1alpha's message classes."""
    from grpc_reflection.v1alpha import _async as reflection_aio
    from grpc_reflection.v1alpha import reflection_pb2

    servicer = reflection_aio.ReflectionServicer(names, pool=pool)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        REFLECTION_V1, {"ServerReflectionInfo": handler}),))


class MethodAwarePool:
    """The default descriptor pool, but a method's full name finds its file too.

    ghz asks reflection for the file containing `encinfer.v1.Inference.Predict`;
    protobuf's upb pool finds services and messages by name but not methods
    ("Symbol not found"), so fall back to the method's service.
    """

    def __init__(self, pool: Any = None) -> None:
        from google.protobuf import descriptor_pool
        self._pool = pool or descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str) -> Any:  # the pool's API
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            return self._pool.FindMethodByName(symbol).containing_service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


async def set_health(servicer: health.aio.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *service_names):
        await servicer.set(name, status)


def bind(server: grpc.aio.Server, address: str, tls: TlsFiles | None) -> int:
    """Binds address ('host:port', port 0 = any free one) and returns the port."""
    if tls is not None and tls.cert and tls.key:
        port = server.add_secure_port(address, tls.server_credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot listen on {address}: the port is in use or the TLS files are unusable")
    return port


def channel(target: str, tls: TlsFiles | None = None, *, aio: bool = False,
            options: Iterable[tuple[str, Any]] = ()) -> grpc.Channel | grpc.aio.Channel:
    """A client channel with our message limits; TLS when tls is enabled.

    aio channels are service-to-service: their calls are counted in CLIENT_RPCS."""
    opts = [*CHANNEL_OPTIONS, *options]
    if aio:
        extra = {"interceptors": [_UnaryMetrics(), _UnaryStreamMetrics()]}
        if tls is not None and tls.enabled:
            return grpc.aio.secure_channel(target, tls.channel_credentials(), options=opts, **extra)
        return grpc.aio.insecure_channel(target, options=opts, **extra)
    if tls is not None and tls.enabled:
        return grpc.secure_channel(target, tls.channel_credentials(), options=opts)
    return grpc.insecure_channel(target, options=opts)


# Two classes: an aio channel files each interceptor under the first kind it is an instance of.
class _UnaryMetrics(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return _count_when_done(await continuation(details, request), details.method)


class _UnaryStreamMetrics(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return _count_when_done(await continuation(details, request), details.method)


def _count_when_done(call: Any, method: str | bytes) -> Any:
    """Counts an outgoing call by method and final status code once it has ended."""
    name = method.decode() if isinstance(method, bytes) else method

    async def record() -> None:
        try:
            code = await call.code()
        except BaseException:  # noqa: BLE001 - a counter must never break the call
            code = grpc.StatusCode.UNKNOWN
        CLIENT_RPCS.labels(name, code.name).inc()

    def done(_: Any) -> None:
        try:
            asyncio.ensure_future(record())
        except RuntimeError:  # the loop is going away: nobody will scrape this count
            pass

    call.add_done_callback(done)
    return call
