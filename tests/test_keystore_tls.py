"""TLS on the key store's listener: a client that trusts the CA gets in, a plaintext one does not."""
from __future__ import annotations

import datetime
import ipaddress

import pytest
from conftest import fake_inspect, fake_key

from encinfer.client.keystore import KeyStoreClient
from encinfer.common import errors
from encinfer.common.rpc import TlsFiles


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (it is its own CA)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "encinfer test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return str(d / "cert.pem"), str(d / "key.pem")


@pytest.fixture
def ks(keystore_factory, certificate):
    cert, key = certificate
    return keystore_factory("fs", tokens="alice-t=alice:tenant", inspect=fake_inspect,
                            tls=TlsFiles(cert=cert, key=key))


def test_a_client_trusting_the_ca_works_over_tls(ks, certificate):
    with KeyStoreClient(ks.target, token="alice-t", tls=TlsFiles(ca=certificate[0])) as alice:
        data = fake_key()
        assert alice.get(alice.put(data).key_id) == data


def test_a_plaintext_client_cannot_talk_to_a_tls_listener(ks):
    with KeyStoreClient(ks.target, token="alice-t", timeout=5) as plain:
        with pytest.raises(errors.Unavailable):
            plain.stat("ab" * 32)
