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
import time
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
# What a torn PUT must not carry for the server to store it: every checksum of the whole body.
_CHECKSUMS = {"content-md5", "x-amz-content-sha256", "x-amz-sdk-checksum-algorithm", "x-amz-trailer"}
KINDS = ("error", "reset", "cut", "slow", "stall", "abort", "torn", "flip")
OUTAGES = ("error", "reset", "down")


class FaultProxy:
    """A reverse proxy on 127.0.0.1 that fails a seeded fraction of requests, for boto3 to retry.

    One seeded draw per request picks its fate (each kind applies only where it can; elsewhere the
    request passes):

    - `error_rate`: answers 503 SlowDown, forwarding nothing.
    - `reset_rate`: reads the request, forwards nothing, resets the connection (RST) instead of replying.
    - `cut_rate` (GET): forwards, sends the headers and half the body, then closes.
    - `slow_rate`: forwards, then holds the reply for a delay drawn from `slow_s` (lo, hi) seconds.
    - `stall_rate`: forwards, then holds the reply for `stall_s` seconds, meant to exceed the client's
      read timeout: the request took effect upstream but the client gives up and retries it.
    - `abort_rate` (PUT/POST with a body): reads half the body, forwards nothing, resets the
      connection: the client's upload dies mid-way.
    - `torn_rate` (PUT with a body): forwards only the first half of the body, with a matching
      Content-Length and no checksum headers, and relays the server's 200: a silently torn object
      that only the client's own verification (size/sha256 after upload) can catch.
    - `flip_rate` (PUT with a body): forwards the whole body with one byte changed, no checksum headers,
      and relays the server's 200: the size and the sha256 metadata the client sent are right, the
      object is not; only what the server computed from the bytes (its ETag) or a read-back tells.

    `then(kind, ...)` scripts the fates of the next requests. `outage(kind, after)` fails every request
    after the next `after` with 503s ("error"), resets ("reset"), or by going down ("down": the
    listening socket is closed, so connects are refused, and kept-alive connections are reset);
    `heal()` ends it. `requests` counts what came in by method, `faults` what was injected by kind
    (outage faults included), `history` every request as (method, path, fault).
    """

    def __init__(
        self,
        upstream: str,
        seed: int = 0,
        error_rate=0.0,
        reset_rate=0.0,
        cut_rate=0.0,
        slow_rate=0.0,
        stall_rate=0.0,
        abort_rate=0.0,
        torn_rate=0.0,
        flip_rate=0.0,
        slow_s: tuple[float, float] = (0.2, 1.0),
        stall_s: float = 5.0,
    ):
        self.upstream = urlsplit(upstream)
        self.rates = {
            "error": error_rate,
            "reset": reset_rate,
            "cut": cut_rate,
            "slow": slow_rate,
            "stall": stall_rate,
            "abort": abort_rate,
            "torn": torn_rate,
            "flip": flip_rate,
        }
        assert sum(self.rates.values()) <= 1.0, self.rates
        self.slow_s, self.stall_s = slow_s, stall_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.history: list[tuple[str, str, str | None]] = []  # (method, path, fault) of every request
        self._outage: tuple[str, int] | None = None  # (kind, requests still let through)
        self._script: list[str | None] = []  # fates of the next requests, before any draw
        self.server = self._serve(0)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._running = False

    def _serve(self, port: int) -> _QuietServer:
        server = _QuietServer(("127.0.0.1", port), _Handler)
        server.proxy = self
        return server

    def draw(self, method: str, body: int = 0, path: str = "") -> tuple[str | None, float]:
        """Count the request and pick its fate and delay: one seeded draw per request.

        `body` is the request's Content-Length (-1: chunked, length unknown)."""
        with self.lock:
            self.requests[method] += 1
            fault, delay = self._fate(method, body)
            if fault is not None:
                self.faults[fault] += 1
            self.history.append((method, path, fault))
            return fault, delay

    def _fate(self, method: str, body: int) -> tuple[str | None, float]:
        if self._script:
            kind = self._script.pop(0)
            return (kind, self._delay(kind)) if kind and _applies(kind, method, body) else (None, 0.0)
        if self._outage is not None:
            kind, left = self._outage
            if left <= 0:
                return kind, 0.0
            self._outage = (kind, left - 1)
        r, edge = self.rng.random(), 0.0
        for kind, rate in self.rates.items():
            edge += rate
            if r < edge:  # a kind this request cannot have (a cut PUT): it passes
                return (kind, self._delay(kind)) if _applies(kind, method, body) else (None, 0.0)
        return None, 0.0

    def _delay(self, kind: str) -> float:
        if kind == "slow":
            return self.rng.uniform(*self.slow_s)
        return self.stall_s if kind == "stall" else 0.0

    def then(self, *kinds: str | None) -> None:
        """The next requests get these fates, in order (None: passes; a kind that cannot apply: passes)."""
        assert all(k is None or k in KINDS for k in kinds), kinds
        with self.lock:
            self._script += kinds

    def outage(self, kind: str = "error", after: int = 0) -> None:
        """From the request after the next `after` on, fail every request with `kind` (see OUTAGES)."""
        assert kind in OUTAGES, kind
        with self.lock:
            self._outage = (kind, after)
        if kind == "down" and after == 0:
            self.go_down()

    def heal(self) -> None:
        """End an outage; a proxy that went down listens again on the same port."""
        with self.lock:
            self._outage = None
            down = not self._running
        if down:
            self.server = self._serve(self.port)
            self._start()

    def go_down(self) -> None:
        """Stop listening (a handler calls this when an outage of kind "down" begins)."""
        with self.lock:
            if not self._running:
                return
            self._running = False
            server = self.server
        server.shutdown()
        server.server_close()

    def _start(self) -> None:
        self._running = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> FaultProxy:
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.go_down()


