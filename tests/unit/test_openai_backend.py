"""A model on an OpenAI-compatible backend behaves like one on Ollama: same limits,
errors and status, through every public dialect. The emulator serves OpenAI's /v1 too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.ollama_emulator import OllamaEmulator
from tests.unit.test_handlers import LambdaContext, event, load_function


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
    path = tmp_path / "models.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("HERMES_MODELS_FILE", str(path))


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
