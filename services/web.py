"""`encinfer web`: the browser page, and a gRPC-Web gateway to the key store and the inference service.

One origin serves both the page and the calls it makes, so the page needs no CORS and its
Content-Security-Policy can forbid every other origin (nothing the page holds can be sent
elsewhere). The gateway speaks gRPC-Web (unary only: browsers cannot stream requests) and
forwards a fixed list of methods as bytes, with the caller's `authorization` metadata (the
tenant's bearer token), deadline and (for Predict) the key-id routing metadata, over the same
channels (and TLS) the Python client uses.

It is also where SEAL versions meet: the page runs node-seal (SEAL 4.1), the services TenSEAL's
SEAL 4.3, and SEAL <= 4.3 refuses another minor version's objects although the wire format is
the same. The gateway rewrites what the page sends into the services' version and each answer
back into the version the request came in (encinfer.he.serial's bridge walks and checks each
object). Objects already in the services' version pass untouched, so other clients are unaffected.
"""
from __future__ import annotations

import argparse
import functools
import logging
import mimetypes
import os
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from encinfer.common.errors import EncinferError
from encinfer.common.rpc import MAX_MESSAGE_BYTES, TlsFiles, channel
from encinfer.he import serial

log = logging.getLogger(__name__)

KEYSTORE, INFERENCE = "keystore", "inference"
# The only methods the page calls; everything else is refused before any upstream call.
METHODS = {
    "/encinfer.v1.KeyStore/StatKeys": KEYSTORE,
    "/encinfer.v1.KeyStore/PutKeysUnary": KEYSTORE,
    "/encinfer.v1.Inference/ListModels": INFERENCE,
    "/encinfer.v1.Inference/GetModelInfo": INFERENCE,
    "/encinfer.v1.Inference/Predict": INFERENCE,
}
SERVICE_NAMES = {KEYSTORE: "key store", INFERENCE: "inference service"}
DEFAULT_TIMEOUT, MAX_TIMEOUT = 30.0, 120.0
DEFAULT_ADDRESS = "127.0.0.1:8080"
# Liveness for container probes: answered by the HTTP server itself, no upstream call.
HEALTH_PATH = "/healthz"
MAX_BODY = MAX_MESSAGE_BYTES + 5
ANSWER_BOUND = 16 << 20  # an uncompressed answer (a ciphertext is N x primes x 2 words)
CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; style-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def static_dir() -> Path:
    """The page's files (package data). Resolved through the editable install's links to the
    real directory, where `make web-deps` put node-seal (vendor/, build output)."""
    return Path(str(resources.files("encinfer.webstatic").joinpath("index.html"))).resolve().parent


@dataclass
class Upstreams:
    keystore: str
    inference: str
    keystore_tls: TlsFiles | None = None
    inference_tls: TlsFiles | None = None

    def __post_init__(self) -> None:
        self._channels = {KEYSTORE: channel(self.keystore, self.keystore_tls),
                          INFERENCE: channel(self.inference, self.inference_tls)}
        self.targets = {KEYSTORE: self.keystore, INFERENCE: self.inference}

    def call(self, method: str, request: bytes, metadata: tuple, timeout: float) -> bytes:
        service = METHODS[method]
        stub = self._channels[service].unary_unary(method)  # bytes in, bytes out
        return stub(request, metadata=metadata, timeout=timeout)

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()


# ---------------------------------------------------------------- SEAL versions

def _bridge_request(method: str, body: bytes) -> tuple[bytes, tuple[int, int] | None]:
    """The request in the services' SEAL version, and the version its answer must go back in."""
    local = serial.seal_version()
    if method == "/encinfer.v1.Inference/Predict":
        from encinfer.v1 import inference_pb2 as pb
        req = pb.PredictRequest.FromString(body)
        if not req.ciphertext:
            return body, None
        version = serial.object_version(req.ciphertext, "ciphertext")
        if version == local:
            return body, None
        req.ciphertext = serial.rewrite_seal_version(req.ciphertext, "ciphertext", local, "ciphertext")
        return req.SerializeToString(), version
    if method == "/encinfer.v1.KeyStore/PutKeysUnary":
        from encinfer.v1 import keystore_pb2 as kpb
        put = kpb.PutKeysUnaryRequest.FromString(body)
        if _bundle_version(put.bundle) not in (None, local):
            put.bundle = serial.bridge_key_bundle(put.bundle, local)
            if put.header.expected_size:
                put.header.expected_size = len(put.bundle)
            return put.SerializeToString(), None
    return body, None


