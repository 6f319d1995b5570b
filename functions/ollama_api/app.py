"""Ollama's API (/api/*) with Hermes' limits: point any Ollama client at Hermes."""

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from hermes import ollama_api
from hermes.http import (
    HeaderPriority,
    StreamingBody,
    create_app,
    lambda_handler,
    openapi_body,
    read_json_body,
    sync_deadline_s,
    unless_client_leaves,
)
from hermes.schemas import Priority
from hermes.service import get_service

app = create_app("Hermes - Ollama API", render=ollama_api.render_error)
# Streamed by default: one JSON object per line ("stream": false gives one object).
STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {"application/x-ndjson": {}}}}


async def _parsed(request: Request, kind: type[Any]) -> tuple[Any, str, dict[str, Any], Any]:
    """The request as the service takes it: (body, Hermes' model name, backend body,
    deadline)."""
    service = get_service()
    raw = await read_json_body(request, service.settings.max_prompt_chars)
    body = ollama_api.parse(raw, kind)
    name = service.resolve(body.model)
    payload = body.to_backend(service.model(name))
    return body, name, payload, sync_deadline_s(request, service.settings.sync_budget_ms)


async def _run(request: Request, path: str, kind: type[Any], priority: Priority) -> Response:
    service = get_service()
    body, name, payload, deadline = await _parsed(request, kind)
    if not body.stream:
        answer = await service.complete(name, path, payload, deadline_s=deadline, priority=priority)
        return JSONResponse({**answer, "model": body.model})
    chunks = await unless_client_leaves(
        request,
        service.open_stream(name, path, payload, deadline_s=deadline, priority=priority),
    )
    return StreamingBody(ollama_api.ndjson(chunks, body.model), media_type="application/x-ndjson")


@app.post(
    "/api/generate",
    openapi_extra=openapi_body(ollama_api.GenerateBody),
    responses=STREAMED,
)
async def generate(request: Request, priority: HeaderPriority) -> Response:
    return await _run(request, "/api/generate", ollama_api.GenerateBody, priority or "normal")


@app.post(
    "/api/chat",
    openapi_extra=openapi_body(ollama_api.ChatBody),
    responses=STREAMED,
)
async def chat(request: Request, priority: HeaderPriority) -> Response:
    return await _run(request, "/api/chat", ollama_api.ChatBody, priority or "normal")


@app.post("/api/embed", openapi_extra=openapi_body(ollama_api.EmbedBody))
async def embed(request: Request, priority: HeaderPriority) -> JSONResponse:
    """Ollama's /api/embed answer: `model`, `embeddings` (one vector per input, in order),
    `total_duration`, `load_duration`, `prompt_eval_count`."""
    answer, model = await _embed(request, ollama_api.EmbedBody, priority or "normal")
    keep = ("embeddings", "total_duration", "load_duration", "prompt_eval_count")
    return JSONResponse({"model": model, **{k: answer[k] for k in keep if k in answer}})


@app.post("/api/embeddings", openapi_extra=openapi_body(ollama_api.EmbeddingsBody))
async def embeddings(request: Request, priority: HeaderPriority) -> JSONResponse:
    """Ollama's older route: `{"embedding": [...]}` for its one `prompt`."""
    answer, _ = await _embed(request, ollama_api.EmbeddingsBody, priority or "normal")
    return JSONResponse({"embedding": answer["embeddings"][0]})


async def _embed(
    request: Request, kind: type[Any], priority: Priority
) -> tuple[dict[str, Any], str]:
    body, name, payload, deadline = await _parsed(request, kind)
    answer = await get_service().embed(name, payload, deadline_s=deadline, priority=priority)
    return answer, body.model


@app.get("/api/tags")
async def tags() -> JSONResponse:
    return JSONResponse(await ollama_api.tags(get_service()))


@app.get("/api/ps")
async def ps() -> JSONResponse:
    return JSONResponse(await ollama_api.ps(get_service()))


@app.get("/api/version")
async def version() -> JSONResponse:
    return JSONResponse(await ollama_api.version(get_service()))


@app.post("/api/show")
async def show(request: Request) -> JSONResponse:
    body = await read_json_body(request, get_service().settings.max_prompt_chars)
    return JSONResponse(await ollama_api.show(get_service(), body))


handler = lambda_handler(app)
