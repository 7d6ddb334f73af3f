#!/usr/bin/env python3
"""Renders the key-affinity proxy configurations, nginx and HAProxy, from one description.

Both hash every call on its `x-encinfer-key-id` metadata (consistent hashing, so a
replica's arrival or loss moves only its share of the keys) and speak HTTP/2 (gRPC)
on both sides. Calls to /encinfer.v1.KeyStore/ go to the key store replicas, the rest
to the inference replicas. Kubernetes uses Envoy instead (deploy/k8s/base/envoy.yaml).

    python deploy/proxy/render.py nginx --listen 127.0.0.1:50060 \\
        --inference 127.0.0.1:50061 --inference 127.0.0.1:50062 --keystore 127.0.0.1:50051 \\
        --runtime-dir var/proxy > var/proxy/nginx.conf
    nginx -c "$PWD/var/proxy/nginx.conf"              # runs in the foreground
    haproxy -db -f var/proxy/haproxy.cfg              # the same with HAProxy

deploy/proxy/nginx.conf and haproxy.cfg are this script's output for EXAMPLE (run
`python deploy/proxy/render.py --write-examples` after a change; tests/test_proxy.py
fails when they differ). Debian bookworm's versions: nginx 1.22 (`listen ... http2`),
HAProxy 2.6.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

KEY_ID_HEADER = "x-encinfer-key-id"
HERE = Path(__file__).resolve().parent
# Seconds a stream may stay silent (a long PredictStream between two inputs).
STREAM_IDLE_SECONDS = 300


@dataclass(frozen=True)
class ProxyTopology:
    listen: str
    inference: tuple[str, ...]
    keystore: tuple[str, ...] = ()
    # nginx's pid and temporary files, and the error log of both (the root filesystem may be read-only).
    runtime_dir: str = "/tmp/encinfer-proxy"
    # False: round robin over the inference replicas (the baseline `make bench-scale` compares).
    affinity: bool = True
    # MinIO's nodes behind an HTTP/1.1 listener (`encinfer stack up --minio-nodes 4`), round
    # robin with health checks, as the `minio` Service does in Kubernetes. Empty: none.
    s3_listen: str = ""
    minio: tuple[str, ...] = ()


EXAMPLE = ProxyTopology(listen="127.0.0.1:50060",
                        inference=("127.0.0.1:50061", "127.0.0.1:50062", "127.0.0.1:50063"),
                        keystore=("127.0.0.1:50051",),
                        runtime_dir="/tmp/encinfer-proxy")

HEADER = "# Rendered by deploy/proxy/render.py: edit that, not this file.\n"


def nginx(t: ProxyTopology) -> str:
    """nginx 1.22: `hash ... consistent` on the header, grpc_pass to HTTP/2 upstreams."""
    variable = "$http_" + KEY_ID_HEADER.replace("-", "_")

    def upstream(name: str, servers: tuple[str, ...], hashed: bool) -> str:
        lines = [f"    upstream {name} {{"]
        if hashed:
            # Calls without the header (ListModels, GetModelInfo) hash the empty string: one replica.
            lines.append(f"        hash {variable} consistent;")
        # Passive health: a replica that refuses connections is skipped for 5 s.
        lines += [f"        server {s} max_fails=1 fail_timeout=5s;" for s in servers]
        lines += ["        keepalive 16;", "    }"]
        return "\n".join(lines)

    def location(prefix: str, name: str) -> str:
        return "\n".join([
            f"        location {prefix} {{",
            f"            grpc_pass grpc://{name};",
            f"            grpc_read_timeout {STREAM_IDLE_SECONDS}s;",
            f"            grpc_send_timeout {STREAM_IDLE_SECONDS}s;",
            # A replica that cannot be reached: the next one on the ring (the call never started).
            "            grpc_next_upstream error timeout;",
            "        }",
        ])

    r = t.runtime_dir
    blocks = [upstream("inference", t.inference, t.affinity)]
    locations = [location("/encinfer.v1.Inference/", "inference")]
    if t.keystore:
        blocks.append(upstream("keystore", t.keystore, False))
        locations.append(location("/encinfer.v1.KeyStore/", "keystore"))
    # grpc.health.v1 and reflection: whichever inference replica the (empty) hash picks.
    locations.append(location("/", "inference"))
    return HEADER + f"""\
# Key-id affinity for encinfer: every call hashed on its {KEY_ID_HEADER} metadata.
daemon off;
worker_processes 1;
pid {r}/nginx.pid;
error_log {r}/nginx-error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {r}/client_body;
    proxy_temp_path {r}/proxy;
    fastcgi_temp_path {r}/fastcgi;
    uwsgi_temp_path {r}/uwsgi;
    scgi_temp_path {r}/scgi;
    # Streams are unbounded; each message is bounded by the services (4 MiB).
    client_max_body_size 0;
    http2_max_concurrent_streams 256;

