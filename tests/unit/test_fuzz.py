"""Bad input, generated: no body, option, model name or header produces a 500, a hang or a
leaked slot. Hypothesis drives the request parsers and the Lambda entry point; schemathesis
drives the LLM function from its own OpenAPI document (positive and negative cases)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermes import ollama_api, openai_api
from hermes.errors import HermesError
from hermes.schemas import parse_generate_request
from hermes.service import get_service, host_pool
from tests.support.lambda_calls import LambdaContext, event, load_function
from tests.support.ollama_emulator import OllamaEmulator

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
# Bodies shaped like requests, with every field possibly wrong.
REQUESTS = st.fixed_dictionaries(
    {},
    optional={
        "prompt": JSON | st.text(max_size=50),
        "system": JSON,
        "format": JSON | st.just("json"),
        "options": st.dictionaries(
            st.sampled_from(
                ["temperature", "top_p", "top_k", "num_predict", "num_ctx", "seed", "stop", "x"]
            ),
            JSON,
            max_size=4,
        ),
        "model": JSON | st.sampled_from(["gemma", "gemma3:1b", "../etc", "a b", ""]),
        "messages": JSON,
        "stream": JSON,
    },
)
FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@given(body=JSON | REQUESTS)
@FAST
def test_request_parsers_accept_or_refuse_cleanly(body: Any) -> None:
    parsers = [
        lambda: parse_generate_request(body, 1000),
        lambda: ollama_api.parse(body, ollama_api.GenerateBody),
        lambda: ollama_api.parse(body, ollama_api.ChatBody),
        lambda: openai_api.parse(body, openai_api.ChatRequest),
        lambda: openai_api.parse(body, openai_api.CompletionRequest),
    ]
    for parse in parsers:
        try:
            parse()
        except HermesError as error:
            assert 400 <= error.status < 500 and error.message


@pytest.fixture
def env(aws: None, emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    emulator.reset()
    monkeypatch.setenv("OLLAMA_URL", emulator.url)


def leases() -> dict[str, int]:
    return get_service().limiter.usage([host_pool("default")])[host_pool("default")]


@given(
    body=(JSON | REQUESTS).map(json.dumps)
    | st.text(max_size=60)
    | st.binary(max_size=40).map(repr),
    model=st.text(max_size=30) | st.sampled_from(["gemma", "llama3", "mistral"]),
)
@FAST
def test_the_llm_handler_never_answers_500(env: None, body: str, model: str) -> None:
    path = "/v1/llm/" + model.replace("/", "%2F")
    response = load_function("llm").handler(
        event("llm_generate.json", path=path, body=body), LambdaContext()
    )
    payload = json.loads(response["body"])
    # The emulator is healthy: no 5xx at all, upstream_unavailable (503) included.
    assert response["statusCode"] < 500, payload
    assert "detail" not in payload and (
        response["statusCode"] == 200 or isinstance(payload["error"], str)
    )
    assert leases() == {} or all(v == 0 for v in leases().values())


@given(body=REQUESTS.map(json.dumps))
@FAST
def test_the_compatible_handlers_never_answer_500(env: None, body: str) -> None:
    routes = [
        ("ollama_api", "ollama_generate.json"),
        ("ollama_api", "ollama_chat.json"),
        ("openai_api", "openai_chat.json"),
        ("openai_api", "openai_completions.json"),
    ]
    for function, name in routes:
        response = load_function(function).handler(event(name, body=body), LambdaContext())
        assert response["statusCode"] < 500, response["body"]
    assert all(v == 0 for v in leases().values())


# The LLM function's own OpenAPI document (served by its FastAPI app at /openapi.json).
schema = schemathesis.openapi.from_asgi("/openapi.json", load_function("llm").app)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz_finds_no_server_error(env: None, case: Any) -> None:
    response = case.call()
    assert response.status_code < 500, response.text
    assert "application/json" in str(response.headers["content-type"])
    if response.status_code >= 400:
        assert isinstance(response.json()["error"], str)
    assert all(v == 0 for v in leases().values())


@pytest.mark.parametrize("name", ["a b", "gemma;rm -rf", "x" * 101, "gemma\n", "<script>"])
def test_model_names_with_strange_characters_are_refused_as_bad_input(env: None, name: str) -> None:
    response = load_function("llm").handler(
        event("llm_generate.json", path="/v1/llm/" + name), LambdaContext()
    )
    body = json.loads(response["body"])
    assert (response["statusCode"], body["code"]) == (400, "invalid_request")
