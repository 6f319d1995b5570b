"""OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models)
with Hermes' limits: point any OpenAI client at Hermes' /v1."""

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from hermes import openai_api
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

app = create_app(
    "Hermes - OpenAI-compatible API",
    render=openai_api.render_error,
    error_model=openai_api.OpenAIError,
)
# With "stream": true the answer is server-sent events.
STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}


async def _run(request: Request, chat: bool, priority: Priority) -> Response:
    service = get_service()
    raw = await read_json_body(request, service.settings.max_prompt_chars)
    kind: Any = openai_api.ChatRequest if chat else openai_api.CompletionRequest
    body = openai_api.parse(raw, kind)
    name = service.resolve(body.model)
    path = "/api/chat" if chat else "/api/generate"
    deadline = sync_deadline_s(request, service.settings.sync_budget_ms)
    if not body.stream:
        answer = await service.complete(
            name, path, body.to_ollama(), deadline_s=deadline, priority=priority
        )
        shape = openai_api.chat_completion if chat else openai_api.completion
        return JSONResponse(shape(answer, body.model))
    chunks = await unless_client_leaves(
        request,
        service.open_stream(name, path, body.to_ollama(), deadline_s=deadline, priority=priority),
    )
    usage = bool((body.stream_options or {}).get("include_usage"))
    events = openai_api.sse(chunks, body.model, chat, usage)
    return StreamingBody(events, media_type="text/event-stream")


@app.post(
    "/v1/chat/completions",
    openapi_extra=openapi_body(openai_api.ChatRequest),
    responses=STREAMED,
)
async def chat_completions(request: Request, priority: HeaderPriority) -> Response:
    return await _run(request, True, priority or "normal")


@app.post(
    "/v1/completions",
    openapi_extra=openapi_body(openai_api.CompletionRequest),
    responses=STREAMED,
)
async def completions(request: Request, priority: HeaderPriority) -> Response:
    return await _run(request, False, priority or "normal")


@app.post("/v1/embeddings", openapi_extra=openapi_body(openai_api.EmbeddingRequest))
async def embeddings(request: Request, priority: HeaderPriority) -> JSONResponse:
    service = get_service()
    raw = await read_json_body(request, service.settings.max_prompt_chars)
    body = openai_api.parse(raw, openai_api.EmbeddingRequest)
    name = service.resolve(body.model)
    deadline = sync_deadline_s(request, service.settings.sync_budget_ms)
    answer = await service.embed(
        name, body.to_ollama(), deadline_s=deadline, priority=priority or "normal"
    )
    return JSONResponse(openai_api.embedding_list(answer, body.model, body.encoding_format))


@app.get("/v1/models")
async def models() -> JSONResponse:
    return JSONResponse(openai_api.models(get_service()))


handler = lambda_handler(app)
