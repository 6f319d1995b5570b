"""Findings of the security audit (issue 21), each through the real Lambda handlers on moto
and the Ollama emulator: what a caller can send, and what an answer may show."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.lambda_calls import LambdaContext, event, load_function
from tests.support.ollama_emulator import OllamaEmulator

SECRET_URL = "http://ops:hunter2@127.0.0.1:9/t/s3cret-path/?token=s3cret-query"
SECRETS = ("ops:", "hunter2", "s3cret")


@pytest.fixture(autouse=True)
def env(aws: None, emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    emulator.reset()
    monkeypatch.setenv("OLLAMA_URL", emulator.url)


def post(function: str, path: str, body: Any) -> tuple[int, str]:
    """POST `body` (an object, or raw text) to `path` through `function`'s handler."""
    data = event("llm_generate.json", path=path)
    data["routeKey"] = f"POST {path}"
    data["body"] = body if isinstance(body, str) else json.dumps(body)
    response = load_function(function).handler(data, LambdaContext())
    return response["statusCode"], response["body"]


GENERATING = [
    ("llm", "/v1/llm/gemma", {"prompt": "hi"}),
    ("ollama_api", "/api/generate", {"model": "gemma", "prompt": "hi", "stream": False}),
    ("ollama_api", "/api/chat", {"model": "gemma", "messages": [], "stream": False}),
    ("openai_api", "/v1/chat/completions", {"model": "gemma", "messages": [{"role": "user"}]}),
]


@pytest.mark.parametrize(("function", "path", "body"), GENERATING)
def test_an_unreachable_hosts_error_never_shows_its_urls_secrets(
    monkeypatch: pytest.MonkeyPatch, function: str, path: str, body: dict[str, Any]
) -> None:
    monkeypatch.setenv("OLLAMA_URL", SECRET_URL)
    status, text = post(function, path, body)
    assert status == 503 and "http://127.0.0.1:9/…" in text, text
    assert not any(secret in text for secret in SECRETS), text


def test_a_direct_invokes_error_never_shows_the_urls_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OLLAMA_URL", SECRET_URL)
    answer = load_function("llm").handler({"model": "gemma", "prompt": "hi"}, LambdaContext())
    assert answer["code"] == "upstream_unavailable", answer
    assert not any(secret in json.dumps(answer) for secret in SECRETS), answer


# -- every text counts, bounded schemas, no 500 from JSON (items 1-3) --------------------

BIG = "x" * 500_000  # over the default HERMES_MAX_PROMPT_CHARS (100,000)


@pytest.mark.parametrize(
    ("function", "path", "body", "field"),
    [
        ("llm", "/v1/llm/gemma", {"prompt": "hi", "system": BIG}, "system"),
        (
            "ollama_api",
            "/api/generate",
            {"model": "gemma", "prompt": "hi", "suffix": BIG},
            "suffix",
        ),
        ("ollama_api", "/api/generate", {"model": "gemma", "template": BIG}, "template"),
        (
            "ollama_api",
            "/api/chat",
            {"model": "gemma", "tools": [{"type": "function", "function": {"name": BIG}}]},
            "tools",
        ),
        (
            "ollama_api",
            "/api/chat",
            {
                "model": "gemma",
                "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": BIG}}]}],
            },
            "messages[0].tool_calls",
        ),
        (
            "openai_api",
            "/v1/chat/completions",
            {"model": "gemma", "messages": [{"role": "system", "content": BIG}]},
            "messages[0].content",
        ),
    ],
)
def test_every_text_counts_toward_the_prompt_limit_and_413_names_it(
    emulator: OllamaEmulator, function: str, path: str, body: dict[str, Any], field: str
) -> None:
    status, text = post(function, path, body if function == "llm" else {**body, "stream": False})
    assert status == 413 and "prompt_too_large" in text, text
    assert f"'{field}'" in text, text
    assert not any(emulator.stats()["requests"].values())  # nothing reached the backend


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"context": list(range(131_073))}, "context"),
        ({"images": ["aGk="] * 17}, "images"),
        ({"images": ["A" * (8 * 1024 * 1024 + 1)]}, "images"),
        ({"options": {"stop": ["x"] * 17}}, "options.stop"),
        ({"options": {"stop": ["x" * 201]}}, "options.stop"),
    ],
)
def test_context_images_and_stop_have_bounds_of_their_own(
    extra: dict[str, Any], field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERMES_MAX_PROMPT_CHARS", "10000000")  # the body's size is not the point
    body = {"model": "gemma", "prompt": "hi", "stream": False, **extra}
    status, text = post("ollama_api", "/api/generate", body)
    assert status == 413 and f"'{field}'" in text, text


def test_jobs_and_direct_invokes_count_every_text_too() -> None:
    status, text = post("jobs", "/v1/jobs/gemma", {"prompt": "hi", "system": BIG})
    assert status == 413 and "'system'" in text, text
    direct = load_function("llm").handler(
        {"model": "gemma", "prompt": "hi", "system": BIG}, LambdaContext()
    )
    assert (direct["status"], direct["code"]) == (413, "prompt_too_large"), direct


SCHEMA_ITEMS = {"type": "array", "items": {"type": "integer"}}


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({**SCHEMA_ITEMS, "maxItems": 1_000_000}, "maxItems"),
        ({"type": "string", "maxLength": 10**7}, "maxLength"),
        ({"type": "integer", "maximum": 10**30}, "maximum"),
        ({"enum": list(range(300))}, "enum"),
        ({"type": "object", "description": "x" * 20_000}, "characters as JSON"),
        (json.loads('{"items": ' * 30 + "{}" + "}" * 30), "nests too deep"),
    ],
)
@pytest.mark.parametrize("route", ["llm", "ollama", "openai"])
def test_a_structured_output_schema_out_of_bounds_is_a_400_naming_the_limit(
    emulator: OllamaEmulator, schema: dict[str, Any], says: str, route: str
) -> None:
    if route == "llm":
        status, text = post("llm", "/v1/llm/gemma", {"prompt": "hi", "format": schema})
    elif route == "ollama":
        body = {"model": "gemma", "prompt": "hi", "format": schema, "stream": False}
        status, text = post("ollama_api", "/api/generate", body)
    else:
        response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        body = {
            "model": "gemma",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": response_format,
        }
        status, text = post("openai_api", "/v1/chat/completions", body)
    assert status == 400 and says in text and "structured output bounds" in text, text
    assert not any(emulator.stats()["requests"].values())


