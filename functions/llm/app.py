"""POST /v1/llm/{model}: one prompt to one model, under Hermes' limits."""

from fastapi import Request
from fastapi.responses import JSONResponse

from hermes.http import create_app, lambda_handler, lambda_time_left_s, read_json_body
from hermes.service import get_service

app = create_app("Hermes LLM")


@app.post("/v1/llm/{model}")
async def generate(model: str, request: Request) -> JSONResponse:
    service = get_service()
    body = await read_json_body(request, service.settings.max_prompt_chars)
    result = await service.generate(model, body, deadline_s=lambda_time_left_s(request))
    return JSONResponse(result)


handler = lambda_handler(app)
