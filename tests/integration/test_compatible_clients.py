"""The official `ollama` and `openai` Python clients, unmodified, pointed at Hermes' local
runner (backed by the emulator): drop-in compatibility with Hermes' limits applied."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from local.dynamodb_local import DynamoDBLocal
from tests.integration.conftest import TEST_MODELS
from tests.support.hermes_process import HermesProcess
from tests.support.ollama_emulator import OllamaEmulator
from tests.support.polling import wait_until

# llama3's timeout: a call Hermes forgot would be cut then (and its lease end later still).
LLAMA3_TIMEOUT_S = TEST_MODELS["models"]["llama3"]["timeout"] / 1000


@pytest.fixture(scope="module")
def hermes(runner_env: dict[str, str], dynamodb_local: DynamoDBLocal) -> Iterator[HermesProcess]:
    dynamodb_local.reset_tables()
    with HermesProcess(runner_env) as process:
        yield process


@pytest.fixture(autouse=True)
def clean(emulator: OllamaEmulator) -> None:
    emulator.reset()


@pytest.fixture
def ollama_client(hermes: HermesProcess) -> ollama.Client:
    return ollama.Client(host=hermes.url)


@pytest.fixture
def openai_client(hermes: HermesProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{hermes.url}/v1", api_key="unused", max_retries=0)


def hold_llama3(hermes: HermesProcess, emulator: OllamaEmulator) -> threading.Thread:
    """Occupy llama3's only slot with a request the emulator never answers (5 s timeout)."""
    emulator.set_behaviour(model="llama3:8b", mode="hang")
    holder = threading.Thread(
        target=lambda: httpx.post(
            f"{hermes.url}/v1/llm/llama3", json={"prompt": "hold"}, timeout=30
        ),
        daemon=True,
    )
    holder.start()
    wait_until(
        lambda: emulator.stats()["in_flight"].get("llama3:8b", 0) >= 1, 15, "llama3's slot held"
    )
    return holder


# -- ollama ----------------------------------------------------------------------------


def test_ollama_generate_with_hermes_name_and_backend_tag(ollama_client: ollama.Client) -> None:
    answer = ollama_client.generate(model="gemma", prompt="hello world")
    assert answer.response.startswith("Echo: hello") and answer.done and answer.eval_count == 5
    assert answer.model == "gemma"
    assert ollama_client.generate(model="gemma3:1b", prompt="hi").model == "gemma3:1b"


def test_ollama_streams_token_by_token(
    ollama_client: ollama.Client, emulator: OllamaEmulator
) -> None:
    emulator.set_behaviour(model="gemma3:1b", mode="ok", token_delay_ms=100)
    arrivals: list[float] = []
    parts: list[str] = []
    started = time.monotonic()
    for chunk in ollama_client.generate(model="gemma", prompt="one two three", stream=True):
        arrivals.append(time.monotonic() - started)
        parts.append(chunk.response)
        final = chunk
    assert final.done and final.done_reason == "stop" and final.eval_count == 5
    assert "".join(parts).startswith("Echo: one two")
    # Tokens arrive as they are produced, not all at the end.
    assert arrivals[-1] - arrivals[0] > 0.3


def test_ollama_chat_streaming_and_not(ollama_client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "how are you"}]
    assert ollama_client.chat(model="mistral", messages=messages).message.content.startswith(
        "Echo: how"
    )
    streamed = "".join(
        c.message.content
        for c in ollama_client.chat(model="mistral", messages=messages, stream=True)
    )
    assert streamed.startswith("Echo: how")


def test_ollama_list_ps_show_and_version(ollama_client: ollama.Client) -> None:
    assert sorted(m.model for m in ollama_client.list().models) == ["gemma", "llama3", "mistral"]
    ollama_client.generate(model="gemma", prompt="warm up")
    assert "gemma" in [m.model for m in ollama_client.ps().models]
    assert ollama_client.show("gemma").modelfile
    assert httpx.get(f"{ollama_client._client.base_url}/api/version").json()["version"]


def test_ollama_errors_are_the_clients_own_exceptions(
    ollama_client: ollama.Client, hermes: HermesProcess, emulator: OllamaEmulator
) -> None:
    with pytest.raises(ollama.ResponseError) as unknown:
        ollama_client.generate(model="claude", prompt="hi")
    assert unknown.value.status_code == 404
    holder = hold_llama3(hermes, emulator)
    with pytest.raises(ollama.ResponseError) as busy:
        ollama_client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert busy.value.status_code == 429 and "capacity" in busy.value.error
    holder.join(timeout=15)
    assert not holder.is_alive(), "the held llama3 request never ended"


def test_a_client_that_disconnects_mid_stream_releases_its_slot(
    ollama_client: ollama.Client, hermes: HermesProcess, emulator: OllamaEmulator
) -> None:
    # Given a stream of 200 tokens at 50 ms (10 s: longer than llama3's 5 s timeout)
    emulator.set_behaviour(model="llama3:8b", mode="ok", tokens=200, token_delay_ms=50)
    started = time.monotonic()  # before the admission: the timeout and lease start later
    stream = ollama_client.generate(model="llama3", prompt="a long story", stream=True)
    next(stream)
    assert hermes.in_flight("llama3") == 1
    # When the client closes the HTTP response mid-stream
    stream.close()
    ollama_client._client.close()
    # Then the slot is free and Ollama was told to stop, before llama3's timeout could have
    # ended the call (and so before its lease, longer still, could have expired): released
    # because the client left, however slow the machine is up to that bound.
    before_timeout = started + LLAMA3_TIMEOUT_S
    wait_until(lambda: hermes.in_flight("llama3") == 0, 30, "llama3's slot released")
    wait_until(
        lambda: emulator.stats()["in_flight"].get("llama3:8b", 0) == 0, 30, "Ollama told to stop"
    )
    freed_in = time.monotonic() - started
    print(f"released {freed_in:.2f} s after the request started")
    assert time.monotonic() < before_timeout, f"released only {freed_in:.2f} s after the start"


# -- openai ----------------------------------------------------------------------------


def test_openai_chat_completion(openai_client: openai.OpenAI) -> None:
    reply = openai_client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "hi you"}]
    )
    assert reply.choices[0].message.content.startswith("Echo: hi")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.model == "gemma"


def test_openai_chat_completion_streamed_with_usage(openai_client: openai.OpenAI) -> None:
    chunks: list[Any] = list(
        openai_client.chat.completions.create(
            model="gemma",
            messages=[{"role": "user", "content": "stream me"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Echo: stream")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_openai_completions_and_models(openai_client: openai.OpenAI) -> None:
    assert (
        openai_client.completions.create(model="mistral", prompt="once upon")
        .choices[0]
        .text.startswith("Echo")
    )
    assert [m.id for m in openai_client.models.list()] == ["gemma", "ghost", "llama3", "mistral"]


def test_openai_errors_are_the_clients_own_exceptions(
    openai_client: openai.OpenAI, hermes: HermesProcess, emulator: OllamaEmulator
) -> None:
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(
            model="gpt-5", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model="gemma", messages=[])
    holder = hold_llama3(hermes, emulator)
    with pytest.raises(openai.RateLimitError) as busy:
        openai_client.chat.completions.create(
            model="llama3", messages=[{"role": "user", "content": "hi"}]
        )
    assert busy.value.response.headers["retry-after"]
    holder.join(timeout=15)
    assert not holder.is_alive(), "the held llama3 request never ended"