def _routing_metadata(method: str, request: bytes) -> tuple[tuple[str, str], ...]:
    """The key-id metadata a Predict carries from the Python client too, so a proxy in front of
    several inference replicas (Envoy's ring hash in deploy/k8s) keeps each key on one replica."""
    if method != "/encinfer.v1.Inference/Predict":
        return ()
    from encinfer.common.routing import key_id_metadata
    from encinfer.v1 import inference_pb2 as pb
    return tuple(key_id_metadata(pb.PredictRequest.FromString(request).key_id))


def _bundle_version(bundle: bytes) -> tuple[int, int] | None:
    """The SEAL version of a bundle's PARM section; None when it is not a readable bundle (the key
    store then says what is wrong with it)."""
    magic, head = b"encinfer-keys-v1", struct.Struct("<4sIQ")
    if len(bundle) < len(magic) + head.size or bundle[:len(magic)] != magic:
        return None
    tag, _, length = head.unpack_from(bundle, len(magic))
    start = len(magic) + head.size
    if tag != b"PARM" or length > len(bundle) - start:
        return None
    try:
        return serial.object_version(bundle[start:start + length], "key bundle's parameters")
    except EncinferError:
        return None


def _bridge_answer(body: bytes, version: tuple[int, int]) -> bytes:
    """A PredictResponse with each SEAL ciphertext uncompressed and in `version`.

    Coefficient-layout answers (encinfer.he.coeff's wire format, magic "EIC1") are not SEAL
    objects and pass as they are."""
    from encinfer.v1 import inference_pb2 as pb
    answer = pb.PredictResponse.FromString(body)
    if all(ct[:4] == b"EIC1" for ct in answer.ciphertexts):
        return body
    out = []
    for ct in answer.ciphertexts:
        plain = serial.decompress_seal(ct, ANSWER_BOUND, "answer")
        out.append(serial.rewrite_seal_version(plain, "ciphertext", version, "answer"))
    del answer.ciphertexts[:]
    answer.ciphertexts.extend(out)
    return answer.SerializeToString()


@functools.lru_cache(maxsize=8)
def _common_a_bytes(n: int, bits: tuple[int, ...]) -> bytes:
    from encinfer.he import coeff
    from encinfer.he.params import CkksParams
    return coeff.common_a(CkksParams(n, bits, 0, 0)).astype("<u8").tobytes()


def _common_a(query: dict[str, list[str]]) -> tuple[int, bytes]:
    """The public keys' common polynomial a (encinfer.he.coeff) for N and the moduli's bits: public
    data the page needs to make a public key the services accept. (status, body)."""
    from encinfer.he.params import check_security
    try:
        n = int(query["n"][0])
        bits = tuple(int(b) for b in query["bits"][0].split(","))
        check_security(n, bits)
    except (KeyError, ValueError, IndexError, EncinferError) as e:
        return 400, f"common-a needs n=<ring degree>&bits=<prime bits,...> of secure parameters ({e})\n".encode()
    try:
        return 200, _common_a_bytes(n, bits)
    except ImportError:
        return 404, b"these services have no common polynomial (no coefficient layout)\n"
    except (EncinferError, RuntimeError, ValueError) as e:
        return 400, f"no common polynomial for N={n}, bits {list(bits)}: {e}\n".encode()


# ---------------------------------------------------------------- gRPC-Web framing

