"""End to end with real tokens: Hermes' local runner → llama-cpp-python's OpenAI-compatible
server → Gemma 3 270M (from PyPI). A base model: its text rambles, which is fine here."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from local.cpu_variant import choose_for_this_machine, llama_cpp_lib_dir
from local.dynamodb_local import DynamoDBLocal, free_port
from local.embedded_model import ALIAS, ModelServer
from tests.support.hermes_process import HermesProcess
from tests.support.polling import wait_until

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    log = tmp_path_factory.mktemp("model") / "model-server.log"
    server = ModelServer(free_port(), log=log).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hermes(
    model_server: ModelServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HermesProcess]:
    models = {
        "models": {
            "gemma": {"max_concurrency": 1, "memory_cost": "low", "timeout": 60000,
                      "backend_model": ALIAS, "host": "cpu",
                      "capabilities": ["completion", "embedding"]},
            # Same model with a tiny timeout, to watch a real generation being cut off.
            "gemma_hasty": {"max_concurrency": 1, "memory_cost": "low", "timeout": 150,
                            "backend_model": ALIAS, "host": "cpu"},
        },
        "hosts": {"cpu": {"memory_budget": 4, "kind": "openai", "url": model_server.url}},
    }  # fmt: skip
    path = tmp_path_factory.mktemp("real") / "models.json"
    path.write_text(json.dumps(models))
    store = DynamoDBLocal().start()
    store.create_tables()
    env = {
        "AWS_ENDPOINT_URL_DYNAMODB": store.url,
        "HERMES_MODELS_FILE": str(path),
        "HERMES_LEASE_MARGIN_MS": "1000",
        "HERMES_EMBEDDED_MODEL": "0",  # this test brings its own model server
    }
    with HermesProcess(env) as runner:
        yield runner
    store.stop()


def generate(hermes: HermesProcess, model: str = "gemma", tokens: int = 24) -> httpx.Response:
    body = {
        "prompt": "The capital of France is",
        "options": {"num_predict": tokens, "temperature": 0},
    }
    return httpx.post(f"{hermes.url}/v1/llm/{model}", json=body, timeout=120)


def test_a_prompt_returns_real_text_and_token_counts(hermes: HermesProcess) -> None:
    response = generate(hermes)
    answer = response.json()
    assert response.status_code == 200, answer
    assert answer["result"].strip()
    assert answer["usage"]["prompt_tokens"] > 0
    assert 0 < answer["usage"]["completion_tokens"] <= 24


def test_two_requests_beyond_a_limit_of_one_give_one_200_and_one_429(hermes: HermesProcess) -> None:
    first: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: first.update(response=generate(hermes, tokens=96)))
    worker.start()
    wait_until(lambda: hermes.in_flight("gemma") >= 1, 30, "the first request holds gemma's slot")
    second = generate(hermes)
    worker.join(timeout=120)
    assert (second.status_code, second.json()["code"]) == (429, "model_busy")
    assert first["response"].status_code == 200


def test_a_tiny_timeout_gives_504_and_frees_the_slot(
    hermes: HermesProcess, model_server: ModelServer
) -> None:
    # 64 tokens take seconds on a CPU, far beyond 150 ms, and the abandoned generation
    # (llama_cpp.server finishes what it started) holds the server only that long.
    response = generate(hermes, "gemma_hasty", tokens=64)
    assert (response.status_code, response.json()["code"]) == (504, "upstream_timeout")
    assert hermes.in_flight("gemma_hasty") == 0
    # The model server idle again before the next test: it runs one generation at a time
    # (llama_cpp.server's lock), so a one-token completion sent to it directly is answered
    # once the abandoned generation is over.
    idle = httpx.post(
        f"{model_server.url}/v1/completions",
        json={"model": ALIAS, "prompt": "x", "max_tokens": 1},
        timeout=120,
    )
    assert idle.status_code == 200, idle.text


def test_the_official_openai_client_streams_real_tokens_through_hermes(
    hermes: HermesProcess,
) -> None:
    # A completion, not a chat: this base model has no chat tuning and often ends a chat turn
    # at once, while it always continues a text.
    client = openai.OpenAI(base_url=f"{hermes.url}/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(
        model="gemma",
        prompt="The sea is",
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(pieces) > 1 and "".join(pieces).strip()  # several real tokens, one by one
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_status_probes_the_model_server(hermes: HermesProcess) -> None:
    # A probe cached while the CPU was generating (under load) may have timed out: status
    # must come back ok with the model listed once a fresh probe finds the server idle.
    def healthy() -> dict[str, Any] | None:
        status = httpx.get(f"{hermes.url}/v1/status", timeout=10).json()
        return status if status["hosts"][0]["status"] == "ok" else None

    status = wait_until(healthy, 30, "status ok for the model server")
    assert status["hosts"][0]["kind"] == "openai"
    assert ALIAS in [m["name"] for m in status["ollama"]["loaded_models"]]


def test_the_model_server_runs_the_cpu_backend_chosen_for_this_machine(
    model_server: ModelServer,
) -> None:
    # llama-cpp-python alone finds no CPU backend library ("no backends are loaded"): the
    # runner picks the variant this CPU and OS support, and llama.cpp loads that one.
    lib_dir = llama_cpp_lib_dir()
    assert lib_dir is not None
    choice = choose_for_this_machine(lib_dir)
    assert choice.path is not None, "llama_cpp was built without runtime CPU dispatch"
    log = model_server.log.read_text()
    assert f"loaded CPU backend from {choice.path}" in log
    assert log.count("loaded CPU backend") == 1


def test_the_embedded_model_server_gives_real_embeddings(hermes: HermesProcess) -> None:
    """Issue 23: the same server (local/llama_server.py) pools a vector per input, so the
    official ollama client gets one real vector per text, alike for alike texts."""
    import math

    import ollama

    texts = ["The sky is blue.", "The sky is blue today.", "Stock prices fell sharply."]
    vectors = ollama.Client(host=hermes.url).embed(model="gemma", input=texts).embeddings
    assert len(vectors) == 3 and len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 100

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
