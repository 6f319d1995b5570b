"""Request priority (issue 12): the X-Hermes-Priority header on every route that admits a
request, the `priority` body field of /v1/llm and jobs, and the direct invoke's `priority`
key, each reaching admission as high, normal or low: seen by where the request waits in its
model's queue (tests/support/priority_probe.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from hermes.errors import InvalidRequest
from hermes.http import PRIORITY_HEADER, parse_priority
from hermes.service import get_service, host_pool
from tests.support.lambda_calls import LambdaContext, event, load_function
from tests.support.ollama_emulator import OllamaEmulator
from tests.support.priority_probe import admitted_priority, probe_models

# Every HTTP route that admits a request: (function, event file), streamed or not.
ADMITTING = [
    ("llm", "llm_generate.json"),
    ("ollama_api", "ollama_generate.json"),  # streamed (Ollama's default)
    ("ollama_api", "ollama_chat.json"),  # "stream": false
    ("openai_api", "openai_chat.json"),  # "stream": true
    ("openai_api", "openai_completions.json"),
]
ADMITTING_PATHS = {
    ("post", "/v1/llm/{model}"),
    ("post", "/v1/jobs/{model}"),
    ("post", "/api/generate"),
    ("post", "/api/chat"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("post", "/api/embed"),
    ("post", "/api/embeddings"),
    ("post", "/v1/embeddings"),
}


@pytest.fixture(autouse=True)
def env(
    aws: None, emulator: OllamaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator.reset()
    monkeypatch.setenv("OLLAMA_URL", emulator.url)
    probe_models(tmp_path, monkeypatch, "gemma", "mistral")  # the models the events name


def model_of(function: str, name: str) -> str:
    return "mistral" if name == "openai_completions.json" else "gemma"


def nothing_admitted(emulator: OllamaEmulator) -> bool:
    """No backend call, no slot held, no place in a queue: the request was refused before
    admission, as far as anything outside the process can tell."""
    pool = host_pool("default")
    return emulator.received() == [] and not get_service().limiter.usage([pool], True)[pool]


def http(
    function: str,
    name: str,
    headers: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
    **changes: Any,
) -> tuple[int, Any, dict[str, str]]:
    """Call `function`'s Lambda handler with an events/ file, plus `headers` (merged into the
    event's) and another JSON `body` if given."""
    data = event(name, **changes)
    data["headers"] = {**copy.deepcopy(data["headers"]), **(headers or {})}
    if body is not None:
        data["body"] = json.dumps(body)
    response = load_function(function).handler(data, LambdaContext())
    text = response["body"]
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        parsed = text  # a buffered stream (NDJSON or server-sent events)
    return response["statusCode"], parsed, response["headers"]


def error_of(body: dict[str, Any]) -> tuple[str, str]:
    """(message, code) from Hermes', Ollama's or OpenAI's error shape."""
    if isinstance(body["error"], dict):
        return body["error"]["message"], body["error"]["code"]
    return body["error"], body["code"]


# -- the header, route by route --------------------------------------------------------------


@pytest.mark.parametrize(("function", "name"), ADMITTING)
@pytest.mark.parametrize(
    ("value", "expected"),
    [("high", "high"), ("LOW", "low"), (" Normal ", "normal"), (None, "normal")],
)
def test_the_priority_header_reaches_admission_on_every_route(
    monkeypatch: pytest.MonkeyPatch,
    emulator: OllamaEmulator,
    function: str,
    name: str,
    value: str | None,
    expected: str,
) -> None:
    # Given a request with (or without) X-Hermes-Priority, in any case
    headers = {"x-hermes-priority": value} if value is not None else {}

    def send() -> None:
        # When it is served
        status, body, _ = http(function, name, headers)
        assert status == 200, body

    # Then it was admitted with that priority (normal by default), and called the model
    # once per request (one request probes a high priority, two the others)
    assert admitted_priority(monkeypatch, model_of(function, name), send) == expected
    assert len(emulator.received()) == (1 if expected == "high" else 2)


def test_the_header_name_is_case_insensitive_as_a_rest_api_event_keeps_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def send() -> None:
        status, body, _ = http("llm", "llm_generate.json", {"X-Hermes-Priority": "high"})
        assert status == 200, body

    assert admitted_priority(monkeypatch, "gemma", send) == "high"


@pytest.mark.parametrize(("function", "name"), [*ADMITTING, ("jobs", "jobs_submit.json")])
@pytest.mark.parametrize("value", ["urgent", "", "hi gh", "1"])
def test_a_bad_priority_header_is_a_400_naming_the_header_and_the_allowed_values(
    emulator: OllamaEmulator, function: str, name: str, value: str
) -> None:
    # Given a request whose X-Hermes-Priority is none of high, normal, low
    # When it is served
    status, body, headers = http(function, name, {"x-hermes-priority": value})
    # Then it is refused in the route's own error shape before anything is admitted
    assert status == 400 and headers["content-type"] == "application/json"
    message, code = error_of(body)
    assert code == "invalid_request"
    assert PRIORITY_HEADER in message and "high, normal, low" in message
    assert nothing_admitted(emulator)


def test_a_bad_header_on_hermes_own_routes_names_the_field_and_the_values() -> None:
    status, body, _ = http("llm", "llm_generate.json", {"x-hermes-priority": "urgent"})
    assert status == 400
    assert body["field"] == "X-Hermes-Priority"
    assert body["allowed"] == ["high", "normal", "low"]
    assert "'urgent'" in body["error"]


