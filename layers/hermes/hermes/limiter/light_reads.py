"""The reads a waiting request repeats, many times a second, without boto3's CPU.

A waiting request holds a Lambda instance (256 MB: about 0.15 vCPU) and its notice poller
reads its grant notice every POLL_FAST_S, its check reads the queue every CHECK_S. boto3
spends about 3 ms of CPU per call (its event hooks, shape serializers and parsers, then
http.client; bench/waiting_cost.py measures it), more than that instance's whole CPU share at
that pace. These reads (GetItem, Query, BatchGetItem) are sent here instead: signed with SigV4
exactly as botocore signs them (tests/unit/test_light_reads.py compares the two), written as
one HTTP/1.1 request on a kept-alive socket per thread, for about a fifth of that.

Endpoint, region and credentials are the boto3 client's, and the request and answer are
DynamoDB's JSON, the same dicts boto3 takes and returns, so a read here reads exactly what
boto3 would. Anything but a 200 answer (a throttled read, an error, a broken connection)
raises LightReadFailed: the caller reads through boto3 instead, with its retries and its
error mapping.
"""

from __future__ import annotations

import collections
import datetime
import functools
import hashlib
import hmac
import json
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit

TIMEOUT_S = 2.0  # as hermes.aws's read timeout
OPERATIONS = {"get_item": "GetItem", "query": "Query", "batch_get_item": "BatchGetItem"}
MAX_ANSWER_BYTES = 4 * 1024 * 1024


class LightReadFailed(Exception):
    """The read did not answer as DynamoDB answers a successful read."""


class LightReader:
    def __init__(self, client: Any) -> None:
        """`client`: the boto3 DynamoDB client whose endpoint, region and credentials to use."""
        import boto3

        endpoint = urlsplit(client.meta.endpoint_url)
        self._https = endpoint.scheme == "https"
        self._host = endpoint.netloc
        self._address = (endpoint.hostname or "", endpoint.port or (443 if self._https else 80))
        self._region = client.meta.region_name
        self._credentials = boto3.Session().get_credentials()
        self._local = threading.local()  # one connection per thread
        # Reads sent, by DynamoDB operation: boto3's event hooks (tests' meters) miss these.
        self.calls: collections.Counter[str] = collections.Counter()

    def call(self, operation: str, request: dict[str, Any]) -> dict[str, Any]:
        """`operation` (one of OPERATIONS, boto3's name) with boto3's arguments; its answer."""
        if self._credentials is None:
            raise LightReadFailed("no AWS credentials")
        frozen = self._credentials.get_frozen_credentials()
        if not (frozen.access_key and frozen.secret_key):
            raise LightReadFailed("no AWS credentials")
        body = json.dumps(request).encode()
        message = self._signed(frozen, OPERATIONS[operation], body)
        self.calls[OPERATIONS[operation]] += 1
        try:
            status, data = self._exchange(message)
        except (OSError, ValueError) as error:
            self.close()  # a fresh connection next time
            raise LightReadFailed(f"{type(error).__name__}: {error}") from None
        if status != 200:
            raise LightReadFailed(f"HTTP {status}: {data[:200]!r}")
        try:
            answer: dict[str, Any] = json.loads(data)
        except ValueError:
            raise LightReadFailed(f"not JSON: {data[:200]!r}") from None
        return answer

    def _signed(self, frozen: Any, operation: str, body: bytes) -> bytes:
        """The whole request, signed. A poller sends the same read many times a second, and
        SigV4 signs only the body, the headers and the second: within one second the same
        read is the same bytes, so they are kept rather than hashed and signed again."""
        second = int(time.time())
        memo = (second, operation, body, frozen)
        last = getattr(self._local, "signed", None)
        if last is not None and last[0] == memo:
            message: bytes = last[1]
            return message
        headers = sign(
            frozen.access_key, frozen.secret_key, frozen.token, self._region, self._host,
            f"DynamoDB_20120810.{operation}", body,
            datetime.datetime.fromtimestamp(second, datetime.UTC),
        )  # fmt: skip
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        message = f"POST / HTTP/1.1\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        self._local.signed = (memo, message)
        return message

    def _exchange(self, message: bytes) -> tuple[int, bytes]:
        """Send one request, read one answer (its status and body, by Content-Length)."""
        connection = getattr(self._local, "socket", None) or self._connect()
        connection.sendall(message)
        received = b""
        while b"\r\n\r\n" not in received:
            received += self._receive(connection, len(received))
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        if "content-length" not in fields:  # (chunked: never from DynamoDB; boto3 reads it)
            raise ValueError(f"an answer without Content-Length: {lines[0]}")
        length = int(fields["content-length"])
        while len(body) < length:
            body += self._receive(connection, len(body))
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, body[:length]

    def _receive(self, connection: socket.socket, so_far: int) -> bytes:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError("the connection closed mid-answer")
        if so_far + len(chunk) > MAX_ANSWER_BYTES:
            raise ValueError("an answer over 4 MB")
        return chunk

    def _connect(self) -> socket.socket:
        connection = socket.create_connection(self._address, timeout=TIMEOUT_S)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._https:
            context = ssl.create_default_context()
            connection = context.wrap_socket(connection, server_hostname=self._address[0])
        self._local.socket = connection
        return connection

    def close(self) -> None:
        """This thread's connection (the next call opens a new one)."""
        connection = getattr(self._local, "socket", None)
        self._local.socket = None
        if connection is not None:
            connection.close()


def sign(
    access_key: str,
    secret_key: str,
    token: str | None,
    region: str,
    host: str,
    target: str,
    body: bytes,
    now: datetime.datetime,
) -> dict[str, str]:
    """The headers of a DynamoDB JSON request (POST /) signed with AWS Signature Version 4
    (a session token, as Lambda's credentials have, is signed too, as botocore does).
    Written out flat, with one-shot digests: a waiting instance signs a read every few dozen
    milliseconds on a fraction of a vCPU, and each Python step here costs it."""
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    # The signed headers, in SigV4's order (lowercase names, sorted).
    headers = {
        "Content-Type": "application/x-amz-json-1.0",
        "Host": host,
        "X-Amz-Date": amz_date,
    }
    if token:
        headers["X-Amz-Security-Token"] = token
    headers["X-Amz-Target"] = target
    names = ";".join(name.lower() for name in headers)
    lines = "".join(f"{name.lower()}:{value}\n" for name, value in headers.items())
    canonical = f"POST\n/\n\n{lines}\n{names}\n{hashlib.sha256(body).hexdigest()}"
    scope = f"{day}/{region}/dynamodb/aws4_request"
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{digest}"
    signature = hmac.digest(signing_key(secret_key, day, region), to_sign.encode(), "sha256")
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={names}, Signature={signature.hex()}"
    )
    return headers  # Host included: http.client then sends exactly the one signed


@functools.lru_cache(maxsize=4)
def signing_key(secret_key: str, day: str, region: str) -> bytes:
    """SigV4's key for one day and region: four HMACs that a poller repeating its read every
    few dozen milliseconds need not redo (it changes at midnight UTC, or with the secret)."""
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, "dynamodb", "aws4_request"):
        key = hmac.digest(key, part.encode(), "sha256")
    return key
