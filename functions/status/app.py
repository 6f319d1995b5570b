"""GET /v1/status: health, configured limits and live usage. GET /v1/usage: who used what."""

from typing import Annotated, Any

from fastapi import Query
from fastapi.responses import JSONResponse

from hermes.http import create_app, lambda_handler
from hermes.service import get_service
from hermes.status import render_status
from hermes.usage import read_usage

app = create_app("Hermes status")

# 503 only when nothing can be admitted: a load balancer or readiness probe that reads it
# takes the whole sidecar out of service (hermes/status.py).
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Hermes can admit requests: `status` is `healthy`, or `degraded` with "
        "`failing` naming the hosts that fail (probe error, circuit not closed) and the models "
        "left without a backend (their `state` is `no_backend`)"
    },
    503: {
        "description": "`status` is `unhealthy`: nothing can be admitted, because the lease "
        "table fails or no model has a backend; the same body as the 200",
        "content": {"application/json": {}},
    },
}


@app.get("/v1/status", responses=RESPONSES)
async def status() -> JSONResponse:
    code, body = await render_status(get_service())
    return JSONResponse(body, status_code=code)


USAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": '`{"usage": [...]}`: a row per caller, model and UTC day, with '
        "`caller`, `model`, `day`, `requests`, `prompt_tokens`, `completion_tokens`, "
        '`slot_seconds` and `refused`; the asking caller\'s own rows, or with `"admin": '
        "true` in its callers entry, every caller's"
    },
    403: {"description": "`caller` names another caller and the asking one is not an admin"},
}


@app.get("/v1/usage", responses=USAGE_RESPONSES)
async def usage(
    caller: Annotated[str | None, Query(description="whose rows (default: your own)")] = None,
    model: Annotated[str | None, Query(description="one model's rows")] = None,
    since: Annotated[
        str | None,
        Query(alias="from", description="first UTC day, YYYY-MM-DD (default: 30 days before `to`)"),
    ] = None,
    until: Annotated[
        str | None, Query(alias="to", description="last UTC day, YYYY-MM-DD (default: today)")
    ] = None,
) -> JSONResponse:
    return JSONResponse({"usage": await read_usage(get_service(), caller, model, since, until)})


handler = lambda_handler(app)