def test_the_header_is_ignored_on_routes_that_admit_nothing() -> None:
    # /api/tags, /v1/models and /v1/status never wait for a slot: no header check there.
    assert http("ollama_api", "ollama_tags.json", {"x-hermes-priority": "urgent"})[0] == 200
    assert http("openai_api", "openai_models.json", {"x-hermes-priority": "urgent"})[0] == 200


# -- body and header on /v1/llm ----------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "field", "expected"),
    [
        ("high", "low", "low"),  # the body wins
        ("low", "high", "high"),
        (None, "high", "high"),
        ("high", None, "high"),  # "priority": null is no priority: the header applies
    ],
)
def test_the_body_priority_wins_over_the_header_on_v1_llm(
    monkeypatch: pytest.MonkeyPatch, header: str | None, field: str | None, expected: str
) -> None:
    headers = {"x-hermes-priority": header} if header is not None else {}

    def send() -> None:
        status, body, _ = http(
            "llm", "llm_generate.json", headers, body={"prompt": "hi", "priority": field}
        )
        assert status == 200, body

    assert admitted_priority(monkeypatch, "gemma", send) == expected


@pytest.mark.parametrize("value", ["urgent", "HIGH", 1, ["high"]])
def test_a_bad_body_priority_is_a_400_naming_the_field_and_the_allowed_values(
    emulator: OllamaEmulator, value: Any
) -> None:
    status, body, _ = http("llm", "llm_generate.json", body={"prompt": "hi", "priority": value})
    assert (status, body["code"], body["field"]) == (400, "invalid_request", "priority")
    assert body["error"].startswith("field 'priority'")
    assert all(f"'{allowed}'" in body["error"] for allowed in ("high", "normal", "low"))
    assert nothing_admitted(emulator)


def test_the_compatible_apis_take_priority_from_the_header_only() -> None:
    # Ollama's bodies are Ollama's documented fields: a `priority` field is refused.
    status, body, _ = http(
        "ollama_api", "ollama_generate.json", body={"model": "gemma", "prompt": "hi", "priority": 1}
    )
    assert status == 400 and "priority" in body["error"]


# -- direct invoke -----------------------------------------------------------------------


def direct(payload: dict[str, Any]) -> dict[str, Any]:
    return load_function("llm").handler(payload, LambdaContext())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"model": "gemma", "prompt": "hi", "priority": "high"}, "high"),
        ({"model": "gemma", "prompt": "hi", "priority": "low"}, "low"),
        ({"model": "gemma", "prompt": "hi"}, "normal"),
    ],
)
def test_a_direct_invoke_passes_its_priority_to_admission(
    monkeypatch: pytest.MonkeyPatch, payload: dict[str, Any], expected: str
) -> None:
    def send() -> None:
        assert direct(payload)["result"]

    assert admitted_priority(monkeypatch, "gemma", send) == expected


def test_a_direct_invoke_with_a_bad_priority_gets_an_error_object(
    emulator: OllamaEmulator,
) -> None:
    answer = direct({"model": "gemma", "prompt": "hi", "priority": "urgent"})
    assert (answer["status"], answer["code"], answer["field"]) == (
        400,
        "invalid_request",
        "priority",
    )
    assert "'high', 'normal' or 'low'" in answer["error"]
    assert nothing_admitted(emulator)


def test_a_retried_direct_invoke_may_change_its_priority_and_gets_the_stored_answer(
    emulator: OllamaEmulator,
) -> None:
    # Given a direct invoke that succeeded at normal priority
    first = direct({"model": "gemma", "prompt": "hi", "request_id": "r-prio"})
    # When it is retried with the same request_id at high priority
    second = direct({"model": "gemma", "prompt": "hi", "request_id": "r-prio", "priority": "high"})
    # Then it is the same request: the stored answer, without a second model call
    assert second["result"] == first["result"]
    assert emulator.stats()["requests"].get("gemma3:1b", 0) == 1


# -- parsing and documentation -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("high", "high"), ("Normal", "normal"), ("  LOW\t", "low")],
)
def test_parse_priority_accepts_the_three_values_in_any_case(
    value: str | None, expected: str | None
) -> None:
    assert parse_priority(value) == expected


def test_parse_priority_names_the_field_it_was_given() -> None:
    with pytest.raises(InvalidRequest, match=r"^priority must be one of high, normal, low") as err:
        parse_priority("asap", field="priority")
    assert err.value.extra == {"field": "priority", "allowed": ["high", "normal", "low"]}


def test_the_header_is_documented_on_every_admitting_route_and_only_there() -> None:
    from local import openapi

    document = openapi.document()
    committed = json.loads(openapi.OPENAPI_FILE.read_text())
    for doc in (document, committed):
        with_header = {
            (method, path)
            for path, operations in doc["paths"].items()
            for method, operation in operations.items()
            if any(
                parameter["in"] == "header" and parameter["name"] == PRIORITY_HEADER
                for parameter in operation.get("parameters", [])
            )
        }
        assert with_header == ADMITTING_PATHS
        parameter = next(
            p
            for p in doc["paths"]["/v1/llm/{model}"]["post"]["parameters"]
            if p["name"] == PRIORITY_HEADER
        )
        assert parameter["required"] is False
        assert "high" in parameter["description"] and "low" in parameter["description"]
