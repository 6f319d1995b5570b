"""A backend that speaks OpenAI's API (llama.cpp server, vLLM, LM Studio, Ollama's own /v1).

It offers the same calls as OllamaClient and answers in Ollama's shapes, which are the
one internal format of Hermes: the service, limits and both public dialects stay unaware
of which kind of server is behind a model. /api/generate maps to /v1/completions (a raw
prompt, as the seed's /v1/llm sends), /api/chat to /v1/chat/completions.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx

from hermes.backends.ollama import CONNECT_TIMEOUT_S, OllamaClient
from hermes.errors import UpstreamError

# Ollama option → OpenAI request field.
OPTION_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "num_predict": "max_tokens",
    "seed": "seed",
    "stop": "stop",
}


class OpenAIClient(OllamaClient):
    """Reuses OllamaClient's pooled transport and error mapping; translates the payloads."""

    label = "the OpenAI-compatible server"

    def _missing_model(self, backend_model: str) -> str:
        # No `ollama pull` here: such a server serves what it was started with.
        return (
            f"{self._subject} at {self.shown_url} does not serve model '{backend_model}'; "
            "its GET /v1/models lists the names it serves"
        )

    async def complete(self, path: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        started = time.perf_counter_ns()
        route, payload = _request(path, body, stream=False)
        response = await self._request("POST", route, body["model"], timeout_s, json=payload)
        data = self._object(response, route)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if path == "/api/chat" else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise UpstreamError(
                f"{self._subject} answered {route} with an unexpected body"
            ) from None
        return _final(
            path, body["model"], text or "", choice.get("finish_reason"), data.get("usage"), started
        )

    async def embed(self, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Ollama's /api/embed body sent as OpenAI's /v1/embeddings, and the answer in
        Ollama's shape: the vectors in input order, exactly as the server computed them."""
        started = time.perf_counter_ns()
        payload: dict[str, Any] = {
            "model": body["model"],
            "input": body["input"],
            "encoding_format": "float",
        }
        if body.get("dimensions") is not None:
            payload["dimensions"] = body["dimensions"]
        response = await self._request(
            "POST", "/v1/embeddings", body["model"], timeout_s, json=payload
        )
        data = self._object(response, "/v1/embeddings")
        try:
            rows = sorted(data["data"], key=lambda row: row["index"])
            vectors = [row["embedding"] for row in rows]
        except (KeyError, TypeError):
            vectors = None
        if not isinstance(vectors, list) or len(vectors) != len(body["input"]):
            raise UpstreamError(f"{self._subject} answered /v1/embeddings with an unexpected body")
        given = data.get("usage")
        usage: dict[str, Any] = given if isinstance(given, dict) else {}
        return {
            "model": body["model"],
            "embeddings": vectors,
            "total_duration": max(1, time.perf_counter_ns() - started),
            "load_duration": 0,
            "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
        }

    async def stream(
        self, path: str, body: dict[str, Any], timeout_s: float
    ) -> AsyncIterator[dict[str, Any]]:
        started = time.perf_counter_ns()
        route, payload = _request(path, body, stream=True)
        timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
        finish, usage, pieces = None, None, 0
        headers = await self._headers()
        try:
            async with self._client().stream(
                "POST", route, json=payload, timeout=timeout, headers=headers
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._raise_for_status(response, body["model"])
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise UpstreamError(
                            f"{self._subject} failed mid-answer: "
                            + self._scrub(str(event["error"]))[:300]
                        )
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                        delta = (
                            choice.get("delta", {}).get("content")
                            if path == "/api/chat"
                            else choice.get("text")
                        )
                        if delta:
                            pieces += 1
                            yield _chunk(path, body["model"], delta)
        except httpx.HTTPError as exc:
            raise await self._transport_error(exc, timeout_s) from None
        except ValueError:
            raise UpstreamError(
                f"{self._subject} sent an event that is not JSON on {route}"
            ) from None
        if usage is None:
            # Some servers (llama-cpp-python) ignore stream_options.include_usage; they send
            # one token per event, so the events are the completion's token count.
            usage = {"prompt_tokens": None, "completion_tokens": pieces}
        yield _final(path, body["model"], "", finish, usage, started)

    async def loaded_models(self, timeout_s: float) -> list[dict[str, Any]]:
        """The health probe for this kind: GET /v1/models, shown as Ollama's /api/ps entries."""
        data = self._object(await self._request("GET", "/v1/models", None, timeout_s), "/v1/models")
        return [
            {
                "name": m.get("id"),
                "model": m.get("id"),
                "size": 0,
                "size_vram": 0,
                "expires_at": None,
            }
            for m in data.get("data", [])
            if isinstance(m, dict)
        ]

    async def get(self, path: str, timeout_s: float) -> dict[str, Any]:
        if path == "/api/tags":
            return {"models": await self.loaded_models(timeout_s)}
        if path == "/api/version":
            return {"version": "openai-compatible"}
        raise UpstreamError(f"{path} is not available on {self.label}")

    async def post(self, path: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if path == "/api/show":
            return {
                "modelfile": "",
                "parameters": "",
                "template": "",
                "details": {},
                "model_info": {},
            }
        raise UpstreamError(f"{path} is not available on {self.label}")


def _request(path: str, body: dict[str, Any], stream: bool) -> tuple[str, dict[str, Any]]:
    options = body.get("options") or {}
    payload: dict[str, Any] = {"model": body["model"], "stream": stream}
    payload |= {OPTION_FIELDS[k]: v for k, v in options.items() if k in OPTION_FIELDS}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    if body.get("format") == "json":
        payload["response_format"] = {"type": "json_object"}
    elif isinstance(body.get("format"), dict):
        payload["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": body["format"]},
        }
    if path == "/api/chat":
        payload["messages"] = [
            {"role": m.get("role"), "content": m.get("content", "")}
            for m in body.get("messages", [])
        ]
        return "/v1/chat/completions", payload
    system = body.get("system")
    payload["prompt"] = (
        f"{system}\n\n{body.get('prompt', '')}" if system else body.get("prompt", "")
    )
    return "/v1/completions", payload


def _chunk(path: str, model: str, text: str) -> dict[str, Any]:
    chunk: dict[str, Any] = {"model": model, "created_at": _now(), "done": False}
    if path == "/api/chat":
        chunk["message"] = {"role": "assistant", "content": text}
    else:
        chunk["response"] = text
    return chunk


def _final(
    path: str, model: str, text: str, finish: Any, usage: Any, started_ns: int
) -> dict[str, Any]:
    usage = usage if isinstance(usage, dict) else {}
    final = _chunk(path, model, text)
    final |= {
        "done": True,
        "done_reason": "length" if finish == "length" else "stop",
        "total_duration": time.perf_counter_ns() - started_ns,
        "prompt_eval_count": usage.get("prompt_tokens"),
        "eval_count": usage.get("completion_tokens"),
    }
    return final


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
