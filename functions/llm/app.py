"""POST /v1/llm/{model}: one prompt to one model, under Hermes' limits.
Also invoked directly by other functions with {"model", "prompt", "request_id"}."""

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from hermes.http import (
    HeaderPriority,
    create_app,
    lambda_handler,
    openapi_body,
    read_json_body,
    sync_deadline_s,
)
from hermes.schemas import GenerateRequest
from hermes.service import get_service

app = create_app("Hermes LLM")


@app.post("/v1/llm/{model}", openapi_extra=openapi_body(GenerateRequest))
async def generate(model: str, request: Request, priority: HeaderPriority) -> JSONResponse:
    service = get_service()
    body = await read_json_body(request, service.settings.max_prompt_chars)
    deadline = sync_deadline_s(request, service.settings.sync_budget_ms)
    # The body's `priority`, when given, wins over the header's (HermesService.generate).
    answer = await service.generate(model, body, deadline_s=deadline, priority=priority or "normal")
    return JSONResponse(answer)


def direct_invoke(event: dict[str, Any], context: object) -> dict[str, Any]:
    from hermes.direct import handle_direct  # only direct invokes pay for powertools

    return handle_direct(event, context)


handler = lambda_handler(app, direct=direct_invoke)
