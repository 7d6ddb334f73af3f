"""Where a command-line client connects, read in one place: the service targets, the token
and the TLS files, as flags with environment defaults (`encinfer predict`, `encinfer keys`,
`encinfer ghz-data` share them)."""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from encinfer.common.rpc import TlsFiles

INFERENCE_TARGET = "127.0.0.1:50052"
KEYSTORE_TARGET = "127.0.0.1:50051"


def add_arguments(p: argparse.ArgumentParser, *, inference: bool = True, keystore_flag: str = "--keystore") -> None:
    """--inference (optional), the key store's target flag, --token, --ca, --cert, --key."""
    if inference:
        p.add_argument("--inference", default=os.environ.get("ENCINFER_INFERENCE_TARGET", INFERENCE_TARGET),
                       help=f"inference host:port (default $ENCINFER_INFERENCE_TARGET or {INFERENCE_TARGET})")
    p.add_argument(keystore_flag, dest="keystore", default=os.environ.get("ENCINFER_KEYSTORE_TARGET", KEYSTORE_TARGET),
                   help=f"key store host:port (default $ENCINFER_KEYSTORE_TARGET or {KEYSTORE_TARGET})")
    p.add_argument("--token", default=os.environ.get("ENCINFER_TOKEN"), help="bearer token (default $ENCINFER_TOKEN)")
    p.add_argument("--ca", default=os.environ.get("ENCINFER_TLS_CA", ""),
                   help="CA file: speak TLS to the services (default $ENCINFER_TLS_CA)")
    p.add_argument("--cert", default="", help="client certificate for mutual TLS")
    p.add_argument("--key", default="", help="client private key for mutual TLS")


def tls_from(args: argparse.Namespace) -> TlsFiles | None:
    """The TLS files the flags name, or None for plaintext."""
    from encinfer.common.rpc import TlsFiles
    return TlsFiles(cert=args.cert, key=args.key, ca=args.ca) if (args.ca or args.cert) else None
