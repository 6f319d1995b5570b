"""What every HTTP function shares: the FastAPI app factory with Hermes' error shape,
and helpers to read a JSON body and the Lambda deadline from a request."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar, get_args

import anyio
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from mangum import Mangum
from mangum.adapter import DEFAULT_TEXT_MIME_TYPES
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from hermes import __version__
from hermes.bounds import parse_json
from hermes.callers import CallerScope
from hermes.errors import (
    ClientDisconnected,
    HermesError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    PromptTooLarge,
    RouteNotFound,
)
from hermes.limiter import RELEASE_RESERVE_S
from hermes.schemas import Priority

log = logging.getLogger(__name__)
T = TypeVar("T")

# Time kept back from the Lambda deadline to release the lease and send the answer.
LAMBDA_SAFETY_S = RELEASE_RESERVE_S + 0.5
# Generous for JSON escaping (up to 6 bytes per character) around the largest prompt.
BODY_BYTES_PER_PROMPT_CHAR = 6
BODY_OVERHEAD_BYTES = 64 * 1024
# API Gateway received a live request at most ~30 s before the handler runs; an event older
# than this is a recorded one (events/*.json) replayed, not a request anyone still awaits.
REPLAYED_EVENT_AGE_S = 300.0


def _caller_claim() -> str:
    from hermes.config import get_settings

    return get_settings().caller_claim


def error_response(error: HermesError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


ErrorRenderer = Callable[[HermesError], JSONResponse]


class Error(BaseModel):
    """Every Hermes error, and the Ollama API's (same shape, without the extra fields)."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="what went wrong, as a sentence")
    code: str = Field(description="stable snake_case code, e.g. model_busy")


def create_app(
    title: str, render: ErrorRenderer = error_response, error_model: type[BaseModel] = Error
) -> FastAPI:
    """A FastAPI app whose every failure, including unknown routes, is a JSON error drawn by
    `render`: Hermes' own shape by default, Ollama's or OpenAI's for the compatible APIs.
    Its OpenAPI document says so (`error_model`), rather than FastAPI's 422 `detail`."""
    # No trailing-slash redirects: an empty 307 is not a JSON answer, and API Gateway does
    # not redirect either.
    app = FastAPI(
        title=title, version=__version__, docs_url=None, redoc_url=None, redirect_slashes=False
    )
    app.openapi = functools.partial(_openapi, app, error_model)  # type: ignore[method-assign]
    app.add_middleware(CallerScope, claim=_caller_claim)  # who asks: callers.CALLER

    @app.exception_handler(HermesError)
    async def on_hermes_error(_: Request, exc: HermesError) -> JSONResponse:
        return render(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(part) for part in first.get("loc", ()))
        return render(InvalidRequest(f"field '{field}': {first.get('msg', 'invalid')}"))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return render(RouteNotFound(f"no route {request.method} {request.url.path}"))
        if exc.status_code == 405:
            return render(
                MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}")
            )
        return render(InvalidRequest(str(exc.detail)))

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return render(InternalError("internal error; see the service logs"))

    return app


def _openapi(app: FastAPI, error_model: type[BaseModel]) -> dict[str, Any]:
    """FastAPI's document, with the errors Hermes really answers: a 400 for what FastAPI
    would call a 422, and the app's own error shape for every failure."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        error = error_model.model_json_schema(ref_template="#/components/schemas/{model}")
        components = {
            name: value
            for name, value in schema.get("components", {}).get("schemas", {}).items()
            if name not in ("HTTPValidationError", "ValidationError")
        }
        components |= error.pop("$defs", {})
        components[error_model.__name__] = error
        failure = {
            "description": "An error, always JSON in this API's error shape",
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{error_model.__name__}"}
                }
            },
        }
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
                operation["responses"]["default"] = failure
        schema["components"] = {"schemas": dict(sorted(components.items()))}
        app.openapi_schema = schema
    return app.openapi_schema


async def read_json_body(request: Request, max_prompt_chars: int) -> Any:
    """The parsed JSON body, or InvalidRequest / PromptTooLarge. Content-Type is not
    required: the seed's own `curl -d '{...}'` example sends form-encoded headers."""
    limit = max_prompt_chars * BODY_BYTES_PER_PROMPT_CHAR + BODY_OVERHEAD_BYTES
    raw = await request.body()
    if len(raw) > limit:
        raise PromptTooLarge(f"request body has {len(raw)} bytes; the limit is {limit}")
    if not raw.strip():
        raise InvalidRequest(
            'the request body is empty; send a JSON object such as {"prompt": "..."}'
        )
    return parse_json(raw)  # NaN, Infinity and deep nesting are 400s too (hermes.bounds)


PRIORITY_HEADER = "X-Hermes-Priority"
PRIORITIES: tuple[Priority, ...] = get_args(Priority)


def parse_priority(value: str | None, field: str = PRIORITY_HEADER) -> Priority | None:
    """A priority given as text (the header; case and surrounding spaces do not matter),
    None when not given; anything else is a 400 naming `field` and the allowed values."""
    if value is None:
        return None
    for priority in PRIORITIES:
        if value.strip().lower() == priority:
            return priority
    shown = value if len(value) <= 40 else value[:40] + "..."
    raise InvalidRequest(
        f"{field} must be one of {', '.join(PRIORITIES)} (any case), not {shown!r}",
        field=field,
        allowed=list(PRIORITIES),
    )