def test_a_schema_within_the_bounds_reaches_the_backend(emulator: OllamaEmulator) -> None:
    schema = {**SCHEMA_ITEMS, "maxItems": 10, "items": {"type": "integer", "maximum": 100}}
    status, text = post("llm", "/v1/llm/gemma", {"prompt": "hi", "format": schema})
    assert status == 200, text


HOSTILE = {
    "nested 20,000 deep": '{"prompt": ' + "[" * 20_000 + "]" * 20_000 + "}",
    "nested 65 deep": '{"prompt": "hi", "format": ' + '{"a": ' * 64 + "1" + "}" * 64 + "}",
    "NaN": '{"prompt": "hi", "options": {"temperature": NaN}}',
    "Infinity": '{"prompt": "hi", "options": {"temperature": Infinity}}',
    "1e400": '{"prompt": "hi", "options": {"temperature": 1e400}}',
    "NaN in format": '{"prompt": "hi", "format": {"type": "number", "maximum": NaN}}',
}


@pytest.mark.parametrize(
    ("function", "path"),
    [("llm", "/v1/llm/gemma"), ("ollama_api", "/api/generate"), ("openai_api", "/v1/completions")],
)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_json_is_a_400_never_a_500(function: str, path: str, name: str) -> None:
    status, text = post(function, path, HOSTILE[name])
    assert status == 400 and "invalid_request" in text, text


def test_a_direct_invoke_with_nan_or_deep_nesting_is_a_400() -> None:
    handler = load_function("llm").handler
    nan = handler(
        {"model": "gemma", "prompt": "hi", "options": {"temperature": float("nan")}},
        LambdaContext(),
    )
    assert (nan["status"], nan["code"]) == (400, "invalid_request"), nan
    deep: Any = "hi"
    for _ in range(100):
        deep = [deep]
    nested = handler({"model": "gemma", "prompt": "hi", "format": deep}, LambdaContext())
    assert (nested["status"], nested["code"]) == (400, "invalid_request"), nested


# -- abuse limits at the edge (item 5) ------------------------------------------------------


def status_call() -> int:
    response = load_function("status").handler(event("status.json"), LambdaContext())
    return int(response["statusCode"])


def test_status_probes_each_host_at_most_once_per_interval(
    emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However often /v1/status is called, an instance probes a host once per interval
    (HERMES_STATUS_PROBE_INTERVAL_S, default 5 s): 30 calls, one /api/ps."""
    import time

    assert [status_call() for _ in range(30)] == [200] * 30
    assert emulator.stats()["meta_calls"] == {"/api/ps": 1}
    monkeypatch.setenv("HERMES_STATUS_PROBE_INTERVAL_S", "0.2")
    time.sleep(0.25)
    assert status_call() == 200
    assert emulator.stats()["meta_calls"] == {"/api/ps": 2}  # the interval passed: probed again
    monkeypatch.setenv("HERMES_STATUS_PROBE_INTERVAL_S", "0")  # every call probes
    assert [status_call(), status_call()] == [200, 200]
    assert emulator.stats()["meta_calls"] == {"/api/ps": 4}


def test_api_show_forwards_only_the_model_name(emulator: OllamaEmulator) -> None:
    status, text = post("ollama_api", "/api/show", {"model": "gemma", "verbose": True})
    assert status == 200, text
    assert emulator.stats()["last_show"] == {"model": "gemma3:1b"}
