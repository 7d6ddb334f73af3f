"""Security on the wire, with both services as real processes configured by environment:
TLS on every listener (ENCINFER_TLS_CERT/KEY), mutual TLS on the key store
(ENCINFER_TLS_CLIENT_CA) with the inference service's own client certificate
(ENCINFER_KEYSTORE_TLS_CA/CERT/KEY), bearer tokens, and logs that never hold a token
or key material. Certificates come from a throwaway CA made here."""
from __future__ import annotations

import base64
import datetime
import ipaddress
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytest.register_assert_rewrite("inference_fixtures")
from inference_fixtures import CALL_TIMEOUT, MODEL
from service_procs import ServiceProcs

from encinfer.common.auth import auth_metadata
from encinfer.common.rpc import TlsFiles
from encinfer.v1 import inference_pb2 as pb
from encinfer.v1 import inference_pb2_grpc, keystore_pb2, keystore_pb2_grpc

pytest_plugins = ["inference_fixtures"]

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Random tokens, so finding one in a log can't be a coincidence.
ALICE, BOB, SERVICE = (secrets.token_urlsafe(24) for _ in range(3))
TOKENS = f"{ALICE}=alice:tenant,{BOB}=bob:tenant,{SERVICE}=inference:service"
REFUSED_WITHIN = 10.0  # seconds: a refusal must come as a status, not as a deadline


# ---------------------------------------------------------------------------- a throwaway PKI

@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str       # the inference service's (and a tenant's) client certificate
    client_key: str
    rogue_ca: str          # another CA, for certificates nobody here trusts
    rogue_cert: str
    rogue_key: str


def _name(cn: str):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, server: bool = False,
          client: bool = False):
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    usages = (([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
              + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []))
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert, key=None) -> tuple[str, str]:
    cert_path = directory / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f"{name}-key.pem"
    if key is not None:
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
    return str(cert_path), str(key_path)


def make_pki(directory: Path) -> Pki:
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "server", "client", "rogue-ca", "rogue")}
    ca = _cert("encinfer test CA", keys["ca"], "encinfer test CA", keys["ca"], ca=True)
    rogue_ca = _cert("someone else's CA", keys["rogue-ca"], "someone else's CA", keys["rogue-ca"], ca=True)
    ca_path, _ = _write(directory, "ca", ca)
    rogue_ca_path, _ = _write(directory, "rogue-ca", rogue_ca)
    server = _write(directory, "server", _cert("127.0.0.1", keys["server"], "encinfer test CA", keys["ca"],
                                               server=True), keys["server"])
    client = _write(directory, "client", _cert("inference", keys["client"], "encinfer test CA", keys["ca"],
                                               client=True), keys["client"])
    rogue = _write(directory, "rogue", _cert("inference", keys["rogue"], "someone else's CA", keys["rogue-ca"],
                                             client=True), keys["rogue"])
    return Pki(ca_path, *server, *client, rogue_ca_path, *rogue)


# ---------------------------------------------------------------------------- the services

@dataclass
class TlsServices:
    pki: Pki
    keystore: object    # ServiceProcess: TLS, client certificates required
    inference: object   # ServiceProcess: TLS; to the key store with its own client certificate
    workdir: Path

    @property
    def client_tls(self) -> TlsFiles:
        return TlsFiles(ca=self.pki.ca)

    @property
    def keystore_tls(self) -> TlsFiles:
        return TlsFiles(ca=self.pki.ca, cert=self.pki.client_cert, key=self.pki.client_key)


@pytest.fixture(scope="module")
def tls(mnist_model, tmp_path_factory):
    stem, _ = mnist_model
    workdir = tmp_path_factory.mktemp("tls")
    pki = make_pki(workdir)
    procs = ServiceProcs(workdir)
    server_tls = {"ENCINFER_TLS_CERT": pki.server_cert, "ENCINFER_TLS_KEY": pki.server_key, "ENCINFER_TOKENS": TOKENS}
    try:
        ks = procs.keystore({**server_tls, "ENCINFER_TLS_CLIENT_CA": pki.ca})
        inf = procs.inference(stem, ks.address, {
            **server_tls, "ENCINFER_KEYSTORE_TOKEN": SERVICE, "ENCINFER_KEYSTORE_TLS_CA": pki.ca,
            "ENCINFER_KEYSTORE_TLS_CERT": pki.client_cert, "ENCINFER_KEYSTORE_TLS_KEY": pki.client_key})
        yield TlsServices(pki, ks, inf, workdir)
    finally:
        procs.stop_all()


