"""The OpenAI-compatible API, served by Hermes with Hermes' limits: chat completions,
completions and models, with OpenAI's request, response, streaming (server-sent events)
and error shapes. Requests are translated to Ollama's /api/chat and /api/generate."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from hermes.aio import ClosingWith
from hermes.errors import HermesError, InvalidRequest
from hermes.schemas import validate_body
from hermes.service import HermesService


def render_error(error: HermesError) -> JSONResponse:
    """OpenAI's error shape; the official client picks its exception from the status."""
    kind = (
        "rate_limit_error"
        if error.status == 429
        else "invalid_request_error"
        if error.status < 500
        else "server_error"
    )
    body = {"error": {"message": error.message, "type": kind, "param": None, "code": error.code}}
    return JSONResponse(body, error.status, headers=error.headers())


class OpenAIErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "rate_limit_error", "server_error"]
    param: str | None = None
    code: str = Field(description="Hermes' stable code, e.g. model_busy")


class OpenAIError(BaseModel):
    """OpenAI's error shape, as every failure of this API is answered."""

    error: OpenAIErrorDetail


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # user, logprobs...: accepted and ignored

    model: str = Field(min_length=1, max_length=200)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1  # one choice per request: the GPU slot is the unit Hermes limits

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "num_predict": self.max_tokens,
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
        }
        return {k: v for k, v in options.items() if v is not None}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    response_format: dict[str, Any] | None = None

    def to_ollama(self) -> dict[str, Any]:
        options = self.options()
        if self.max_completion_tokens is not None:
            options["num_predict"] = self.max_completion_tokens
        body: dict[str, Any] = {
            "messages": [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages
            ],
            "options": options,
        }
        kind = (self.response_format or {}).get("type")
        if kind == "json_object":
            body["format"] = "json"
        elif kind == "json_schema":
            body["format"] = (self.response_format or {}).get("json_schema", {}).get("schema")
        return body


class CompletionRequest(_Request):
    prompt: str | list[str]
    suffix: str | None = None

    def to_ollama(self) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": self.text(), "options": self.options()}
        if self.suffix is not None:
            body["suffix"] = self.suffix
        return body

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidRequest("'prompt' may hold one string: batches are not supported")
            return self.prompt[0]
        return self.prompt


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings: `input` a text or a list of texts (token-id arrays are not
    taken: Hermes counts and bounds texts)."""

    model_config = ConfigDict(extra="allow")  # user: accepted and ignored

    model: str = Field(min_length=1, max_length=200)
    input: str | list[str] = Field(description="a text, or a list of texts (max_inputs)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=65_536)

    def to_ollama(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "input": [self.input] if isinstance(self.input, str) else self.input
        }
        if self.dimensions is not None:
            body["dimensions"] = self.dimensions
        return body


def embedding_list(answer: dict[str, Any], model: str, encoding: str) -> dict[str, Any]:
    """OpenAI's answer from Ollama's /api/embed one; base64 is the vector's little-endian
    float32 bytes, as OpenAI encodes it (the official client decodes it so)."""
    import base64
    import struct

    def encoded(vector: list[float]) -> Any:
        if encoding == "float":
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    tokens = int(answer.get("prompt_eval_count") or 0)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encoded(vector)}
            for i, vector in enumerate(answer["embeddings"])
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def parse(body: Any, kind: type[Any]) -> Any:
    return validate_body(body, kind)


def _finish_reason(done_reason: Any) -> str:
    return "length" if done_reason == "length" else "stop"


def _usage(final: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(final.get("prompt_eval_count") or 0), int(final.get("eval_count") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_completion(answer: dict[str, Any], model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": answer.get("message", {}).get("content", ""),
                },
                "finish_reason": _finish_reason(answer.get("done_reason")),
            }
        ],
        "usage": _usage(answer),
    }


def completion(answer: dict[str, Any], model: str) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": answer.get("response", ""),
                "logprobs": None,
                "finish_reason": _finish_reason(answer.get("done_reason")),
            }
        ],
        "usage": _usage(answer),
    }


def sse(
    chunks: AsyncIterator[dict[str, Any]], model: str, chat: bool, include_usage: bool
) -> ClosingWith[bytes]:
    """OpenAI's streaming: `data: <chunk>` events, a final chunk with finish_reason, an
    optional usage chunk, then `data: [DONE]`. A failure mid-stream is an error event.
    Closing it closes `chunks`."""
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        data = {"id": ident, "object": kind, "created": created, "model": model, "choices": choices}
        return b"data: " + json.dumps({**data, **extra}).encode() + b"\n\n"

    def choice(text: str, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": text} if first else {"content": text}
            )
            return {"index": 0, "delta": delta if text or first else {}, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    async def events() -> AsyncGenerator[bytes, None]:
        first = True
        try:
            async for chunk in chunks:
                text = (
                    chunk.get("message", {}).get("content", "")
                    if chat
                    else chunk.get("response", "")
                )
                if chunk.get("done"):
                    if text:
                        yield event([choice(text, None, first)])
                    yield event([choice("", _finish_reason(chunk.get("done_reason")))])
                    if include_usage:
                        yield event([], usage=_usage(chunk))
                    # Not `break`: the stream is read to its end, so the call ends answered.
                    # Closing it here instead would end it as a client that left (499).
                    continue
                if text or first:
                    yield event([choice(text, None, first)])
                    first = False
            yield b"data: [DONE]\n\n"
        except HermesError as error:
            body = json.loads(bytes(render_error(error).body))
            yield b"data: " + json.dumps(body).encode() + b"\n\n"
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return ClosingWith(events(), chunks)  # type: ignore[arg-type]


def models(service: HermesService) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "hermes"}
            for name in sorted(service.settings.models)
        ],
    }
