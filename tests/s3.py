"""Loopback S3 for tests: moto's real S3 HTTP server, and a seeded proxy that breaks requests in front of it.

boto3 talks HTTP to these exactly as to AWS S3, R2 or MinIO, so the store's retries, multipart
transfers and error messages are exercised for real, without a cloud.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import random
import socket
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import urlsplit

REGION = "us-east-1"
FAKE_KEY, FAKE_SECRET = "testing", "testing"  # moto accepts any key until IAM auth is switched on


class S3Bucket(NamedTuple):
    """A fresh bucket on the loopback server: `uri` is s3://<bucket>/<prefix>."""

    uri: str
    endpoint: str

    @property
    def bucket(self) -> str:
        return self.uri[len("s3://") :].split("/")[0]

    @property
    def prefix(self) -> str:
        return self.uri[len("s3://") :].partition("/")[2]


def start_moto():
    """moto's threaded S3 server on a free loopback port; returns (server, endpoint URL)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def s3_client(endpoint: str, key: str = FAKE_KEY, secret: str = FAKE_SECRET, service: str = "s3"):
    """A boto3 client with explicit test credentials, for doing things behind a store's back."""
    import boto3

    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
    )


def make_bucket(endpoint: str, prefix: str = "lmctl") -> S3Bucket:
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return S3Bucket(f"s3://{name}/{prefix}", endpoint)


def _set_auth(endpoint: str, initial_no_auth: str) -> None:
    """moto's switch for signature and IAM checks: after this many unchecked requests ("inf" = never)."""
    url = urlsplit(endpoint)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request("POST", "/moto-api/reset-auth", body=initial_no_auth.encode())
        resp = conn.getresponse()
        assert resp.status == 200, f"moto reset-auth answered {resp.status}: {resp.read()[:200]!r}"
    finally:
        conn.close()


@contextlib.contextmanager
def iam_auth(endpoint: str, users: dict[str, list[str]]) -> Iterator[dict[str, tuple[str, str]]]:
    """Create IAM users allowed the given S3 actions, then make moto check signatures and policies.

    Yields {user: (access key id, secret)}. Auth is a process-wide moto setting, so it is switched
    back off on exit; tests using this must not run concurrently with other S3 tests.
    """
    iam = s3_client(endpoint, service="iam")
    creds = {}
    for user, actions in users.items():
        name = f"{user}-{uuid.uuid4().hex[:8]}"  # the moto server outlives a test: names must not repeat
        iam.create_user(UserName=name)
        if actions:
            policy = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
            }
            iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        creds[user] = (key["AccessKeyId"], key["SecretAccessKey"])
    _set_auth(endpoint, "0")
    try:
        yield creds
    finally:
        _set_auth(endpoint, "inf")


# ---------------------------------------------------------------- fault injection

_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}
_SLOWDOWN = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>injected</Message></Error>"


class FaultProxy:
    """A reverse proxy on 127.0.0.1 that fails a seeded fraction of requests, for boto3 to retry.

    Faults: `error_rate` answers 503 SlowDown; `reset_rate` resets the connection before replying;
    `cut_rate` (GETs only) sends the headers and half the body, then closes. `requests` counts what
    came in, `faults` counts what was injected, by kind.
    """

    def __init__(self, upstream: str, seed: int = 0, error_rate=0.0, reset_rate=0.0, cut_rate=0.0):
        self.upstream = urlsplit(upstream)
        self.rates = {"error": error_rate, "reset": reset_rate, "cut": cut_rate}
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.proxy = self
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def draw(self, method: str) -> str | None:
        """Count the request and pick its fate: one seeded draw per request."""
        with self.lock:
            self.requests[method] += 1
            r, edge = self.rng.random(), 0.0
            for kind, rate in self.rates.items():
                edge += rate
                if r < edge and (kind != "cut" or method == "GET"):
                    self.faults[kind] += 1
                    return kind
            return None

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as botocore expects
    timeout = 30

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                out += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return out
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy
        body = self._body()
        fault = proxy.draw(self.command)
        if fault == "reset":  # RST instead of a reply: linger 0, then close
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if fault == "error":
            self.send_response_only(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOWDOWN)))
            self.end_headers()
            self.wfile.write(_SLOWDOWN)
            return
        up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            up.request(self.command, self.path, body=body, headers=headers)
            resp = up.getresponse()
            data = resp.read()
        finally:
            up.close()
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if fault == "cut" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True  # FIN after half the promised body: an incomplete read
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy
