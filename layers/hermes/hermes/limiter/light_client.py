"""The limiter's DynamoDB requests without boto3's CPU.

A waiting request holds a Lambda instance (256 MB: about 0.15 vCPU) and its notice poller
reads its grant notice every POLL_FAST_S; a release, on the path of every answer, writes
two or three times. boto3 spends about 3 ms of CPU per call (its event hooks, shape
serializers and parsers, then http.client), several times that when its code has gone cold
between calls (bench/waiting_cost.py measures it), more than a waiting instance's whole CPU
share at the poller's pace and most of a handoff's time. These requests (the reads GetItem,
Query, BatchGetItem and the writes UpdateItem, PutItem, DeleteItem, TransactWriteItems) are
sent here instead: signed with SigV4 exactly as botocore signs them
(tests/unit/test_light_client.py compares the two), written as one HTTP/1.1 request on a
kept-alive socket per thread, for about a fifth of that.

Endpoint, region and credentials are the boto3 client's, and the request and answer are
DynamoDB's JSON, the same dicts boto3 takes and returns, so a call here does exactly what
boto3's would. A failed condition (ConditionalCheckFailedException, and
TransactionCanceledException with its reasons) raises botocore's ClientError with the
response boto3 would have parsed, so callers map it as they map boto3's. Anything else but a
200 answer (throttling, another error, a broken connection, a timeout) raises
LightCallFailed: the caller sends the same request through boto3, with its retries and its
error mapping. For a write that may have landed unanswered this is botocore's own retry:
transactions carry a ClientRequestToken and conditional updates recognize their own write.
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

from botocore.exceptions import ClientError

TIMEOUT_S = 2.0  # as hermes.aws's read timeout
OPERATIONS = {
    "get_item": "GetItem",
    "query": "Query",
    "batch_get_item": "BatchGetItem",
    "update_item": "UpdateItem",
    "put_item": "PutItem",
    "delete_item": "DeleteItem",
    "transact_write_items": "TransactWriteItems",
}
READS = ("get_item", "query", "batch_get_item")
# Errors answered as boto3 answers them (ClientError); any other goes through boto3 again.
CONDITION_ERRORS = {"ConditionalCheckFailedException", "TransactionCanceledException"}
MAX_ANSWER_BYTES = 4 * 1024 * 1024


class LightCallFailed(Exception):
    """The call did not answer as DynamoDB answers a successful call or a failed condition:
    send it through boto3."""


class LightClient:
    def __init__(self, client: Any, writes: bool = True) -> None:
        """`client`: the boto3 DynamoDB client whose endpoint, region and credentials to use.
        `writes=False`: reads only (writes go through boto3, where X-Ray's patch sees them).
        """
        self.operations = tuple(OPERATIONS) if writes else READS
        import boto3

        endpoint = urlsplit(client.meta.endpoint_url)
        self._https = endpoint.scheme == "https"
        self._host = endpoint.netloc
        self._address = (endpoint.hostname or "", endpoint.port or (443 if self._https else 80))
        self._region = client.meta.region_name
        self._credentials = boto3.Session().get_credentials()
        self._local = threading.local()  # one connection per thread
        # Calls sent, by DynamoDB operation: boto3's event hooks (tests' meters) miss these.
        self.calls: collections.Counter[str] = collections.Counter()

    def call(self, operation: str, request: dict[str, Any]) -> dict[str, Any]:
        """`operation` (one of OPERATIONS, boto3's name) with boto3's arguments; its answer."""
        if self._credentials is None:
            raise LightCallFailed("no AWS credentials")
        frozen = self._credentials.get_frozen_credentials()
        if not (frozen.access_key and frozen.secret_key):
            raise LightCallFailed("no AWS credentials")
        body = json.dumps(request).encode()
        message = self._signed(frozen, OPERATIONS[operation], body)
        self.calls[OPERATIONS[operation]] += 1
        try:
            status, data = self._exchange(message)
        except (OSError, ValueError) as error:
            self.close()  # a fresh connection next time
            raise LightCallFailed(f"{type(error).__name__}: {error}") from None
        if status != 200:
            raise condition_failed(operation, status, data) or LightCallFailed(
                f"HTTP {status}: {data[:200]!r}"
            )
        try:
            answer: dict[str, Any] = json.loads(data)
        except ValueError:
            raise LightCallFailed(f"not JSON: {data[:200]!r}") from None
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


def condition_failed(operation: str, status: int, data: bytes) -> ClientError | None:
    """botocore's ClientError for an answer that says a condition failed, with what callers
    read of boto3's (the error's code and message, ALL_OLD's `Item`, a transaction's
    `CancellationReasons`); None for any other answer."""
    if status != 400:
        return None
    try:
        answer = json.loads(data)
        code = str(answer.get("__type", "")).rpartition("#")[2]
    except (ValueError, AttributeError):
        return None
    if code not in CONDITION_ERRORS:
        return None
    message = answer.get("message") or answer.get("Message", "")
    response = {k: answer[k] for k in ("Item", "CancellationReasons") if k in answer}
    response["Error"] = {"Code": code, "Message": message}
    return ClientError(response, OPERATIONS.get(operation, operation))  # type: ignore[arg-type]
