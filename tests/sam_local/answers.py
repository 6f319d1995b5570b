"""One shape for an answer from either local path, so they can be compared.

What must match: status, error code, the headers a caller acts on, and the body's shape
(keys, nesting, value types). Not compared: values that differ by nature between two calls
(generated ids, latencies, timestamps, token text).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from local.template import ROOT

EVENTS = sorted((ROOT / "events").glob("*.json"))
HEADERS = ("content-type", "retry-after", "location", "allow")


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: a direct or SQS answer, which has no HTTP status
    code: str | None
    headers: tuple[tuple[str, str], ...]
    shape: Any
    body: Any = field(default=None, compare=False)  # for a test's own checks, not compared

    def comparable(self) -> tuple[Any, ...]:
        return self.status, self.code, self.headers, self.shape


def shape(value: Any) -> Any:
    """Keys and types; a list by the shapes its items have (not how many there are)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return sorted({json.dumps(shape(item), sort_keys=True) for item in value})
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def parse_body(text: str) -> Any:
    """JSON, or a stream (NDJSON, or server-sent events) as the list of its events."""
    try:
        return json.loads(text)
    except ValueError:
        items = []
        for line in text.splitlines():
            line = line.removeprefix("data: ").strip()
            if line and line != "[DONE]":
                items.append(json.loads(line))
        return items


def _headers(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    lowered = {name.lower(): value for name, value in headers.items()}
    return tuple(
        (name, lowered[name] if name != "location" else "present")
        for name in HEADERS
        if name in lowered
    )


def from_http(response: httpx.Response) -> Answer:
    body = parse_body(response.text)
    code = body.get("code") if isinstance(body, dict) else None
    return Answer(response.status_code, code, _headers(dict(response.headers)), shape(body), body)


def from_lambda(answer: dict[str, Any]) -> Answer:
    """A function's own answer: an API Gateway proxy response, or a plain dict."""
    if "statusCode" in answer:
        text = answer.get("body") or ""
        if answer.get("isBase64Encoded"):
            text = base64.b64decode(text).decode()
        body = parse_body(text)
        code = body.get("code") if isinstance(body, dict) else None
        headers = _headers(answer.get("headers", {}))
        return Answer(answer["statusCode"], code, headers, shape(body), body)
    return Answer(None, answer.get("code"), (), shape(answer), answer)


def request_for(event: dict[str, Any]) -> dict[str, Any]:
    """The HTTP request an API Gateway HTTP API event stands for (httpx.request kwargs)."""
    body = event.get("body") or ""
    content = base64.b64decode(body) if event.get("isBase64Encoded") else body.encode()
    query = event.get("rawQueryString") or ""
    headers = {
        name: value
        for name, value in event.get("headers", {}).items()
        if name.lower() not in ("host", "content-length")
    }
    return {
        "method": event["requestContext"]["http"]["method"],
        "url": event["rawPath"] + (f"?{query}" if query else ""),
        "headers": headers,
        "content": content or None,
    }


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]
