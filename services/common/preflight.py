"""Checks a service runs before it starts anything: ports free, TLS files usable.

A failed start should fail at once, with one line that says what to fix, and before
any worker process or listener exists: grpc's own bind error is a C-core line on
stderr, and a gRPC port bound by a server that never starts stays in LISTEN with
nobody answering. The checks cannot rule out a race (a port taken between the check
and the bind); the real bind still fails then, and the caller cleans up.
"""
from __future__ import annotations

import errno
import socket
import ssl
from pathlib import Path

from encinfer.common.errors import ConfigError
from encinfer.common.rpc import TlsFiles

# What a failed check raises: the one error for configuration that cannot work.
StartupError = ConfigError


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]") or "0.0.0.0", int(port)
    except ValueError:
        raise StartupError(f"{address!r} is not host:port") from None


def check_port_free(host: str, port: int, setting: str) -> None:
    """Binds (never listens) every address host resolves to, as grpc and http.server would."""
    if port == 0:
        return  # any free port: the kernel picks one at bind time
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(f"cannot resolve {host!r} ({e.strerror}): fix {setting}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no conflict
            try:
                s.bind(sockaddr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise StartupError(f"port {port} on {host} is already in use by another process: "
                                       f"stop that process or change {setting}") from None
                if e.errno == errno.EADDRNOTAVAIL:
                    raise StartupError(f"{host} is not an address of this host: fix {setting}") from None
                raise StartupError(f"cannot bind {host}:{port} ({e.strerror}): fix {setting}") from None


def _readable(path: str, setting: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise StartupError(f"{setting}={path} does not exist or is not a file")
    try:
        p.read_bytes()
    except OSError as e:
        raise StartupError(f"{setting}={path} cannot be read ({e.strerror})") from None


# The variables that name a listener's TLS files, and the inference service's to the key store:
# every message names the one to fix.
SERVER_TLS_VARS = {"cert": "ENCINFER_TLS_CERT", "key": "ENCINFER_TLS_KEY", "ca": "ENCINFER_TLS_CLIENT_CA"}
KEYSTORE_CLIENT_TLS_VARS = {"cert": "ENCINFER_KEYSTORE_TLS_CERT", "key": "ENCINFER_KEYSTORE_TLS_KEY",
                            "ca": "ENCINFER_KEYSTORE_TLS_CA"}


def check_server_tls(tls: TlsFiles, names: dict[str, str] = SERVER_TLS_VARS) -> None:
    """The certificate and key parse and belong together; the client CA (if any) parses."""
    cert, key = names["cert"], names["key"]
    _readable(tls.cert, cert)
    _readable(tls.key, key)
    try:
        ssl.create_default_context(cafile=tls.cert)
    except ssl.SSLError:
        raise StartupError(f"{cert}={tls.cert} holds no PEM certificate: fix the file") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(tls.cert, tls.key, password=lambda: b"")  # an encrypted key fails, never prompts
    except ssl.SSLError as e:
        what = ("is not the private key of" if e.reason == "KEY_VALUES_MISMATCH"
                else "is not an unencrypted PEM private key (for")
        close = "" if e.reason == "KEY_VALUES_MISMATCH" else ")"
        raise StartupError(f"{key}={tls.key} {what} {cert}={tls.cert}{close}: fix the files") from None
    if tls.ca:
        _check_ca(tls.ca, names["ca"])


def check_client_tls(tls: TlsFiles, names: dict[str, str] = KEYSTORE_CLIENT_TLS_VARS) -> None:
    """A client's CA, and its certificate and key if it has them."""
    if tls.ca:
        _check_ca(tls.ca, names["ca"])
    if tls.cert or tls.key:
        check_server_tls(TlsFiles(cert=tls.cert, key=tls.key), names)


def _check_ca(path: str, setting: str) -> None:
    _readable(path, setting)
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError:
        raise StartupError(f"{setting}={path} holds no PEM CA certificate: fix the file") from None