{chr(10).join(blocks)}

    server {{
        listen {t.listen} http2;
{chr(10).join(locations)}
    }}
{_nginx_s3(t)}}}
"""


def _nginx_s3(t: ProxyTopology) -> str:
    """MinIO behind nginx: round robin; a refused or reset connection goes to the next node.

    Not a 503: MinIO answers one while it starts or is short of a quorum, and counting it
    as a node failure would take healthy nodes out (all of them, while the cluster starts).
    """
    if not t.minio:
        return ""
    servers = "\n".join(f"        server {s} max_fails=1 fail_timeout=5s;" for s in t.minio)
    return f"""
    upstream minio {{
{servers}
        keepalive 16;
    }}

    server {{
        listen {t.s3_listen};
        location / {{
            proxy_pass http://minio;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # S3 signatures cover the Host header: pass the client's own.
            proxy_set_header Host $http_host;
            # Streamed, not spooled: nginx's workers (www-data when started as root) may not
            # write the runtime dir, and a key needs no second copy on disk.
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout {STREAM_IDLE_SECONDS}s;
            proxy_next_upstream error timeout non_idempotent;
        }}
    }}
"""


def haproxy(t: ProxyTopology) -> str:
    """HAProxy 2.6: `balance hdr(...)` with `hash-type consistent`, `proto h2` on bind and servers."""
    def backend(name: str, servers: tuple[str, ...], hashed: bool) -> str:
        lines = [f"backend {name}"]
        if hashed and t.affinity:
            # Calls without the header fall back to round robin.
            lines += [f"    balance hdr({KEY_ID_HEADER})", "    hash-type consistent"]
        else:
            lines.append("    balance roundrobin")
        # A replica that cannot be reached: retry once on another (the call never started).
        lines += ["    retries 2", "    option redispatch 1", "    retry-on conn-failure empty-response"]
        # A refused connection marks the replica down at once (not only after two failed checks):
        # the retry is then hashed over the remaining replicas like every later call, so a
        # dead replica's keys move to one new owner each, not first to a redispatch target.
        lines += [f"    server {name}-{i} {s} proto h2 check inter 2s fall 2 rise 1"
                  " observe layer4 error-limit 1 on-error mark-down"
                  for i, s in enumerate(servers, 1)]
        return "\n".join(lines)

    routes = ["    use_backend keystore if { path_beg /encinfer.v1.KeyStore/ }"] if t.keystore else []
    backends = [backend("inference", t.inference, True)]
    backends += [backend("keystore", t.keystore, False)] if t.keystore else []
    return HEADER + f"""\
# Key-id affinity for encinfer: every call hashed on its {KEY_ID_HEADER} metadata.
global
    log stderr format raw local0 warning
    maxconn 4096

defaults
    mode http
    log global
    timeout connect 2s
    timeout client {STREAM_IDLE_SECONDS}s
    timeout server {STREAM_IDLE_SECONDS}s

frontend grpc
    bind {t.listen} proto h2
{chr(10).join(routes)}
    default_backend inference

{(chr(10) * 2).join(backends)}
{_haproxy_s3(t)}"""


def _haproxy_s3(t: ProxyTopology) -> str:
    """MinIO behind HAProxy: round robin, HTTP health checks; a refused connection goes to another node."""
    if not t.minio:
        return ""
    servers = "\n".join(f"    server minio-{i} {s} check inter 1s fall 2 rise 1"
                         for i, s in enumerate(t.minio, 1))
    return f"""
frontend s3
    bind {t.s3_listen}
    default_backend minio

backend minio
    balance roundrobin
    option httpchk GET /minio/health/live
    http-check expect status 200
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
{servers}
"""


RENDERERS = {"nginx": (nginx, "nginx.conf"), "haproxy": (haproxy, "haproxy.cfg")}


def write_examples(directory: Path = HERE) -> list[Path]:
    written = []
    for render, filename in RENDERERS.values():
        path = directory / filename
        path.write_text(render(EXAMPLE), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", nargs="?", choices=sorted(RENDERERS))
    p.add_argument("--listen", default=EXAMPLE.listen)
    p.add_argument("--inference", action="append", metavar="HOST:PORT", help="an inference replica (repeatable)")
    p.add_argument("--keystore", action="append", metavar="HOST:PORT", help="a key store replica (repeatable)")
    p.add_argument("--runtime-dir", default=EXAMPLE.runtime_dir)
    p.add_argument("--write-examples", action="store_true", help=f"rewrite {HERE.name}/nginx.conf and haproxy.cfg")
    args = p.parse_args(argv)
    if args.write_examples:
        for path in write_examples():
            print(path)
        return 0
    if not args.kind:
        p.error("name a proxy (nginx or haproxy) or pass --write-examples")
    topology = ProxyTopology(listen=args.listen, inference=tuple(args.inference or EXAMPLE.inference),
                             keystore=tuple(args.keystore or ()), runtime_dir=args.runtime_dir)
    sys.stdout.write(RENDERERS[args.kind][0](topology))
    return 0


if __name__ == "__main__":
    sys.exit(main())
