"""`encinfer probe`: a gRPC health check for container health checks (exit 0 = SERVING)."""
from __future__ import annotations

import argparse
import os

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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
