"""The Ollama client: the only code that talks to the model server. It maps every
transport or HTTP failure to a HermesError so the service sees one error type, and every
message names the kind of server that failed (`label`), so a failure of an
OpenAI-compatible server is never blamed on Ollama."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from functools import cache
from typing import Any, ClassVar

import httpx

from hermes.errors import (
    HermesError,
    ModelNotFound,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from hermes.urls import public_url

# A host that drops packets (wrong VPC route) must fail fast, not eat the model timeout.
CONNECT_TIMEOUT_S = 2.0

# Why a backend is down, from whoever runs it: base URL → a callable answering a sentence
# (e.g. "the embedded model server (llama-cpp-python) was killed by SIGILL: ...") or None
# while it runs. The local runner registers its embedded model server here; on Lambda
# nothing is registered. A registry keyed by URL, rather than a client argument, because
# the clients are built deep inside each function's service and the layer must not import
# the runner: the runner only needs the URL it gave the server.
DownReason = Callable[[], str | None]
_down_reasons: dict[str, DownReason] = {}


def set_down_reason(base_url: str, reason: DownReason | None) -> None:
    """Register (or, with None, remove) the explanation for failures of the backend at
    `base_url`; consulted when a connection to it fails or breaks off."""
    key = base_url.rstrip("/")
    if reason is None:
        _down_reasons.pop(key, None)
    else:
        _down_reasons[key] = reason


class OllamaClient:
    # Names the kind of server in every error message; subclasses for other kinds set theirs.
    label: ClassVar[str] = "Ollama"

    def __init__(
        self,
        base_url: str,
        transport: httpx.AsyncBaseTransport | None = None,
        token_parameter: str | None = None,
    ) -> None:
        self.base_url = base_url
        self.shown_url = public_url(base_url)  # what messages may show of it
        self._transport = transport
        # A server behind an authenticating proxy: every request carries
        # `Authorization: Bearer <token>`, the token read from SSM or Secrets Manager when
        # first needed (hermes.backends.tokens) and kept only here, never in a message.
        self.token_parameter = token_parameter
        self._token: str | None = None
        self._tokens_read: set[str] = set()  # every one this client sent: scrubbed from text
        self._token_lock = threading.Lock()
        # One pooled client per event loop: a warm Lambda reuses its connections, and a
        # client is never used from a loop it was not created on.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = httpx.AsyncClient(
                base_url=self.base_url,
                transport=self._transport,
                verify=_ssl_context(),
                limits=httpx.Limits(max_keepalive_connections=20, keepalive_expiry=30),
            )
            self._clients[loop] = client
        return client

    async def _headers(self) -> dict[str, str]:
        """The Authorization header of a host with a token_parameter; {} otherwise."""
        if self.token_parameter is None:
            return {}
        token = self._token
        if token is None:
            token = await asyncio.to_thread(self._read_token)
        return {"Authorization": f"Bearer {token}"}

    def _read_token(self) -> str:
        from hermes.backends.tokens import read_token

        assert self.token_parameter is not None
        with self._token_lock:  # one read however many requests start at once
            if self._token is None:
                self._token = read_token(self.token_parameter)
                self._tokens_read.add(self._token)
            return self._token

    def _scrub(self, text: str) -> str:
        """`text` (an upstream's words, about to become an error message) without the token:
        a proxy may echo the header it refused."""
        for token in self._tokens_read:
            text = text.replace(token, "[token]")
        return text

    async def complete(self, path: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """One non-streamed /api/generate or /api/chat call (`body["model"]` is the tag)."""
        body = {**body, "stream": False}
        response = await self._request("POST", path, body["model"], timeout_s, json=body)
        data = _json_or_none(response)
        if not isinstance(data, dict) or not ("response" in data or "message" in data):
            raise UpstreamError(f"{self.label} answered {path} with an unexpected body")
        return data

    async def embed(self, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """One /api/embed call: `body` is Ollama's (`model` the tag, `input` a list of texts);
        the answer Ollama's, its vectors as the host computed them."""
        response = await self._request("POST", "/api/embed", body["model"], timeout_s, json=body)
        data = _json_or_none(response)
        vectors = data.get("embeddings") if isinstance(data, dict) else None
        if not isinstance(vectors, list) or len(vectors) != len(body["input"]):
            raise UpstreamError(f"{self.label} answered /api/embed with an unexpected body")
        answer: dict[str, Any] = data
        return answer

    async def stream(
        self, path: str, body: dict[str, Any], timeout_s: float
    ) -> AsyncIterator[dict[str, Any]]:
        """A streamed /api/generate or /api/chat call: Ollama's NDJSON objects, in order.
        Errors before the first object raise like `complete`; an `{"error"}` line mid-stream
        raises UpstreamError. Closing the iterator closes the connection, which stops Ollama."""
        body = {**body, "stream": True}
        timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
        headers = await self._headers()
        try:
            async with self._client().stream(
                "POST", path, json=body, timeout=timeout, headers=headers
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._raise_for_status(response, body["model"])
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        chunk = json.loads(line)
                    except ValueError:
                        raise UpstreamError(
                            f"{self.label} sent a line that is not JSON on {path}"
                        ) from None
                    if isinstance(chunk, dict) and "error" in chunk:
                        raise UpstreamError(
                            f"{self.label} failed mid-answer: "
                            + self._scrub(str(chunk["error"]))[:500]
                        )
                    yield chunk
        except httpx.HTTPError as exc:
            raise await self._transport_error(exc, timeout_s) from None

    async def get(self, path: str, timeout_s: float) -> dict[str, Any]:
        response = await self._request("GET", path, None, timeout_s)
        return self._object(response, path)

    async def post(self, path: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        response = await self._request("POST", path, body.get("model"), timeout_s, json=body)
        return self._object(response, path)

    def _object(self, response: httpx.Response, path: str) -> dict[str, Any]:
        data = _json_or_none(response)
        if not isinstance(data, dict):
            raise UpstreamError(f"{self.label} answered {path} with an unexpected body")
        return data

    async def loaded_models(self, timeout_s: float) -> list[dict[str, Any]]:
        """What Ollama has in memory (`/api/ps`); also serves as the health probe."""
        response = await self._request("GET", "/api/ps", None, timeout_s)
        data = _json_or_none(response)
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            raise UpstreamError(f"{self.label} answered /api/ps with an unexpected body")
        models: list[dict[str, Any]] = data["models"]
        return models

    async def _request(
        self, method: str, path: str, backend_model: str | None, timeout_s: float, **kwargs: Any
    ) -> httpx.Response:
        timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
        headers = await self._headers()
        try:
            response = await self._client().request(
                method, path, timeout=timeout, headers=headers, **kwargs
            )
        except httpx.HTTPError as exc:
            raise await self._transport_error(exc, timeout_s) from None
        self._raise_for_status(response, backend_model)
        return response

    @property
    def _subject(self) -> str:
        """The label at the start of a sentence."""
        return self.label[:1].upper() + self.label[1:]

    async def _transport_error(self, exc: httpx.HTTPError, timeout_s: float) -> HermesError:
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamTimeout(f"{self._subject} did not answer within {timeout_s:g} s")
        reason = _down_reasons.get(self.base_url.rstrip("/"))
        # In a thread: the runner's check may wait a moment for a dying process to be reaped.
        down = await asyncio.to_thread(reason) if reason is not None else None
        if down:
            return UpstreamUnavailable(down, retry_after=5)
        if isinstance(exc, httpx.ConnectError | httpx.UnsupportedProtocol):
            return UpstreamUnavailable(
                f"{self._subject} is unreachable at {self.shown_url} ({type(exc).__name__})",
                retry_after=5,
            )
        # Connected, then the answer broke off (crash, OOM kill, proxy reset).
        return UpstreamError(
            f"{self._subject} closed the connection mid-answer ({type(exc).__name__})"
        )

    def _missing_model(self, backend_model: str) -> str:
        return f"Ollama does not have model '{backend_model}'; run: ollama pull {backend_model}"

    def _raise_for_status(self, response: httpx.Response, backend_model: str | None) -> None:
        if response.status_code in (401, 403) and self.token_parameter is not None:
            self._token = None  # read again next time: the token may have been rotated
            raise UpstreamError(
                f"{self._subject} refused Hermes' bearer token ({response.status_code}): "
                f"check the token stored in {self.token_parameter}",
                upstream_status=response.status_code,
            )
        if response.status_code == 404 and backend_model is not None:
            raise ModelNotFound(self._missing_model(backend_model), backend_model=backend_model)
        if response.status_code == 503:
            # Ollama's "server busy, please try again" (OLLAMA_MAX_QUEUE reached).
            raise UpstreamUnavailable(
                f"{self._subject} is overloaded: {self._scrub(_error_text(response))}",
                retry_after=1,
            )
        if response.status_code >= 400:
            raise UpstreamError(
                f"{self._subject} answered {response.status_code}: "
                + self._scrub(_error_text(response)),
                upstream_status=response.status_code,
            )


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        message: str = data["error"]
        return message[:500]
    return str(data)[:200]


@cache
def _ssl_context() -> ssl.SSLContext:
    """One TLS context per process, shared by every host's client: building one loads the CA
    bundle (~65 ms), which /v1/status with 150 hosts would otherwise pay 150 times."""
    return httpx.create_ssl_context()
