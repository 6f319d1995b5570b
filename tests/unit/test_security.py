"""Findings of the security audit (issue 21), each through the real Lambda handlers on moto
and the Ollama emulator: what a caller can send, and what an answer may show."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.ollama_emulator import OllamaEmulator
from tests.unit.test_handlers import LambdaContext, event, load_function

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
