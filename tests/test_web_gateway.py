"""`encinfer web`'s HTTP side without a browser: static files, gRPC-Web framing, refusals."""
from __future__ import annotations

import http.client
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.parse

import pytest

from encinfer.web import Upstreams, WebServer, frames, parse_timeout, unframe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def web():
    # Nothing listens on these ports: every forwarded call finds its service down.
    server = WebServer("127.0.0.1:0", Upstreams(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")).start()
    yield server
    server.stop()


def request(web, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def trailers(body: bytes) -> dict[str, str]:
    out, at = {}, 0
    while at + 5 <= len(body):
        flag, n = body[at], struct.unpack_from(">I", body, at + 1)[0]
        if flag & 0x80:
            for line in body[at + 5:at + 5 + n].decode().split("\r\n"):
                if ":" in line:
                    k, v = line.split(":", 1)
                    out[k.strip()] = urllib.parse.unquote(v.strip())
        at += 5 + n
    return out


def grpc_web(web, path: str, message: bytes = b"", headers: dict | None = None):
    body = b"\x00" + struct.pack(">I", len(message)) + message
    return request(web, "POST", path, body, {"content-type": "application/grpc-web+proto", **(headers or {})})


def test_the_page_is_served_with_a_policy_that_allows_only_its_own_origin(web):
    status, headers, body = request(web, "GET", "/")
    assert status == 200 and b"<canvas id=\"pad\"" in body
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp


def test_webassembly_is_served_as_webassembly(web):
    status, headers, body = request(web, "GET", "/vendor/node-seal/seal_throws.wasm")
    if status == 404:
        pytest.skip("node-seal is not in the page's files: run `make web-deps`")
    assert headers["Content-Type"] == "application/wasm" and body[:4] == b"\0asm"


@pytest.mark.parametrize("path", ["/../pyproject.toml", "/%2e%2e/setup.py", "/__init__.py", "/nothing.js"])
def test_files_outside_the_page_are_not_served(web, path):
    assert request(web, "GET", path)[0] == 404


def test_a_method_the_page_does_not_use_is_unimplemented(web):
    status, _, body = grpc_web(web, "/encinfer.v1.KeyStore/DeleteKeys")
    assert status == 200 and trailers(body)["grpc-status"] == "12"


def test_a_forwarded_call_to_a_stopped_service_names_it(web):
    _, _, body = grpc_web(web, "/encinfer.v1.Inference/GetModelInfo", headers={"grpc-timeout": "5S"})
    t = trailers(body)
    assert t["grpc-status"] == "14" and "inference service" in t["grpc-message"]


def test_a_malformed_frame_is_invalid_argument(web):
    status, _, body = request(web, "POST", "/encinfer.v1.KeyStore/StatKeys", b"\x00\x00\x00\x00\x09abc",
                              {"content-type": "application/grpc-web+proto"})
    assert trailers(body)["grpc-status"] == "3" and "declares 9 bytes" in trailers(body)["grpc-message"]


def test_a_predict_with_a_ciphertext_that_is_not_seal_is_invalid_argument_before_any_call(web):
    from encinfer.v1 import inference_pb2 as pb
    message = pb.PredictRequest(model="m", key_id="k", ciphertext=b"\x5e\xa1\x10\x04\x01\x00\x00\x00" + b"\0" * 8)
    _, _, body = grpc_web(web, "/encinfer.v1.Inference/Predict", message.SerializeToString())
    t = trailers(body)
    assert t["grpc-status"] == "3" and "ciphertext" in t["grpc-message"]


def test_only_grpc_web_requests_are_forwarded(web):
    assert request(web, "POST", "/encinfer.v1.KeyStore/StatKeys", b"x", {"content-type": "text/plain"})[0] == 415


def test_a_body_over_the_message_limit_is_refused_unread(web):
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    conn.putrequest("POST", "/encinfer.v1.KeyStore/PutKeysUnary")
    conn.putheader("content-type", "application/grpc-web+proto")
    conn.putheader("content-length", str(64 << 20))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()


def test_grpc_web_framing_round_trips():
    assert unframe(b"\x00\x00\x00\x00\x03abc") == b"abc"
    with pytest.raises(ValueError):
        unframe(b"\x01\x00\x00\x00\x03abc")  # compressed frames are not accepted
    body = frames(b"xy", 5, "no such key: 1%")
    assert body[:8] == b"\x00\x00\x00\x00\x02xy\x80" and b"grpc-status: 5" in body and b"1%25" in body


def test_timeouts_follow_the_grpc_timeout_header_within_a_bound():
    assert parse_timeout("5S") == 5 and parse_timeout("250m") == 0.25
    assert parse_timeout("99999S") == 120 and parse_timeout("junk") == 30


def test_encinfer_web_serves_https_with_the_given_certificate(tmp_path):
    cert, key = _self_signed(tmp_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "encinfer.cli", "web", "--address", f"127.0.0.1:{port}",
                             "--cert", str(cert), "--key", str(key)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        import ssl
        ctx = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
                conn.request("GET", "/")
                assert conn.getresponse().status == 200
                break
            except (ConnectionRefusedError, OSError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(10)


def _self_signed(tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "web.crt", tmp_path / "web.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_the_common_polynomial_is_served_where_the_services_have_one(web):
    status, _, body = request(web, "GET", "/common-a?n=4096&bits=60")
    try:
        from encinfer.he import coeff
        from encinfer.he.params import CkksParams
    except ImportError:
        assert status == 404 and b"no common polynomial" in body
        return
    assert status == 200 and body == coeff.common_a(CkksParams(4096, (60,), 0, 0)).astype("<u8").tobytes()


@pytest.mark.parametrize("query", ["", "n=4096", "n=4096&bits=200", "n=100&bits=60", "n=x&bits=60"])
def test_the_common_polynomial_needs_secure_parameters(web, query):
    status, _, body = request(web, "GET", f"/common-a?{query}")
    assert status in (400, 404)
    if status == 400:
        assert b"common-a needs" in body or b"no common polynomial" in body


def test_health_is_answered_without_calling_the_services(web):
    # Nothing listens behind `web`: /healthz is about the gateway alone (container probes).
    status, _, body = request(web, "GET", "/healthz")
    assert status == 200 and body == b"ok\n"


def test_encinfer_web_defaults_to_the_projects_service_addresses(monkeypatch):
    from encinfer.cli import build_parser
    for var in ("ENCINFER_WEB_ADDRESS", "ENCINFER_KEYSTORE_TARGET", "ENCINFER_INFERENCE_TARGET", "ENCINFER_TLS_CA",
                "ENCINFER_TLS_CERT", "ENCINFER_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)
    args = build_parser().parse_args(["web"])
    assert (args.address, args.keystore, args.inference) == ("127.0.0.1:8080", "127.0.0.1:50051", "127.0.0.1:50052")
    assert (args.ca, args.cert, args.key) == ("", "", "")


def test_encinfer_web_takes_its_settings_from_the_environment_unless_flags_say_otherwise(monkeypatch):
    from encinfer.cli import build_parser
    env = {"ENCINFER_WEB_ADDRESS": "0.0.0.0:9080", "ENCINFER_KEYSTORE_TARGET": "keystore:50051",
           "ENCINFER_INFERENCE_TARGET": "proxy:50050", "ENCINFER_TLS_CA": "/tls/ca.crt",
           "ENCINFER_TLS_CERT": "/tls/server.crt", "ENCINFER_TLS_KEY": "/tls/server.key"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = build_parser().parse_args(["web", "--inference", "inference:50052"])
    assert (args.address, args.keystore, args.inference) == ("0.0.0.0:9080", "keystore:50051", "inference:50052")
    assert (args.ca, args.cert, args.key) == ("/tls/ca.crt", "/tls/server.crt", "/tls/server.key")


def test_encinfer_web_refuses_a_certificate_without_its_key(tmp_path):
    cert, _ = _self_signed(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCINFER_")}
    result = subprocess.run([sys.executable, "-m", "encinfer.cli", "web", "--address", f"127.0.0.1:{free_port()}"],
                            env={**env, "ENCINFER_TLS_CERT": str(cert)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "both --cert and --key" in result.stderr


def test_a_predict_carries_its_key_id_for_the_proxys_affinity():
    from concurrent import futures

    import grpc

    from encinfer.common.routing import KEY_ID_HEADER
    from encinfer.v1 import inference_pb2 as pb

    seen = []

    def predict(request: bytes, context) -> bytes:
        seen.append(dict(context.invocation_metadata()))
        return pb.PredictResponse().SerializeToString()

    upstream = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    upstream.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "encinfer.v1.Inference", {"Predict": grpc.unary_unary_rpc_method_handler(predict)})])
    port = upstream.add_insecure_port("127.0.0.1:0")
    upstream.start()
    server = WebServer("127.0.0.1:0", Upstreams(f"127.0.0.1:{free_port()}", f"127.0.0.1:{port}")).start()
    try:
        key_id = "ab" * 32
        message = pb.PredictRequest(model="m", key_id=key_id).SerializeToString()
        _, _, body = grpc_web(server, "/encinfer.v1.Inference/Predict", message,
                              {"authorization": "Bearer t", "grpc-timeout": "10S"})
    finally:
        server.stop()
        upstream.stop(0)
    assert trailers(body)["grpc-status"] == "0"
    assert seen and seen[0][KEY_ID_HEADER] == key_id and seen[0]["authorization"] == "Bearer t"
