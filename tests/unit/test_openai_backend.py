"""A model on an OpenAI-compatible backend behaves like one on Ollama: same limits,
errors and status, through every public dialect. The emulator serves OpenAI's /v1 too."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from hermes.backends import OllamaClient, OpenAIClient, set_down_reason
from hermes.errors import HermesError
from tests.support.lambda_calls import LambdaContext, event, load_function
from tests.support.models_file import use_models
from tests.support.ollama_emulator import OllamaEmulator


@pytest.fixture(autouse=True)
def openai_host(
    aws: None, emulator: OllamaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator.reset()
    config = {
        "models": {
            "gemma": {
                "max_concurrency": 1,
                "memory_cost": "low",
                "timeout": 2000,
                "backend_model": "gemma3:1b",
                "host": "llamacpp",
            },
        },
        "hosts": {"llamacpp": {"memory_budget": 4, "kind": "openai", "url": emulator.url}},
    }
    use_models(monkeypatch, tmp_path, config)


def call(function: str, name: str, **changes: object) -> tuple[int, str]:
    response = load_function(function).handler(event(name, **changes), LambdaContext())
    return response["statusCode"], response["body"]


def test_v1_llm_answers_with_token_counts(emulator: OllamaEmulator) -> None:
    status, body = call("llm", "llm_generate.json")
    answer = json.loads(body)
    assert status == 200 and answer["result"].startswith("Echo")
    assert answer["usage"] == {
        "prompt_tokens": answer["usage"]["prompt_tokens"],
        "completion_tokens": 5,
    }
    assert emulator.stats()["requests"]["gemma3:1b"] == 1


def test_ollama_dialect_streams_from_an_openai_backend() -> None:
    status, body = call("ollama_api", "ollama_generate.json")
    lines = [json.loads(line) for line in body.splitlines()]
    assert status == 200 and lines[-1]["done"] and lines[-1]["eval_count"] == 5
    assert "".join(line["response"] for line in lines).startswith("Echo: Why")


def test_openai_dialect_streams_from_an_openai_backend() -> None:
    status, body = call("openai_api", "openai_chat.json")
    assert status == 200 and body.rstrip().endswith("data: [DONE]")


def test_backend_errors_map_the_same_way(emulator: OllamaEmulator) -> None:
    emulator.set_behaviour(model="gemma3:1b", mode="not_found")
    assert json.loads(call("llm", "llm_generate.json")[1])["code"] == "model_not_found"
    emulator.set_behaviour(model="gemma3:1b", mode="hang")
    status, body = call("llm", "llm_generate.json")
    assert (status, json.loads(body)["code"]) == (504, "upstream_timeout")


def test_status_probes_the_openai_backend_with_its_models_route() -> None:
    status, body = call("status", "status.json")
    report = json.loads(body)
    assert status == 200 and report["hosts"][0]["kind"] == "openai"
    assert report["checks"]["ollama"]["status"] == "ok"


# Each failure a backend can show, provoked through a mock transport: (name, handler, path).
def _refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def _cut(request: httpx.Request) -> httpx.Response:
    raise httpx.RemoteProtocolError("server disconnected without a response", request=request)


def _stall(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


FAILURES = {
    "unreachable": _refuse,
    "cut mid-answer": _cut,
    "timeout": _stall,
    "unknown model": lambda _: httpx.Response(404, json={"error": "model not found"}),
    "overloaded": lambda _: httpx.Response(503, json={"error": "server busy"}),
    "server error": lambda _: httpx.Response(500, json={"error": "boom"}),
    "unexpected body": lambda _: httpx.Response(200, json=["not", "an", "object"]),
}


def _failure(client_class: type[OllamaClient], handler: Any, streamed: bool) -> HermesError:
    client = client_class("http://backend.test:1234", transport=httpx.MockTransport(handler))
    body = {"model": "gemma3:1b", "prompt": "Hi"}

    async def call() -> None:
        if streamed:
            async for _ in client.stream("/api/generate", body, 1.0):
                pass
        else:
            await client.complete("/api/generate", body, 1.0)

    with pytest.raises(HermesError) as caught:
        asyncio.run(call())
    return caught.value


# Every failure, complete and streamed; an unexpected body only exists for `complete` (a
# stream of events has no one body to judge).
@pytest.mark.parametrize(
    ("failure", "streamed"),
    [(failure, False) for failure in FAILURES]
    + [(failure, True) for failure in FAILURES if failure != "unexpected body"],
)
def test_an_openai_compatible_backend_failure_never_blames_ollama(
    failure: str, streamed: bool
) -> None:
    # Given an OpenAI-compatible host, when it fails in any way
    error = _failure(OpenAIClient, FAILURES[failure], streamed)
    # Then the message names that kind of server, and no hint says `ollama pull`
    assert "ollama" not in error.message.lower(), error.message
    assert "OpenAI-compatible server" in error.message, error.message


@pytest.mark.parametrize("failure", FAILURES)
def test_an_ollama_backend_failure_names_ollama(failure: str) -> None:
    error = _failure(OllamaClient, FAILURES[failure], streamed=False)
    assert "Ollama" in error.message, error.message


def test_a_missing_model_on_an_openai_compatible_server_points_at_its_model_list() -> None:
    error = _failure(OpenAIClient, FAILURES["unknown model"], streamed=False)
    assert error.code == "model_not_found"
    assert "/v1/models" in error.message and "pull" not in error.message


def test_a_registered_down_reason_explains_a_broken_connection() -> None:
    # Given whoever runs the backend can say why it is down (the local runner does)
    set_down_reason("http://backend.test:1234/", lambda: "the model server was killed by SIGILL")
    try:
        for handler in (_refuse, _cut):
            # When a connection to it fails or breaks off
            error = _failure(OpenAIClient, handler, streamed=True)
            # Then the caller gets that reason as a 503, not a 502 about a closed connection
            assert (error.status, error.code) == (503, "upstream_unavailable")
            assert error.message == "the model server was killed by SIGILL"
    finally:
        set_down_reason("http://backend.test:1234", None)
    # A backend that runs (reason None) keeps the usual messages
    set_down_reason("http://backend.test:1234", lambda: None)
    try:
        assert _failure(OpenAIClient, _cut, streamed=False).code == "upstream_error"
    finally:
        set_down_reason("http://backend.test:1234", None)