def classifier(s: TlsServices, token: str = ALICE, key_dir: str = "keys"):
    from encinfer.client.classifier import EncryptedClassifier
    return EncryptedClassifier(inference=s.inference.address, keystore=s.keystore.address, model=MODEL, token=token,
                               layout="latency", key_dir=s.workdir / key_dir, tls=s.client_tls,
                               keystore_tls=s.keystore_tls, timeout=CALL_TIMEOUT)


def health_check(target: str, credentials: grpc.ChannelCredentials | None) -> int:
    """Health/Check over a fresh channel: the status, or raises grpc.RpcError."""
    ch = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=REFUSED_WITHIN).status


def refusal(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        health_check(target, credentials)
    return err.value


def creds(ca: str | None = None, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key),
                                        certificate_chain=read(cert))


# ---------------------------------------------------------------------------- TLS

def test_encrypted_prediction_runs_end_to_end_over_tls(tls, test_images, mnist_model):
    # client -TLS-> inference -mutual TLS, own certificate-> key store; the client uploads over mutual TLS too.
    X = test_images[0][:4]
    with classifier(tls) as clf:
        scores = clf.decision_function(X)
    np.testing.assert_array_equal(scores.argmax(axis=1), mnist_model[1].scores(X).argmax(axis=1))
    assert [e.get("tls") for e in tls.inference.log_lines() if e.get("message") == "inference serving"] == [True]


def test_unary_predict_works_over_tls(tls, test_images, mnist_model):
    with classifier(tls) as clf:
        scores = clf.predict_one(test_images[0][5])
    assert scores.argmax() == mnist_model[1].scores(test_images[0][5:6]).argmax()


def test_a_client_without_the_ca_is_refused_with_a_handshake_failure(tls):
    started = time.monotonic()
    err = refusal(tls.inference.address, creds())  # the system's roots only
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert "handshake failed" in (err.details() or "").lower(), err.details()
    assert time.monotonic() - started < REFUSED_WITHIN  # refused, not left to time out


def test_a_client_trusting_another_ca_is_refused(tls):
    err = refusal(tls.inference.address, creds(ca=tls.pki.rogue_ca))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err


def test_a_plaintext_client_fails_cleanly_on_a_tls_port(tls):
    for target in (tls.inference.address, tls.keystore.address):
        err = refusal(target, None)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err


def test_plaintext_bytes_get_the_connection_closed_and_the_port_keeps_serving(tls):
    host, port = tls.inference.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=REFUSED_WITHIN) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0" * 64)
        received = b""
        while chunk := raw.recv(4096):  # bounded by the socket timeout: the server must close
            received += chunk
    assert not received.startswith(b"HTTP/")  # a TLS alert or nothing, never an answer
    assert health_check(tls.inference.address, creds(ca=tls.pki.ca)) == health_pb2.HealthCheckResponse.SERVING


def test_mutual_tls_refuses_a_client_without_a_certificate(tls):
    err = refusal(tls.keystore.address, creds(ca=tls.pki.ca))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err


def test_mutual_tls_refuses_a_certificate_from_another_ca(tls):
    err = refusal(tls.keystore.address, creds(ca=tls.pki.ca, cert=tls.pki.rogue_cert, key=tls.pki.rogue_key))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err


def test_mutual_tls_admits_a_certificate_from_the_ca(tls):
    assert health_check(tls.keystore.address, creds(tls.pki.ca, tls.pki.client_cert, tls.pki.client_key)) == \
        health_pb2.HealthCheckResponse.SERVING


