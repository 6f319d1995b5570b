"""Calling the Lambda entry points in-process, exactly as Lambda calls them: a context, the
events/ files, and the service-side views a test checks (slots held, callers, log lines)."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
from types import ModuleType
from typing import Any

from hermes.callers import caller_pool
from hermes.limiter import Counter, Lease
from hermes.service import HermesService, get_service, host_pool, model_counter
from local.template import ROOT

ALICE = "arn:aws:iam::123456789012:user/alice"


class LambdaContext:
    function_name = "hermes-test"
    aws_request_id = "test-request"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:hermes-test"
    memory_limit_in_mb = 256

    def __init__(self, remaining_ms: int = 60_000) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def load_function(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"fn_{name}", ROOT / "functions" / name / "app.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def event(
    name: str, path: str | None = None, method: str | None = None, **changes: Any
) -> dict[str, Any]:
    """An events/ file, optionally sent to another path or with another method."""
    data = copy.deepcopy(json.loads((ROOT / "events" / name).read_text()))
    data.update(changes)
    if path is not None:
        data["rawPath"] = data["requestContext"]["http"]["path"] = path
        if path.startswith("/v1/llm/"):
            data["pathParameters"] = {"model": path.rsplit("/", 1)[1]}
    if method is not None:
        data["requestContext"]["http"]["method"] = method
    return data


def invoke(
    function: str, name: str, context: LambdaContext | None = None, **changes: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    response = load_function(function).handler(event(name, **changes), context or LambdaContext())
    return response["statusCode"], json.loads(response["body"]), response["headers"]


def iam_event(arn: str = ALICE, **changes: Any) -> dict[str, Any]:
    """events/llm_generate.json as an IAM-signed call by `arn`."""
    data = event("llm_generate.json", **changes)
    data["requestContext"]["authorizer"] = {"iam": {"userArn": arn, "accountId": "1"}}
    return data


def hold(service: HermesService, model: str) -> Lease:
    """Occupy one slot of `model` as another instance would."""
    config = service.model(model)
    return service.limiter.acquire(host_pool(config.host), service.counters(model, config), 60_000)


def hold_caller_slot(caller: str) -> None:
    """The caller's one slot taken, as its request on another instance would."""
    counter = Counter("inflight", 1, 1, Exception, "x")  # type: ignore[arg-type]
    get_service().limiter.acquire(caller_pool(caller), [counter], 60_000)


def in_flight(model: str) -> int:
    """Slots of `model` held on the default host, as the limiter's table records them."""
    usage = get_service().limiter.usage([host_pool("default")])
    return usage[host_pool("default")].get(model_counter(model), 0)


def logged(stream: io.StringIO, message: str) -> list[dict[str, Any]]:
    """Hermes' JSON log lines in `stream` whose message is `message`."""
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("message") == message]
