"""Direct Lambda invocation of the LLM function by other functions, without HTTP:
`{"model": "gemma", "prompt": "...", "request_id"?: "...", "priority"?: "high",
"caller"?: "<caller id>"}` →
`{"result": ...}` or `{"error": ..., "code": ..., "status": ...}`. Same rules and limits as
HTTP, the model's full timeout (bounded only by the Lambda's own), and at-most-once per
request_id. The priority orders the wait for a slot; it is not part of what request_id
identifies, so a retry may raise it and still gets the stored answer. `caller` names who
asks (the invoke itself is authorized by IAM): its limits apply (hermes.callers)."""

from __future__ import annotations

from typing import Any

from hermes.aio import run_sync
from hermes.bounds import check_json
from hermes.callers import CALLER, acting_as, given_caller
from hermes.errors import HermesError, InvalidRequest
from hermes.http import lambda_time_left_s
from hermes.idempotency import MAX_RESULT_BYTES, once, packed, unpacked
from hermes.schemas import parse_generate_request
from hermes.service import get_service

ENVELOPE = ("model", "request_id", "priority", "caller")


def handle_direct(event: Any, context: Any) -> dict[str, Any]:
    try:
        return _generate(event, context)
    except HermesError as error:
        return {**error.body(), "status": error.status}


def _generate(event: Any, context: Any) -> dict[str, Any]:
    check_json(event)  # Lambda's own parser took NaN and any nesting
    if not isinstance(event, dict) or not isinstance(event.get("model"), str):
        raise InvalidRequest(
            "unknown event: invoke with an API Gateway HTTP API event, or directly with "
            '{"model": "<name>", "prompt": "...", "request_id": "<optional id>", '
            '"priority": "<optional high|normal|low>", "caller": "<optional caller id>"}'
        )
    try:
        caller = given_caller(event.get("caller"))
    except ValueError as error:
        raise InvalidRequest(str(error)) from None
    with acting_as(caller):
        return _generate_as_caller(event, context)


def _generate_as_caller(event: dict[str, Any], context: Any) -> dict[str, Any]:
    service = get_service()
    model = event["model"]
    body = {k: v for k, v in event.items() if k not in ENVELOPE}
    config = service.model(model)  # reject bad input before anything is stored
    # Checked as the body field of /v1/llm: a bad value is a 400 naming `priority`.
    checked = {**body, "priority": event["priority"]} if "priority" in event else body
    request = parse_generate_request(checked, service.settings.max_prompt_chars, config)
    priority = request.priority or "normal"
    request_id = event.get("request_id")

    def call(data: dict[str, Any]) -> dict[str, Any]:
        deadline = lambda_time_left_s(context)
        generation = service.generate(
            data["model"], data["body"], deadline_s=deadline, priority=priority
        )
        return run_sync(generation)

    if request_id is None:
        return call({"model": model, "body": body})
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= 128:
        raise InvalidRequest("request_id must be a string of 1 to 128 characters")

    def stored(data: dict[str, Any]) -> dict[str, Any]:
        result = call(data)
        record, size = packed(result)
        if size > MAX_RESULT_BYTES:  # raised: powertools stores nothing, the caller has it
            raise _Unstored(result, size)
        return record

    data = {"request_id": request_id, "model": model, "body": body, "caller": CALLER.get()}
    try:
        record = once(
            stored,
            data,
            key="request_id",
            context=context,
            same_request="[model, body]",
            scope="caller",
        )
    except _Unstored as unstored:
        return {**unstored.result, "request_id": request_id, "stored": False, "note": str(unstored)}
    return {**unpacked(record), "request_id": request_id}


class _Unstored(Exception):
    """A result too large for an idempotency record even compressed: answered, not stored."""

    def __init__(self, result: dict[str, Any], size: int) -> None:
        super().__init__(
            f"the result takes {size} bytes compressed; an idempotency record holds at most "
            f"{MAX_RESULT_BYTES}, so it was not stored and a retry with this request_id runs "
            "the model again (ask for fewer tokens with options.num_predict, or use a job)"
        )
        self.result = result