def test_inference_refuses_to_read_keys_from_a_key_store_it_cannot_verify(tls, mnist_model, test_images):
    from encinfer.he.latency import encrypt_latency

    # Its key-store channel trusts another CA: no key ever arrives, and the caller hears UNAVAILABLE.
    with classifier(tls) as clf:
        secret, key_id = clf.keys("latency")  # uploaded through the trusted path
        ct = encrypt_latency(secret, test_images[0][0], clf.layout_info("latency"))
    procs = ServiceProcs(tls.workdir / "untrusting")
    procs.workdir.mkdir()
    try:
        inf = procs.inference(mnist_model[0], tls.keystore.address, {
            "ENCINFER_WORKERS": "0", "ENCINFER_TOKENS": TOKENS, "ENCINFER_KEYSTORE_TOKEN": SERVICE,
            "ENCINFER_KEYSTORE_TIMEOUT": "3", "ENCINFER_KEYSTORE_TLS_CA": tls.pki.rogue_ca,
            "ENCINFER_KEYSTORE_TLS_CERT": tls.pki.client_cert, "ENCINFER_KEYSTORE_TLS_KEY": tls.pki.client_key})
        with grpc.insecure_channel(inf.address) as ch, pytest.raises(grpc.RpcError) as err:
            inference_pb2_grpc.InferenceStub(ch).Predict(pb.PredictRequest(model=MODEL, key_id=key_id, ciphertext=ct),
                                                         metadata=auth_metadata(ALICE), timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    finally:
        procs.stop_all()


def test_probe_checks_health_over_tls(tls, capsys):
    from encinfer.cli import main
    assert main(["probe", tls.inference.address, "--ca", tls.pki.ca]) == 0
    assert "SERVING" in capsys.readouterr().out


# ---------------------------------------------------------------------------- tokens

def test_a_client_certificate_does_not_replace_the_bearer_token(tls):
    with grpc.secure_channel(tls.keystore.address, creds(tls.pki.ca, tls.pki.client_cert, tls.pki.client_key)) as ch:
        stub = keystore_pb2_grpc.KeyStoreStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListKeys(keystore_pb2.ListKeysRequest(), metadata=auth_metadata("not-a-token"), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_another_tenants_key_id_is_permission_denied_over_tls(tls, test_images):
    from encinfer.he.latency import encrypt_latency

    with classifier(tls) as alice:
        _, alice_key = alice.keys("latency")
    with classifier(tls, token=BOB, key_dir="bob-keys") as bob:
        secret, _ = bob.keys("latency")
        ct = encrypt_latency(secret, test_images[0][0], bob.layout_info("latency"))
    with grpc.secure_channel(tls.inference.address, creds(ca=tls.pki.ca)) as ch:
        with pytest.raises(grpc.RpcError) as err:
            inference_pb2_grpc.InferenceStub(ch).Predict(
                pb.PredictRequest(model=MODEL, key_id=alice_key, ciphertext=ct),
                metadata=auth_metadata(BOB), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ---------------------------------------------------------------------------- logs

def fragments(data: bytes, width: int = 24, count: int = 8) -> list[str]:
    """How a slice of these bytes would look in a log: hex, base64 and Python's bytes repr."""
    out = []
    for i in range(count):
        start = (len(data) - width) * i // count // 3 * 3  # base64 of a 3-aligned slice is a substring
        piece = data[start:start + width]
        out += [piece.hex(), base64.b64encode(piece).decode(), repr(piece)[2:-1]]
    return out


def test_logs_of_a_run_hold_no_token_and_no_key_material(tls, test_images):
    from encinfer.he.latency import encrypt_latency

    wrong = secrets.token_urlsafe(24)
    with classifier(tls) as clf:
        clf.decision_function(test_images[0][:2])
        secret, key_id = clf.keys("latency")
        ct = encrypt_latency(secret, test_images[0][1], clf.layout_info("latency"))
        public = secret.public_bundle()
    secret_files = [p.read_bytes() for p in (tls.workdir / "keys").glob("*.secret")]
    with grpc.secure_channel(tls.inference.address, creds(ca=tls.pki.ca)) as ch:
        with pytest.raises(grpc.RpcError):  # a refused token is not logged either
            inference_pb2_grpc.InferenceStub(ch).Predict(pb.PredictRequest(model=MODEL, key_id=key_id, ciphertext=ct),
                                                         metadata=auth_metadata(wrong), timeout=CALL_TIMEOUT)
    logs = {s.name: s.log_text() for s in (tls.keystore, tls.inference)}
    assert all(s.log_lines() for s in (tls.keystore, tls.inference))  # JSON lines were captured
    assert any(key_id in text for text in logs.values())  # the key id is fine to log, and it is there
    secrets_seen = [ALICE, BOB, SERVICE, wrong]
    material = [f for blob in (public, ct, *secret_files) for f in fragments(blob)]
    for name, text in logs.items():
        assert not [t for t in secrets_seen if t in text], f"a bearer token is in the {name} log"
        assert not [f for f in material if f in text], f"key or ciphertext bytes are in the {name} log"


# ---------------------------------------------------------------------------- ghz over TLS

def test_ghz_data_commands_run_over_tls(tls):
    import json
    import shlex
    import subprocess

    from encinfer.client import ghzdata

    ghz = ghzdata.ghz_binary()
    if not ghz.is_file():
        pytest.skip(f"no ghz binary at {ghz}")
    data = ghzdata.write_ghz_data(tls.inference.address, tls.keystore.address, ALICE, tls.workdir / "ghz",
                                  n_predict=2, n_stream=2, tls=tls.client_tls, keystore_tls=tls.keystore_tls,
                                  with_batch=False)
    argv = shlex.split(ghzdata.commands(data, str(ghz))["predict"])
    assert "--cacert" in argv and "--insecure" not in argv
    result = subprocess.run([argv[0], "-O", "json", *argv[1:]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["statusCodeDistribution"] == {"OK": report["count"]}
