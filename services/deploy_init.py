"""`encinfer deploy-init`: compose's one-shot that gives a fresh deployment its credentials.

On the first `docker compose up` it writes the dev credentials (MinIO's root user, the
key store's MinIO user, the tokens) and a TLS certificate authority with one server
certificate into volumes, one volume per group of readers, so that each service
mounts only what it may read (the inference service never sees a storage credential).
Later runs keep what is there. An operator who brings their own puts files of the same
names in deploy/secrets/ (what `encinfer stack secrets` writes; for TLS, `ca.crt`,
`server.crt` and `server.key`): a complete group found there is copied instead of
generated, on every run, so a rotated file reaches the volume at the next `up`.

Environment (each a directory; a group whose variable is unset is skipped):
ENCINFER_INIT_OPERATOR_DIR (the operator's files, read-only), ENCINFER_INIT_MINIO_DIR,
ENCINFER_INIT_KEYSTORE_S3_DIR, ENCINFER_INIT_TOKENS_DIR, ENCINFER_INIT_TLS_DIR, and
ENCINFER_INIT_TLS_NAMES (comma-separated DNS names and IP addresses the server
certificate is valid for).
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from encinfer.common.errors import InvalidArgument
from encinfer.common.files import write_atomic
from encinfer.stack import SECRET_GROUPS

log = logging.getLogger(__name__)

DEFAULT_TLS_NAMES = "keystore,inference,localhost,127.0.0.1"
TLS_FILES = ("ca.crt", "server.crt", "server.key")
CERT_DAYS = 825


def _group(*names: str) -> Callable[[], dict[str, str]]:
    """The generator of `encinfer stack secrets` that writes these files (one source of dev secrets)."""
    wanted = set(names)
    generators = [generate for files, generate in SECRET_GROUPS if set(files) & wanted]

    def generate() -> dict[str, str]:
        out: dict[str, str] = {}
        for g in generators:
            out.update(g())
        return {k: v for k, v in out.items() if k in wanted}
    return generate


@dataclass(frozen=True)
class Group:
    """Files that are written (or copied) together into one directory."""

    variable: str
    files: tuple[str, ...]
    generate: Callable[[], dict[str, str]]


def tls_files(names: list[str]) -> dict[str, str]:
    """A fresh CA (its key is not kept: nothing is ever signed again) and a server certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "encinfer compose CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
              .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return {
        "ca.crt": ca.public_bytes(pem).decode(),
        "server.crt": server.public_bytes(pem).decode(),
        "server.key": server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()).decode(),
    }


def groups(tls_names: list[str]) -> list[Group]:
    return [
        Group("ENCINFER_INIT_MINIO_DIR", ("minio_root_user", "minio_root_password"),
              _group("minio_root_user", "minio_root_password")),
        Group("ENCINFER_INIT_KEYSTORE_S3_DIR", ("keystore_s3_access_key", "keystore_s3_secret_key"),
              _group("keystore_s3_access_key", "keystore_s3_secret_key")),
        Group("ENCINFER_INIT_TOKENS_DIR", ("tokens.json", "inference_keystore_token", "demo_token"),
              _group("tokens.json", "inference_keystore_token", "demo_token")),
        Group("ENCINFER_INIT_TLS_DIR", TLS_FILES, lambda: tls_files(tls_names)),
    ]


def _write(directory: Path, contents: dict[str, str]) -> None:
    for name, text in contents.items():
        # Owner-only: every reader runs as the owner (uid 10001) or as root (MinIO's image).
        write_atomic(directory / name, text, mode=0o600)


def initialize(env: dict[str, str] | None = None) -> dict[str, str]:
    """Fills each configured directory; returns {group variable: 'operator' | 'kept' | 'generated'}."""
    env = dict(os.environ) if env is None else env
    operator = Path(env["ENCINFER_INIT_OPERATOR_DIR"]) if env.get("ENCINFER_INIT_OPERATOR_DIR") else None
    names = [n.strip() for n in env.get("ENCINFER_INIT_TLS_NAMES", DEFAULT_TLS_NAMES).split(",") if n.strip()]
    if not names:
        raise InvalidArgument("ENCINFER_INIT_TLS_NAMES names no host")
    done: dict[str, str] = {}
    for group in groups(names):
        if not env.get(group.variable):
            continue
        directory = Path(env[group.variable])
        if not directory.is_dir():
            raise InvalidArgument(f"{group.variable}={directory} is not a directory (a volume should be mounted there)")
        if operator is not None and all((operator / f).is_file() for f in group.files):
            _write(directory, {f: (operator / f).read_text(encoding="utf-8") for f in group.files})
            done[group.variable] = "operator"
        elif all((directory / f).is_file() for f in group.files):
            done[group.variable] = "kept"
        else:
            _write(directory, group.generate())
            done[group.variable] = "generated"
        log.info("credentials ready", extra={"fields": {"dir": str(directory), "files": list(group.files),
                                                         "source": done[group.variable]}})
    return done


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy-init", help="compose's one-shot: credentials and TLS files into their volumes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from encinfer.common import logs
    from encinfer.common.errors import EncinferError

    logs.configure()
    try:
        initialize()
    except (EncinferError, OSError) as exc:
        log.error("deploy-init failed", extra={"fields": {"error": str(exc)}})
        return 1
    return 0
