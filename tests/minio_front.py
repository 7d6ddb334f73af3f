"""A front to the real MinIO that answers chosen requests as a MinIO in trouble does (503 with
MinIO's own error code: XML to S3 calls, JSON to admin calls) and forwards the rest unchanged,
so a test can make MinIO's short-lived answers (a node still starting, a write quorum not met
for a moment) happen on purpose."""
from __future__ import annotations

import http.server
import threading
from collections.abc import Callable

import urllib3

# (method, path) -> the error code to answer with, or None to forward; "after:CODE" forwards
# the call and then answers CODE (a call that was made although its answer says otherwise).
Refuse = Callable[[str, str], "str | None"]


class MinioFront:
    def __init__(self, backend: str, refuse: Refuse) -> None:
        front = self
        self.refused: list[tuple[str, str, str]] = []  # (method, path, code)
        pool = urllib3.PoolManager(retries=False)

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def handle_one(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                code = refuse(self.command, self.path)
                if code and code.startswith("after:"):  # the call is made, and its answer lost
                    pool.request(self.command, f"http://{backend}{self.path}", body=body,
                                 headers=dict(self.headers), preload_content=True, redirect=False)
                    code = code[len("after:"):]
                if code:
                    front.refused.append((self.command, self.path, code))
                    admin = self.path.startswith("/minio/admin")
                    answer = (f'{{"Code":"{code}","Message":"{code} (from the test front)"}}' if admin else
                              f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{code} '
                              f'(from the test front)</Message><Resource>{self.path}</Resource>'
                              f'<RequestId>1</RequestId></Error>').encode()
                    self.send_response(404 if code in ("NoSuchKey", "NoSuchBucket") else 503)
                    self.send_header("Content-Type", "application/json" if admin else "application/xml")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                reply = pool.request(self.command, f"http://{backend}{self.path}", body=body,
                                     headers=dict(self.headers), preload_content=True, redirect=False)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply.data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> MinioFront:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def starting(s3: int, admin: int) -> Refuse:
    """The first `s3` S3 requests and the first `admin` admin requests answered as a distributed MinIO
    answered right after it listened (XMinioServerNotInitialized to S3, XMinioAdminConfigNoQuorum to
    admin calls, both seen in the scale suite)."""
    left = {"s3": s3, "admin": admin}

    def refuse(method: str, path: str) -> str | None:
        kind = "admin" if path.startswith("/minio/admin") else "s3"
        if left[kind] <= 0:
            return None
        left[kind] -= 1
        return "XMinioAdminConfigNoQuorum" if kind == "admin" else "XMinioServerNotInitialized"
    return refuse


def busy_writes(count: int, code: str = "SlowDownWrite") -> Refuse:
    """The first `count` object writes (PUT /bucket/object) answered `code`, as MinIO answers while a
    node that just died still counts for its write quorum."""
    return _first_object_calls("PUT", count, code)


def busy_reads(count: int) -> Refuse:
    """The first `count` object reads (GET /bucket/object) answered SlowDownRead, as MinIO answered
    in the seconds after a second node of four died (the same answer as for a corrupt object)."""
    return _first_object_calls("GET", count, "SlowDownRead")


def _first_object_calls(method: str, count: int, code: str) -> Refuse:
    left = [count]

    def refuse(called: str, path: str) -> str | None:
        bare = path.split("?")[0]
        if called != method or bare.startswith("/minio/") or bare.count("/") < 2 or left[0] <= 0:
            return None
        left[0] -= 1
        return code
    return refuse


def degraded_without(names: set[str]) -> Refuse:
    """MinIO without its write quorum that cannot find some objects it holds: GETs of the objects
    named in `names` ("keys/<id>") answered NoSuchKey, its cluster health endpoint 503."""
    def refuse(method: str, path: str) -> str | None:
        bare = path.split("?")[0]
        if bare == "/minio/health/cluster":
            return "XMinioWriteQuorum"
        if method == "GET" and any(bare.endswith("/" + name) for name in names):
            return "NoSuchKey"
        return None
    return refuse
