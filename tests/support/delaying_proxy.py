"""A slow DynamoDB on demand: an HTTP proxy in front of DynamoDB Local that delays answers,
or drops them after the request has been applied (a lost answer), per operation.

Runners point AWS_ENDPOINT_URL_DYNAMODB at `proxy.url`. Each request reaches DynamoDB at
once (or after `before_s`), so a write lands when it would; only its answer comes late
(`after_s`), as with throttling retries or a slow network path. The proxy also checks every
request against DynamoDB's documented limits (tests/support/dynamodb_limits.py), which
DynamoDB Local does not enforce: `violations` lists the ones broken.

    with DelayingProxy(dynamodb_local.url) as proxy:
        proxy.slow("UpdateItem", after_s=(2.0, 6.0), share=0.5)  # half the writes answer late
        proxy.drop("UpdateItem", count=3)  # the next 3 writes land, their answers never come
"""

from __future__ import annotations

import collections
import http.client
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

from tests.support.dynamodb_limits import violations

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}

# What DynamoDB (or the proxy) answers: status, headers, body.
Answer = tuple[int, list[tuple[str, str]], bytes]


@dataclass
class Slowness:
    before_s: tuple[float, float] = (0.0, 0.0)  # before the request reaches DynamoDB
    after_s: tuple[float, float] = (0.0, 0.0)  # after DynamoDB answered, before the client hears
    share: float = 1.0  # the fraction of requests that are slowed


class DelayingProxy:
    def __init__(self, upstream: str, seed: int = 1) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.rules: dict[str, Slowness] = {}
        self.drops: dict[str, int] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.slowed: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.violations: list[str] = []
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.proxy = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def slow(
        self,
        operation: str = "*",
        *,
        before_s: float | tuple[float, float] = 0.0,
        after_s: float | tuple[float, float] = 0.0,
        share: float = 1.0,
    ) -> None:
        """Delay `operation` ("*" for all): each delay a fixed value or a (min, max) range."""
        with self.lock:
            self.rules[operation] = Slowness(_range(before_s), _range(after_s), share)

    def drop(self, operation: str, count: int) -> None:
        """Apply the next `count` requests of `operation`, then close the connection unanswered."""
        with self.lock:
            self.drops[operation] = count

    def reset(self) -> None:
        with self.lock:
            self.rules.clear()
            self.drops.clear()
            self.calls.clear()
            self.slowed.clear()
            self.dropped.clear()
            self.violations.clear()

    def exchange(
        self, operation: str, body: bytes, forward: Callable[[bytes], Answer]
    ) -> Answer | None:
        """One request, from arrival to answer: what the client hears, or None to close the
        connection unanswered. `forward` sends a body to DynamoDB and returns its answer.
        Subclasses override this to answer in DynamoDB's place or to hold an answer back."""
        before, after, drop = self._plan(operation, body)
        time.sleep(before)
        answer = forward(body)
        if drop:
            return None
        time.sleep(after)
        return answer

    def _plan(self, operation: str, body: bytes) -> tuple[float, float, bool]:
        """(delay before, delay after, drop the answer) for one request, and its checks."""
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            params = {}
        broken = violations(operation, params)
        with self.lock:
            self.calls[operation] += 1
            self.violations += broken
            if self.drops.get(operation, 0) > 0:
                self.drops[operation] -= 1
                self.dropped[operation] += 1
                return 0.0, 0.0, True
            rule = self.rules.get(operation) or self.rules.get("*")
            if rule is None or self.rng.random() >= rule.share:
                return 0.0, 0.0, False
            self.slowed[operation] += 1
            return self.rng.uniform(*rule.before_s), self.rng.uniform(*rule.after_s), False

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


def _range(value: float | tuple[float, float]) -> tuple[float, float]:
    return value if isinstance(value, tuple) else (value, value)


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog is 5: a hundred clients connecting at once would have
    # their SYNs dropped and meet botocore's 1 s connect timeout, which DynamoDB never causes.
    request_queue_size = 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore expects
    server: Any

    def setup(self) -> None:
        super().setup()
        # Small answers must not wait for Nagle + delayed ACK (~40 ms each).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream: http.client.HTTPConnection | None = None

    def do_POST(self) -> None:
        proxy: DelayingProxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        operation = (self.headers.get("X-Amz-Target") or "").rpartition(".")[2]
        answer = proxy.exchange(operation, body, self._forward)
        if answer is None:
            self.close_connection = True  # closed unanswered: the client hears nothing
            return
        status, headers, content = answer
        try:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client gave up waiting (its read timeout)

    def _forward(self, body: bytes) -> Answer:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        for attempt in range(2):
            if self.upstream is None:
                host, port = self.server.proxy.upstream
                self.upstream = http.client.HTTPConnection(host, port, timeout=30)
            try:
                self.upstream.request("POST", self.path, body=body, headers=headers)
                response = self.upstream.getresponse()
                return response.status, response.getheaders(), response.read()
            except (OSError, http.client.HTTPException):
                self.upstream.close()
                self.upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def finish(self) -> None:
        super().finish()
        if self.upstream is not None:
            self.upstream.close()

    def log_message(self, *_: Any) -> None:
        pass  # one line per DynamoDB call would drown the test output
