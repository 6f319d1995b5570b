"""Embeddings through `make run` with clients nobody here wrote (issue 23): the official
`ollama` and `openai` clients and LangChain's OllamaEmbeddings, which got 404 before; and the
limits holding when embeddings and chat share a host (the emulator never sees more than a
model's cap)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.support.hermes_process import HermesProcess
from tests.support.models_file import write_models
from tests.support.ollama_emulator import OllamaEmulator

pytestmark = pytest.mark.integration

TEXTS = [f"document {i} about the sky" for i in range(8)]
MODELS = {
    "models": {
        "gemma": {"max_concurrency": 2, "memory_cost": "low", "timeout": 10000,
                  "backend_model": "gemma3:1b", "queue_timeout_ms": 10000, "max_waiting": 8},
        "embedder": {"max_concurrency": 1, "memory_cost": "low", "timeout": 10000,
                     "backend_model": "llama3:8b", "capabilities": ["embedding"],
                     "queue_timeout_ms": 10000, "max_waiting": 8},
    }
}  # fmt: skip


@pytest.fixture
def runner(hermes_env: dict[str, str], tmp_path: Path) -> Iterator[HermesProcess]:
    path = write_models(tmp_path, MODELS)
    with HermesProcess({**hermes_env, "HERMES_MODELS_FILE": str(path)}) as started:
        yield started


def one_dimension(vectors: list[list[float]]) -> int:
    (dimension,) = {len(v) for v in vectors}
    return dimension


def test_the_official_ollama_client_embeds_a_batch(runner: HermesProcess) -> None:
    answer = ollama.Client(host=runner.url).embed(model="embedder", input=TEXTS)
    assert len(answer.embeddings) == 8 and one_dimension(answer.embeddings) > 0
    single = ollama.Client(host=runner.url).embeddings(model="embedder", prompt=TEXTS[0])
    assert list(single.embedding) == list(answer.embeddings[0])


def test_the_official_openai_client_embeds_a_batch(runner: HermesProcess) -> None:
    """The client asks for base64 and decodes it: the vectors match Ollama's route's."""
    client = openai.OpenAI(base_url=f"{runner.url}/v1", api_key="unused")
    answer = client.embeddings.create(model="embedder", input=TEXTS)
    vectors = [row.embedding for row in answer.data]
    assert len(vectors) == 8 and answer.usage.prompt_tokens > 0
    plain = ollama.Client(host=runner.url).embed(model="embedder", input=TEXTS).embeddings
    for got, expected in zip(vectors, plain, strict=True):  # float32 on the wire
        assert got == pytest.approx(list(expected), abs=1e-6)


def test_langchains_ollama_embeddings_work_unmodified(runner: HermesProcess) -> None:
    from langchain_ollama import OllamaEmbeddings

    embeddings = OllamaEmbeddings(model="embedder", base_url=runner.url)
    vectors = embeddings.embed_documents(TEXTS)
    assert len(vectors) == 8 and one_dimension(vectors) > 0
    assert embeddings.embed_query(TEXTS[3]) == pytest.approx(vectors[3], abs=1e-6)


def test_embeddings_and_chat_on_one_host_stay_within_their_caps(
    runner: HermesProcess, emulator: OllamaEmulator
) -> None:
    """8 embedding batches (cap 1) and 8 generations (cap 2) at once, each answer 300 ms:
    every request is answered (they wait their turn) and the emulator never sees more than
    each model's cap in flight."""
    for tag in ("gemma3:1b", "llama3:8b"):
        emulator.set_behaviour(model=tag, mode="ok", delay_ms=300)

    def embed(_: int) -> int:
        body = {"model": "embedder", "input": TEXTS}
        return httpx.post(f"{runner.url}/api/embed", json=body, timeout=60).status_code

    def chat(_: int) -> int:
        body = {"model": "gemma", "messages": [{"role": "user", "content": "hi"}]}
        return httpx.post(f"{runner.url}/v1/chat/completions", json=body, timeout=60).status_code

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(call, i) for i in range(8) for call in (embed, chat)]
        statuses = [f.result() for f in futures]
    assert statuses == [200] * 16
    peaks = emulator.stats()["peak_in_flight"]
    assert (peaks["llama3:8b"], peaks["gemma3:1b"]) == (1, 2), peaks
