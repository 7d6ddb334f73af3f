"""`encinfer probe`: a gRPC health check for container health checks (exit 0 = SERVING).

`--http PATH` checks an HTTP(S) server instead (`encinfer web`'s /healthz): the image has
Python but no curl, and one probe command keeps the health checks alike."""
from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encinfer.common.errors import from_status
from encinfer.common.rpc import TlsFiles, channel


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="check a service's gRPC health (for container health checks)")
    p.add_argument("address", help="host:port")
    p.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--ca", default=os.environ.get("ENCINFER_PROBE_TLS_CA", ""), help="CA file when the port speaks TLS")
    p.add_argument("--http", default="", metavar="PATH",
                   help="GET this path over HTTP (HTTPS with --ca) instead; healthy on a 2xx answer")
    p.set_defaults(func=run)


def http_ok(address: str, path: str, ca: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(healthy, what was seen) for GET http(s)://address/path."""
    url = f"{'https' if ca else 'http'}://{address}/{path.lstrip('/')}"
    context = ssl.create_default_context(cafile=ca) if ca else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
            return 200 <= reply.status < 300, f"{url}: HTTP {reply.status}"
    except urllib.error.HTTPError as e:
        return False, f"{url}: HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return False, f"{url}: {getattr(e, 'reason', e)}"


def run(args: argparse.Namespace) -> int:
    if args.http:
        healthy, seen = http_ok(args.address, args.http, args.ca, args.timeout)
        print(seen, file=sys.stdout if healthy else sys.stderr)
        return 0 if healthy else 1
    tls = TlsFiles(ca=args.ca) if args.ca else None
    with channel(args.address, tls) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as e:  # one line on stderr and exit 1, in `encinfer.cli.main`
            raise from_status(e.code().name, f"{args.address}: {e.details()}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