def unframe(body: bytes) -> bytes:
    """The one message of a unary gRPC-Web request (flag 0, big-endian u32 length, message)."""
    if len(body) < 5 or body[0] != 0:
        raise ValueError("a gRPC-Web request is one uncompressed data frame")
    (length,) = struct.unpack_from(">I", body, 1)
    if length != len(body) - 5:
        raise ValueError(f"the data frame declares {length} bytes, {len(body) - 5} were sent")
    return body[5:]


def frames(message: bytes | None, code: int, details: str) -> bytes:
    """Response body: the message's data frame (if any), then the trailer frame."""
    trailer = f"grpc-status: {code}\r\ngrpc-message: {urllib.parse.quote(details, safe=' ')}\r\n".encode()
    out = b""
    if message is not None:
        out += b"\x00" + struct.pack(">I", len(message)) + message
    return out + b"\x80" + struct.pack(">I", len(trailer)) + trailer


def parse_timeout(value: str | None) -> float:
    if not value or len(value) < 2 or value[-1] not in _TIMEOUT_UNITS or not value[:-1].isdigit():
        return DEFAULT_TIMEOUT
    return min(int(value[:-1]) * _TIMEOUT_UNITS[value[-1]], MAX_TIMEOUT)


def _upstream_message(e: grpc.RpcError, service: str, target: str) -> str:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and ("connect" in details.lower() or "unavailable" in details.lower()):
        return f"the {SERVICE_NAMES[service]} ({target}) is not answering: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the {SERVICE_NAMES[service]} did not answer in time ({details})"
    return details


class Handler(BaseHTTPRequestHandler):
    server_version = "encinfer-web"
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm the second waits for the
    # browser's delayed ACK (40 ms on Linux) on every answer.
    disable_nagle_algorithm = True
    upstreams: Upstreams
    static: Path
    on_request: Callable[[str, bytes], None] | None = None

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the browser went away (a reload)
                self.close_connection = True

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if path == HEALTH_PATH:
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
            return
        if path == "/common-a":
            status, body = _common_a(urllib.parse.parse_qs(url.query))
            self._send(status, body, "application/octet-stream" if status == 200 else "text/plain; charset=utf-8")
            return
        name = "index.html" if path in ("/", "") else path.lstrip("/")
        target = (self.static / name).resolve()
        if not target.is_relative_to(self.static) or not target.is_file() or target.name == "__init__.py":
            self._send(404, b"not found\n", "text/plain; charset=utf-8")
            return
        kind = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
                ".css": "text/css", ".html": "text/html"}.get(target.suffix) or \
            mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if kind.startswith("text/"):
            kind += "; charset=utf-8"
        self._send(200, target.read_bytes(), kind, {"Content-Security-Policy": CSP})

    do_HEAD = do_GET

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or -1)
        if length < 0 or length > MAX_BODY:
            self._send(413 if length > MAX_BODY else 411, b"", "text/plain")
            self.close_connection = True
            return
        body = self.rfile.read(length)
        if self.on_request is not None:
            self.on_request(path, body)
        grpc_web = "application/grpc-web+proto"
        if path not in METHODS:
            self._send(200, frames(None, grpc.StatusCode.UNIMPLEMENTED.value[0], f"{path} is not served here"),
                       grpc_web)
            return
        if not (self.headers.get("Content-Type") or "").startswith("application/grpc-web"):
            self._send(415, b"gRPC-Web requests only\n", "text/plain")
            return
        service = METHODS[path]
        metadata = tuple((k, v) for k, v in (("authorization", self.headers.get("authorization")),) if v)
        t0 = time.perf_counter()
        t1 = t2 = t0
        try:
            request, version = _bridge_request(path, unframe(body))
            metadata += _routing_metadata(path, request)
            t1 = time.perf_counter()
            answer = self.upstreams.call(path, request, metadata, parse_timeout(self.headers.get("grpc-timeout")))
            t2 = time.perf_counter()
            if version is not None:
                answer = _bridge_answer(answer, version)
            out = frames(answer, 0, "")
        except (ValueError, DecodeError) as e:
            out = frames(None, grpc.StatusCode.INVALID_ARGUMENT.value[0], f"not a valid request: {e}")
        except EncinferError as e:
            out = frames(None, _code(e), str(e))
        except grpc.RpcError as e:
            out = frames(None, e.code().value[0], _upstream_message(e, service, self.upstreams.targets[service]))
        t3 = time.perf_counter()
        # Where the page's round trip goes (the page shows it; DevTools too).
        timing = (f"upstream;dur={(t2 - t1) * 1e3:.2f}, bridge;dur={(t1 - t0 + t3 - t2) * 1e3:.2f}, "
                  f"gateway;dur={(t3 - t0) * 1e3:.2f}")
        self._send(200, out, grpc_web, {"Server-Timing": timing})


