"""GET /v1/status: health, configured limits and live usage."""

from fastapi.responses import JSONResponse

from hermes.http import create_app, lambda_handler
from hermes.service import get_service
from hermes.status import render_status

app = create_app("Hermes status")


@app.get("/v1/status")
async def status() -> JSONResponse:
    code, body = await render_status(get_service())
    return JSONResponse(body, status_code=code)


handler = lambda_handler(app)
