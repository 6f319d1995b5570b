"""The Ollama and OpenAI dialects through their Lambda entry points: on Lambda, Mangum
buffers a streamed answer, so the same bytes arrive in one response."""

from __future__ import annotations

import json

import pytest

from tests.support.lambda_calls import LambdaContext, event, load_function
from tests.support.ollama_emulator import OllamaEmulator


@pytest.fixture(autouse=True)
def env(aws: None, emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    emulator.reset()
    monkeypatch.setenv("OLLAMA_URL", emulator.url)


def call(function: str, name: str, **changes: object) -> tuple[int, str, dict[str, str]]:
    response = load_function(function).handler(event(name, **changes), LambdaContext())
    return response["statusCode"], response["body"], response["headers"]


def test_ollama_generate_streams_ndjson_buffered_on_lambda() -> None:
    status, body, headers = call("ollama_api", "ollama_generate.json")
    lines = [json.loads(line) for line in body.splitlines()]
    assert status == 200 and headers["content-type"] == "application/x-ndjson"
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == 5
    assert all(line["model"] == "gemma" for line in lines)


def test_ollama_chat_without_streaming_is_one_object() -> None:
    status, body, _ = call("ollama_api", "ollama_chat.json")
    answer = json.loads(body)
    assert (
        status == 200 and answer["done"] and answer["message"]["content"].startswith("Echo: Hello")
    )


@pytest.mark.parametrize(
    "name", ["ollama_tags.json", "ollama_ps.json", "ollama_version.json", "ollama_show.json"]
)
def test_ollama_metadata_routes_answer(name: str) -> None:
    assert call("ollama_api", name)[0] == 200


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "claude", "prompt": "hi"}, 404),
        ({"prompt": "hi"}, 400),
        ({"model": "gemma", "prompt": 5}, 400),
    ],
)
def test_ollama_errors_use_ollamas_shape(body: dict, status: int) -> None:
    got, text, _ = call("ollama_api", "ollama_generate.json", body=json.dumps(body))
    assert got == status and isinstance(json.loads(text)["error"], str)


def test_ollama_mid_stream_failure_is_an_error_line(emulator: OllamaEmulator) -> None:
    emulator.set_behaviour(model="gemma3:1b", mode="cut_stream")
    status, body, _ = call("ollama_api", "ollama_generate.json")
    assert status == 200 and "error" in json.loads(body.splitlines()[-1])


def test_openai_chat_streams_server_sent_events_buffered_on_lambda() -> None:
    status, body, headers = call("openai_api", "openai_chat.json")
    events = [line.removeprefix("data: ") for line in body.split("\n\n") if line]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).startswith(
        "Echo: Say"
    )


def test_openai_completion_and_models() -> None:
    status, body, _ = call("openai_api", "openai_completions.json")
    answer = json.loads(body)
    assert (
        status == 200
        and answer["object"] == "text_completion"
        and answer["usage"]["total_tokens"] > 0
    )
    status, body, _ = call("openai_api", "openai_models.json")
    assert [m["id"] for m in json.loads(body)["data"]] == ["gemma", "llama3", "mistral"]


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (
            {"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]},
            404,
            "invalid_request_error",
        ),
        ({"model": "gemma", "messages": []}, 400, "invalid_request_error"),
        (
            {"model": "gemma", "messages": [{"role": "user", "content": "x"}], "n": 2},
            400,
            "invalid_request_error",
        ),
        (
            {"model": "gemma", "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "invalid_request_error",
        ),
    ],
)
def test_openai_errors_use_openais_shape(body: dict, status: int, kind: str) -> None:
    got, text, _ = call("openai_api", "openai_chat.json", body=json.dumps(body))
    error = json.loads(text)["error"]
    assert got == status and error["type"] == kind and error["message"]