def _code(e: EncinferError) -> int:
    from encinfer.common.rpc import status_code
    return status_code(e).value[0]


@dataclass
class WebServer:
    """The page and the gateway on one HTTP(S) listener, in a thread (tests) or the foreground."""

    address: str
    upstreams: Upstreams
    cert: str = ""
    key: str = ""
    on_request: Callable[[str, bytes], None] | None = None

    def __post_init__(self) -> None:
        host, _, port = self.address.rpartition(":")
        handler = type("BoundHandler", (Handler,), {"upstreams": self.upstreams, "static": static_dir(),
                                                    "on_request": staticmethod(self.on_request)
                                                    if self.on_request else None})
        self.httpd = ThreadingHTTPServer((host or "127.0.0.1", int(port)), handler)
        self.httpd.daemon_threads = True
        if self.cert and self.key:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.cert, self.key)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = str(self.httpd.server_address[0])
        return f"{'https' if self.cert else 'http'}://{host}:{self.port}/"

    def start(self) -> WebServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="encinfer-web", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self.upstreams.close()


def register(sub: argparse._SubParsersAction) -> None:
    from encinfer.client.connection import INFERENCE_TARGET, KEYSTORE_TARGET

    env = os.environ.get
    p = sub.add_parser("web", help="serve the browser page and its gRPC-Web gateway to the two services")
    p.add_argument("--address", default=env("ENCINFER_WEB_ADDRESS", DEFAULT_ADDRESS),
                   help=f"host:port to listen on (default $ENCINFER_WEB_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument("--keystore", default=env("ENCINFER_KEYSTORE_TARGET", KEYSTORE_TARGET),
                   help=f"key store target (default $ENCINFER_KEYSTORE_TARGET or {KEYSTORE_TARGET})")
    p.add_argument("--inference", default=env("ENCINFER_INFERENCE_TARGET", INFERENCE_TARGET),
                   help=f"inference target (default $ENCINFER_INFERENCE_TARGET or {INFERENCE_TARGET})")
    p.add_argument("--ca", default=env("ENCINFER_TLS_CA", ""),
                   help="CA bundle (PEM) to verify both services' TLS certificates (default $ENCINFER_TLS_CA)")
    p.add_argument("--cert", default=env("ENCINFER_TLS_CERT", ""),
                   help="this server's TLS certificate (PEM): serve HTTPS (default $ENCINFER_TLS_CERT)")
    p.add_argument("--key", default=env("ENCINFER_TLS_KEY", ""),
                   help="this server's TLS key (PEM) (default $ENCINFER_TLS_KEY)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from encinfer.common import logs
    logs.configure("INFO")
    if bool(args.cert) != bool(args.key):
        print("encinfer web: give both --cert and --key (ENCINFER_TLS_CERT, ENCINFER_TLS_KEY), or neither",
              file=sys.stderr)
        return 2
    if not (static_dir() / "vendor" / "node-seal" / "seal_throws.wasm").exists():
        print("encinfer web: node-seal is missing from the page's files; run `make web-deps`", file=sys.stderr)
        return 2
    tls = TlsFiles(ca=args.ca) if args.ca else None
    server = WebServer(args.address, Upstreams(args.keystore, args.inference, tls, tls), args.cert, args.key)
    log.info("web page listening", extra={"fields": {"url": server.url, "keystore": args.keystore,
                                                      "inference": args.inference, "tls": bool(args.cert)}})
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        server.upstreams.close()
    return 0
