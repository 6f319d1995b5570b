"""The Ollama client: the only code that talks to the model server. It maps every
transport or HTTP failure to a HermesError so the service sees one error type."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import httpx

from hermes.errors import ModelNotFound, UpstreamError, UpstreamTimeout, UpstreamUnavailable

# A host that drops packets (wrong VPC route) must fail fast, not eat the model timeout.
CONNECT_TIMEOUT_S = 2.0


class OllamaClient:
    def __init__(self, base_url: str, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url
        self._transport = transport
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
                limits=httpx.Limits(max_keepalive_connections=20, keepalive_expiry=30),
            )
            self._clients[loop] = client
        return client

    async def generate(
        self,
        backend_model: str,
        prompt: str,
        *,
        timeout_s: float,
        system: str | None = None,
        options: dict[str, Any] | None = None,
        format: str | dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": backend_model, "prompt": prompt, "stream": False}
        if system is not None:
            body["system"] = system
        if options:
            body["options"] = options
        if format is not None:
            body["format"] = format
        response = await self._request("POST", "/api/generate", backend_model, timeout_s, json=body)
        data = _json_or_none(response)
        if not isinstance(data, dict) or not isinstance(data.get("response"), str):
            raise UpstreamError("Ollama answered /api/generate with an unexpected body")
        return data

    async def loaded_models(self, timeout_s: float) -> list[dict[str, Any]]:
        """What Ollama has in memory (`/api/ps`); also serves as the health probe."""
        response = await self._request("GET", "/api/ps", None, timeout_s)
        data = _json_or_none(response)
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            raise UpstreamError("Ollama answered /api/ps with an unexpected body")
        models: list[dict[str, Any]] = data["models"]
        return models

    async def _request(
        self, method: str, path: str, backend_model: str | None, timeout_s: float, **kwargs: Any
    ) -> httpx.Response:
        timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
        try:
            response = await self._client().request(method, path, timeout=timeout, **kwargs)
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"Ollama did not answer within {timeout_s:g} s") from None
        except (httpx.ConnectError, httpx.UnsupportedProtocol) as exc:
            raise UpstreamUnavailable(
                f"Ollama is unreachable at {self.base_url} ({type(exc).__name__})", retry_after=5
            ) from None
        except httpx.TransportError as exc:
            # Connected, then the answer broke off (crash, OOM kill, proxy reset).
            raise UpstreamError(
                f"Ollama closed the connection mid-answer ({type(exc).__name__})"
            ) from None
        if response.status_code == 404 and backend_model is not None:
            raise ModelNotFound(
                f"Ollama does not have model '{backend_model}'; run: ollama pull {backend_model}",
                backend_model=backend_model,
            )
        if response.status_code == 503:
            # Ollama's "server busy, please try again" (OLLAMA_MAX_QUEUE reached).
            raise UpstreamUnavailable(
                f"Ollama is overloaded: {_error_text(response)}", retry_after=1
            )
        if response.status_code >= 400:
            raise UpstreamError(
                f"Ollama answered {response.status_code}: {_error_text(response)}",
                upstream_status=response.status_code,
            )
        return response


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
