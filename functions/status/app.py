"""GET /v1/status: health, configured limits and live usage."""

from fastapi.responses import JSONResponse

from hermes.http import create_app, lambda_handler
from hermes.service import get_service

app = create_app("Hermes status")


@app.get("/v1/status")
async def status() -> JSONResponse:
    code, body = await get_service().status()
    return JSONResponse(body, status_code=code)


handler = lambda_handler(app)