def _checksum(header: str) -> bool:
    return header.lower() in _CHECKSUMS or header.lower().startswith("x-amz-checksum-")


def _applies(kind: str, method: str, body: int) -> bool:
    if kind == "cut":
        return method == "GET"
    if kind == "abort":
        return method in ("PUT", "POST") and (body > 1 or body < 0)
    if kind in ("torn", "flip"):
        return method == "PUT" and body > 1
    return True


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that gave up (timeout, reset) while a fault held its reply is expected, not news."""
        import sys

        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as botocore expects
    timeout = 30

    def log_message(self, *args) -> None:
        pass

    def _length(self) -> int:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return -1
        return int(self.headers.get("Content-Length") or 0)

    def _body(self) -> bytes:
        if self._length() < 0:
            out = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                out += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return out
        return self.rfile.read(self._length())

    def _reset(self) -> None:
        """RST instead of a reply: linger 0, then close."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy
        length = self._length()
        fault, delay = proxy.draw(self.command, length, self.path)
        if fault == "down":
            proxy.go_down()
            fault = "reset"
        if fault == "abort":  # half the body arrives, then the connection dies
            self.rfile.read(length // 2 if length > 0 else 1)
            self._reset()
            return
        body = self._body()
        if fault == "reset":
            self._reset()
            return
        if fault == "error":
            self.send_response_only(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOWDOWN)))
            self.end_headers()
            self.wfile.write(_SLOWDOWN)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if fault in ("torn", "flip"):
            half = len(body) // 2
            body = (
                body[:half]
                if fault == "torn"
                else body[:half] + bytes([body[half] ^ 0xFF]) + body[half + 1 :]
            )
            headers = {k: v for k, v in headers.items() if not _checksum(k)}
            headers["X-Amz-Content-SHA256"] = "UNSIGNED-PAYLOAD"
        up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
        try:
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            up.request(self.command, self.path, body=body, headers=headers)
            resp = up.getresponse()
            data = resp.read()
        finally:
            up.close()
        if delay:
            time.sleep(delay)  # the request took effect upstream; its reply comes late (or too late)
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
