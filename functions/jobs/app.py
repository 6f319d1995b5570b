"""Async jobs API: POST /v1/jobs/{model} queues a prompt (202), GET /v1/jobs/{job_id} reads it.
For generations longer than API Gateway's 30 s (llama3 may take 45 s)."""

from fastapi import Request
from fastapi.responses import JSONResponse

from hermes.http import HeaderPriority, create_app, lambda_handler, openapi_body, read_json_body
from hermes.jobs import get_jobs
from hermes.schemas import GenerateRequest

app = create_app("Hermes jobs")


@app.post("/v1/jobs/{model}", status_code=202, openapi_extra=openapi_body(GenerateRequest))
async def submit(model: str, request: Request, priority: HeaderPriority) -> JSONResponse:
    jobs = get_jobs()
    body = await read_json_body(request, jobs.settings.max_prompt_chars)
    job = jobs.submit(model, body, priority=priority)
    return JSONResponse(job, status_code=202, headers={"Location": job["status_url"]})


@app.get("/v1/jobs/{job_id}")
async def status(job_id: str) -> JSONResponse:
    return JSONResponse(get_jobs().get(job_id))


handler = lambda_handler(app)
