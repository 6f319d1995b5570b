"""GET /v1/status: health, configured limits and live usage."""

from typing import Any

from fastapi.responses import JSONResponse

from hermes.http import create_app, lambda_handler
from hermes.service import get_service
from hermes.status import render_status

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


handler = lambda_handler(app)