def header_priority(
    value: Annotated[
        str | None,
        Header(
            alias=PRIORITY_HEADER,
            description="The request's place among those waiting for a slot: high, normal "
            "(the default) or low, in any case. On /v1/llm and jobs, the body's `priority` "
            "wins over it.",
            examples=["high"],
        ),
    ] = None,
) -> Priority | None:
    """FastAPI dependency: the X-Hermes-Priority header, parsed (documented in OpenAPI)."""
    return parse_priority(value)


HeaderPriority = Annotated[Priority | None, Depends(header_priority)]


def lambda_time_left_s(context: Any) -> float | None:
    """Seconds this Lambda invocation can still spend, or None outside Lambda."""
    if context is None or not hasattr(context, "get_remaining_time_in_millis"):
        return None
    return float(context.get_remaining_time_in_millis()) / 1000 - LAMBDA_SAFETY_S


def sync_deadline_s(request: Request, sync_budget_ms: int) -> float | None:
    """What a synchronous HTTP request may spend: the Lambda's time left, capped by what is
    left of the HTTP budget (API Gateway ends every HTTP API request 30 s after it received
    it, however long a cold start took)."""
    limits = [lambda_time_left_s(request.scope.get("aws.context"))]
    if sync_budget_ms > 0:
        age = gateway_age_s(request.scope.get("aws.event"))
        limits.append(max(0.0, sync_budget_ms / 1000 - age))
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def gateway_age_s(event: Any, now: float | None = None) -> float:
    """Seconds since API Gateway received the request (`requestContext.timeEpoch` of an HTTP
    API event, `requestTimeEpoch` of a REST API one, ms since the epoch); 0 when unknown."""
    context = event.get("requestContext") if isinstance(event, dict) else None
    if not isinstance(context, dict):
        return 0.0
    epoch_ms = context.get("timeEpoch", context.get("requestTimeEpoch"))
    if isinstance(epoch_ms, bool) or not isinstance(epoch_ms, int | float):
        return 0.0
    age = (time.time() if now is None else now) - epoch_ms / 1000
    if age > REPLAYED_EVENT_AGE_S:
        # A live request cannot be this old (the gateway gave up after 30 s): this is a
        # recorded event replayed (sam local invoke -e, tests), whose clock says nothing.
        return 0.0
    return max(0.0, age)  # the gateway's clock a little ahead of Lambda's: no age


LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]


def is_http_event(event: Any) -> bool:
    return (
        isinstance(event, dict)
        and "requestContext" in event
        and ("routeKey" in event or "httpMethod" in event)
    )


def lambda_handler(app: FastAPI, direct: LambdaHandler | None = None) -> LambdaHandler:
    """The Lambda entry point for an HTTP function: Mangum for API Gateway events, `direct`
    for anything else (a plain invoke), and a JSON error for events neither can read (Mangum
    raises on those, which Lambda and API Gateway would turn into a 500).
    `.app` exposes the ASGI app so the local runner serves the very same code."""
    # lifespan="off": Lambda has no startup/shutdown, and Mangum would run them per call.
    mangum = Mangum(
        app,
        lifespan="off",
        # Ollama's streaming type is text: return it as is rather than base64-encoded.
        text_mime_types=[*DEFAULT_TEXT_MIME_TYPES, "application/x-ndjson"],
    )

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        if not is_http_event(event):
            if direct is not None:
                return direct(event, context)
            return InvalidRequest("this function only serves API Gateway HTTP events").body()
        try:
            return mangum(event, context)
        except Exception as exc:
            log.warning("unreadable event: %s", exc)
            error = InvalidRequest(f"this function cannot read the event ({type(exc).__name__})")
            return {
                "statusCode": error.status,
                "headers": {"content-type": "application/json"},
                "body": json.dumps(error.body()),
                "isBase64Encoded": False,
            }

    from hermes.observability import instrument

    entry = instrument(handler, http=True)
    entry.app = app  # type: ignore[attr-defined]
    return entry


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work` (a wait for a slot), cancelled as soon as the client disconnects: the cancelled
    wait gives its queue place back (and a lease granted meanwhile) instead of holding it for
    nobody. Starlette does not cancel a handler whose client left. Only a server that reports
    a disconnect while the request runs makes this act (uvicorn: the local runner); API
    Gateway reports none, and Mangum only once the answer is sent, so there it just awaits
    `work`. Call it once the body is read: the next message can only be http.disconnect."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled: so is its work
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait((task,))  # its cancellation has given back what it held
        if task.cancelled():
            raise ClientDisconnected("the client disconnected while its request waited")
    return task.result()  # done first: the response machinery deals with a client gone


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class StreamingBody(StreamingResponse):
    """A streamed answer that stops as soon as the client disconnects, not at the next chunk,
    and always closes its iterator, which is what releases the model's slot."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-send
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """An OpenAPI requestBody for a route that parses its body itself (to accept any
    content type and answer Hermes' own errors): documentation and fuzzing input."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline(schema)}},
        }
    }
