"""Bounded waiting over real sockets (issue 19): a runner on DynamoDB Local and the Ollama
emulator; llama3 has one slot and room for two waiting requests. The request past that gets
429 `queue_full` with Retry-After at once, every admitted or waiting one is answered, and
/v1/status shows the waiting and its bound."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from local.dynamodb_local import DynamoDBLocal
from tests.integration.conftest import TEST_MODELS
from tests.support.hermes_process import HermesProcess
from tests.support.models_file import write_models
from tests.support.ollama_emulator import OllamaEmulator
from tests.support.polling import wait_until


@pytest.fixture
def hermes(
    hermes_env: dict[str, str], tmp_path: Path, dynamodb_local: DynamoDBLocal
) -> Iterator[HermesProcess]:
    models = json.loads(json.dumps(TEST_MODELS))
    models["models"]["llama3"] |= {"queue_timeout_ms": 60_000, "max_waiting": 2, "timeout": 60_000}
    path = write_models(tmp_path, models)
    with HermesProcess({**hermes_env, "HERMES_MODELS_FILE": str(path)}) as process:
        yield process


def llama3(process: HermesProcess) -> dict[str, object]:
    models = httpx.get(f"{process.url}/v1/status", timeout=10).json()["models"]
    return next(m for m in models if m["name"] == "llama3")


def test_past_max_waiting_the_answer_is_queue_full_and_the_rest_are_served(
    hermes: HermesProcess, emulator: OllamaEmulator
) -> None:
    emulator.set_behaviour(model="llama3:8b", mode="hold")
    url = f"{hermes.url}/v1/llm/llama3"

    def ask() -> httpx.Response:
        return httpx.post(url, json={"prompt": "hi"}, timeout=90)

    with ThreadPoolExecutor(3) as pool:
        holder: Future[httpx.Response] = pool.submit(ask)
        wait_until(lambda: llama3(hermes)["in_flight"] == 1, 30, "the slot to be taken")
        waiters = [pool.submit(ask) for _ in range(2)]
        wait_until(lambda: llama3(hermes)["waiting"] == 2, 30, "two requests waiting")
        assert llama3(hermes)["max_waiting"] == 2

        started = time.monotonic()
        refused = ask()
        refused_in_s = time.monotonic() - started
        assert refused.status_code == 429, refused.text
        assert refused.json()["code"] == "queue_full"
        assert "max_waiting" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        assert refused_in_s < 10  # at once, not after waiting (the wait is 60 s)

        emulator.set_behaviour(model="llama3:8b", mode="ok")
        httpx.post(f"{emulator.url}/_emulator/release", timeout=10).raise_for_status()
        answers = [holder.result(timeout=90)] + [w.result(timeout=90) for w in waiters]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert emulator.stats()["peak_in_flight"]["llama3:8b"] == 1
    status = llama3(hermes)
    assert status["waiting"] == 0 and status["in_flight"] == 0
