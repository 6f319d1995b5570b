"""Ollama's own API, served by Hermes with Hermes' limits: any Ollama client gets per-model
concurrency, the memory budget and timeouts by changing its base URL.

Bodies follow Ollama's documented API: documented fields pass through after the checks Hermes
needs, an unknown one is a 400 naming it (as on /v1/llm), so nothing undocumented reaches the
GPU host. Per model, options.num_ctx is bounded by max_num_ctx and keep_alive is dropped unless
allow_keep_alive. The model name may be Hermes' (gemma) or the backend tag (gemma3:1b).
Answers keep the name the client used.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from hermes.aio import ClosingWith
from hermes.backends import OllamaClient
from hermes.config import ModelConfig
from hermes.errors import HermesError, InvalidRequest
from hermes.pools import host_failed
from hermes.schemas import bound_options, validate_body
from hermes.service import HermesService

T = TypeVar("T")

# Non-limited calls (tags, ps, show, version) answer fast or not at all.
META_TIMEOUT_S = 5.0


def render_error(error: HermesError) -> JSONResponse:
    """Ollama's error shape, `{"error": "..."}`, plus Hermes' stable code."""
    return JSONResponse(
        {"error": error.message, "code": error.code}, error.status, headers=error.headers()
    )


class _Body(BaseModel):
    """The fields /api/generate and /api/chat share (docs.ollama.com/api)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    stream: bool = True
    options: dict[str, Any] | None = Field(
        default=None,
        description="Ollama's runtime options; num_ctx up to the model's max_num_ctx. Options "
        "that decide how the model is loaded (num_gpu, num_thread...) are refused.",
    )
    format: str | dict[str, Any] | None = None
    keep_alive: str | int | float | None = Field(
        default=None, description="ignored unless the model's config has allow_keep_alive"
    )
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def to_backend(self, model: ModelConfig) -> dict[str, Any]:
        """Ollama's body for the backend (without model and stream), within `model`'s bounds."""
        payload = self.model_dump(exclude_none=True, exclude={"stream"})
        if self.options is not None:
            payload["options"] = bound_options(self.options, model)
        if not model.allow_keep_alive:
            # Ignored rather than refused: Ollama clients send it routinely.
            payload.pop("keep_alive", None)
        return payload


class GenerateBody(_Body):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = Field(default=None, max_length=1_048_576)
    raw: bool | None = None
    images: list[str] | None = Field(default=None, max_length=100)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = Field(min_length=1, max_length=50)
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = Field(default=None, max_length=100)
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(default_factory=list, max_length=10_000)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=1000)


class EmbedBody(BaseModel):
    """POST /api/embed: one text or a batch (docs.ollama.com/api/embed)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    input: str | list[str] = Field(description="a text, or a list of texts (max_inputs)")
    truncate: bool | None = Field(
        default=None, description="cut inputs to the context (Ollama's default: true)"
    )
    dimensions: int | None = Field(default=None, ge=1, le=65_536)
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = Field(
        default=None, description="ignored unless the model's config has allow_keep_alive"
    )

    def to_backend(self, model: ModelConfig) -> dict[str, Any]:
        payload = self.model_dump(exclude_none=True, exclude={"model"})
        payload["input"] = [self.input] if isinstance(self.input, str) else self.input
        if self.options is not None:
            payload["options"] = bound_options(self.options, model)
        if not model.allow_keep_alive:
            payload.pop("keep_alive", None)
        return payload


class EmbeddingsBody(BaseModel):
    """POST /api/embeddings, Ollama's older route: one `prompt`, one `embedding`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    prompt: str
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None

    def to_backend(self, model: ModelConfig) -> dict[str, Any]:
        payload: dict[str, Any] = {"input": [self.prompt]}
        if self.options is not None:
            payload["options"] = bound_options(self.options, model)
        if model.allow_keep_alive and self.keep_alive is not None:
            payload["keep_alive"] = self.keep_alive
        return payload


def parse(body: Any, kind: type[Any]) -> Any:
    return validate_body(body, kind)


def ndjson(chunks: AsyncIterator[dict[str, Any]], model: str) -> ClosingWith[bytes]:
    """Ollama's streaming format: one JSON object per line; a failure mid-stream is an
    `{"error": ...}` line, as Ollama itself sends. Closing it closes `chunks`."""

    async def lines() -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in chunks:
                yield json.dumps({**chunk, "model": model}).encode() + b"\n"
        except HermesError as error:
            yield json.dumps({"error": error.message, "code": error.code}).encode() + b"\n"
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return ClosingWith(lines(), chunks)  # type: ignore[arg-type]


async def tags(service: HermesService) -> dict[str, Any]:
    """The configured models that one of their hosts has, under Hermes' names (once each)."""
    answers = await _from_every_host(
        service, lambda backend: backend.get("/api/tags", META_TIMEOUT_S)
    )
    models: dict[str, dict[str, Any]] = {}
    for host, answer in answers:
        for entry in _rename(service, host, answer.get("models", [])):
            models.setdefault(entry["name"], entry)
    return {"models": list(models.values())}


async def ps(service: HermesService) -> dict[str, Any]:
    """What is loaded where: each host's /api/ps under Hermes' names, with its `host`. A host
    that does not answer is left out (its circuit tells /v1/status why)."""
    answers = await _from_every_host(service, lambda b: b.loaded_models(META_TIMEOUT_S))
    return {
        "models": [
            {**entry, "host": host}
            for host, loaded in answers
            for entry in _rename(service, host, loaded)
        ]
    }


async def _from_every_host(
    service: HermesService, ask: Callable[[OllamaClient], Awaitable[T]]
) -> list[tuple[str, T]]:
    """`ask` every host at once; the hosts that answered, in name order. Fails only when no
    host answers (with the first host's error)."""
    hosts = sorted(service.settings.hosts)
    results = await asyncio.gather(
        *(ask(service.backends[h]) for h in hosts), return_exceptions=True
    )
    answered = [
        (h, r) for h, r in zip(hosts, results, strict=True) if not isinstance(r, BaseException)
    ]
    if not answered:
        failure = results[0]
        assert isinstance(failure, BaseException)
        raise failure
    return answered


async def show(service: HermesService, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("model") or body.get("name"), str):
        raise InvalidRequest('the request body must name a model: {"model": "..."}')
    name = service.resolve(body.get("model") or body["name"])
    config = service.model(name)
    # Only the name: `verbose` would answer every tensor of the model, which can pass
    # Lambda's 6 MB response limit (and is no caller's business).
    payload = {"model": config.backend_model}
    for host in config.pool[:-1]:  # the first host of its pool that answers
        try:
            return await service.backends[host].post("/api/show", payload, META_TIMEOUT_S)
        except HermesError as error:
            if not host_failed(error):
                raise
    return await service.backends[config.pool[-1]].post("/api/show", payload, META_TIMEOUT_S)


async def version(service: HermesService) -> dict[str, Any]:
    first = sorted(service.settings.hosts)[0]
    return await service.backends[first].get("/api/version", META_TIMEOUT_S)


def _rename(
    service: HermesService, host: str, entries: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Keep the entries a configured model on `host` maps to, named as Hermes names them."""
    by_tag = {
        _bare(config.backend_model): name
        for name, config in service.settings.models.items()
        if host in config.pool
    }
    renamed = []
    for entry in entries:
        name = by_tag.get(_bare(str(entry.get("model") or entry.get("name") or "")))
        if name is not None:
            renamed.append({**entry, "name": name, "model": name})
    return renamed


def _bare(tag: str) -> str:
    return tag.removesuffix(":latest")
