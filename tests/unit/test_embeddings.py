"""Embeddings (issue 23) through the real Lambda handlers on moto and the Ollama emulator:
Ollama's /api/embed and /api/embeddings and OpenAI's /v1/embeddings, under the same admission
as generation, on an Ollama host and an OpenAI-compatible one, vectors passed through exactly.
(With the official clients and under concurrent load: tests/integration/test_embeddings.py.)"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.support.lambda_calls import LambdaContext, event, in_flight, load_function
from tests.support.models_file import use_models
from tests.support.ollama_emulator import EMBED_DIM, OllamaEmulator, _vector

TEXTS = [f"text number {i}" for i in range(8)]


def models(emulator_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "models": {
            "gemma": {"max_concurrency": 2, "memory_cost": "low", "timeout": 5000,
                      "backend_model": "gemma3:1b"},
            "embedder": {"max_concurrency": 1, "memory_cost": "low", "timeout": 5000,
                         "backend_model": "mistral:7b", "capabilities": ["embedding"],
                         "max_inputs": 10},
            "both": {"max_concurrency": 1, "memory_cost": "low", "timeout": 5000,
                     "backend_model": "llama3:8b", "capabilities": ["completion", "embedding"],
                     "host": "compatible"},
        },
        "hosts": {"default": {"memory_budget": 8},
                  "compatible": {"memory_budget": 8, "kind": "openai", "url": emulator_url}},
        **extra,
    }  # fmt: skip


@pytest.fixture(autouse=True)
def env(
    aws: None, emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    emulator.reset()
    use_models(monkeypatch, tmp_path, models(emulator.url))
    monkeypatch.setenv("OLLAMA_URL", emulator.url)


def post(function: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    data = event("ollama_embed.json", path=path)
    data["routeKey"] = f"POST {path}"
    data["body"] = json.dumps(body)
    response = load_function(function).handler(data, LambdaContext())
    return response["statusCode"], json.loads(response["body"])


def test_api_embed_gives_a_vector_per_text_as_the_host_computed_it(
    emulator: OllamaEmulator,
) -> None:
    status, answer = post("ollama_api", "/api/embed", {"model": "embedder", "input": TEXTS})
    assert status == 200, answer
    assert answer["model"] == "embedder" and answer["prompt_eval_count"] == 3 * 8
    assert answer["embeddings"] == [_vector(text, EMBED_DIM) for text in TEXTS]
    assert emulator.stats()["requests"]["mistral:7b"] == 1  # one batch, one call
    assert in_flight("embedder") == 0  # the slot came back


def test_api_embeddings_and_a_single_input() -> None:
    status, answer = post("ollama_api", "/api/embeddings", {"model": "embedder", "prompt": "hi"})
    assert (status, answer) == (200, {"embedding": _vector("hi", EMBED_DIM)})
    status, answer = post("ollama_api", "/api/embed", {"model": "embedder", "input": "hi"})
    assert status == 200 and answer["embeddings"] == [_vector("hi", EMBED_DIM)]


@pytest.mark.parametrize("model", ["embedder", "both"])  # an Ollama host, an OpenAI-kind one
def test_v1_embeddings_in_openais_shape_float_and_base64(model: str) -> None:
    status, answer = post("openai_api", "/v1/embeddings", {"model": model, "input": TEXTS})
    assert status == 200, answer
    assert answer["object"] == "list" and answer["model"] == model
    assert [row["index"] for row in answer["data"]] == list(range(8))
    assert [row["embedding"] for row in answer["data"]] == [_vector(t, EMBED_DIM) for t in TEXTS]
    assert answer["usage"] == {"prompt_tokens": 24, "total_tokens": 24}
    body = {"model": model, "input": "hi", "encoding_format": "base64", "dimensions": 32}
    status, answer = post("openai_api", "/v1/embeddings", body)
    raw = base64.b64decode(answer["data"][0]["embedding"])
    decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert decoded == pytest.approx(_vector("hi", 32), abs=1e-6)


def test_the_ollama_dialect_reaches_an_openai_kind_host_and_back() -> None:
    status, answer = post("ollama_api", "/api/embed", {"model": "both", "input": TEXTS[:2]})
    assert status == 200, answer
    assert answer["embeddings"] == [_vector(t, EMBED_DIM) for t in TEXTS[:2]]
    assert answer["prompt_eval_count"] == 6


def test_a_model_answers_only_what_it_serves() -> None:
    status, answer = post("ollama_api", "/api/embed", {"model": "gemma", "input": "hi"})
    assert (status, answer["code"]) == (400, "invalid_request"), answer
    assert "model 'gemma' serves completion only, not embedding" in answer["error"]
    response = load_function("llm").handler(
        event("llm_generate.json", path="/v1/llm/embedder"), LambdaContext()
    )
    refused = json.loads(response["body"])
    assert response["statusCode"] == 400 and "serves embedding only" in refused["error"]


def test_a_batch_is_bounded_and_its_texts_count_toward_the_prompt_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status, answer = post("ollama_api", "/api/embed", {"model": "embedder", "input": ["x"] * 11})
    assert status == 400 and "at most 10 per request (max_inputs)" in answer["error"], answer
    from hermes.config import get_settings
    from hermes.service import get_service

    monkeypatch.setenv("HERMES_MAX_PROMPT_CHARS", "100")
    for cached in (get_settings, get_service):
        cached.cache_clear()
    body = {"model": "embedder", "input": ["y" * 60, "z" * 60]}
    status, answer = post("openai_api", "/v1/embeddings", body)
    assert status == 413 and "'input'" in answer["error"]["message"], answer


def test_a_callers_token_budget_counts_the_input_tokens_the_backend_reports(
    emulator: OllamaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import boto3

    path = tmp_path / "callers.json"
    path.write_text(json.dumps(models(emulator.url, callers={"*": {"tokens_per_minute": 10_000}})))
    monkeypatch.setenv("HERMES_MODELS_FILE", str(path))
    status, _ = post("ollama_api", "/api/embed", {"model": "embedder", "input": TEXTS})
    assert status == 200
    window = boto3.client("dynamodb").get_item(
        TableName="LeaseTable",
        Key={"pk": {"S": "caller#anonymous#budget"}, "sk": {"S": f"tpm#{int(time.time() // 60)}"}},
    )["Item"]
    assert int(window["n"]["N"]) == 24  # settled to prompt_eval_count
