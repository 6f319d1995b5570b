"""When the embedded model server dies (here: SIGILL, as llama.cpp built for another CPU
does on its first token), requests answer 503 upstream_unavailable naming that server, how
it died, what to do and where its log is — not a 502 that blames Ollama."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local.embedded_model import ollama_answers
from tests.support.hermes_process import HermesProcess

pytestmark = pytest.mark.integration

FAKES = Path(__file__).parent / "fake_llama"


@pytest.fixture
def runner() -> Iterator[HermesProcess]:
    if ollama_answers("http://localhost:11434"):
        pytest.skip("an Ollama answers on localhost:11434: the runner would use it")
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FAKES), os.environ.get("PYTHONPATH")])),
        "OLLAMA_URL": "",
        "HERMES_EMBEDDED_MODEL": "1",
        "HERMES_MODELS_FILE": "",
        "HERMES_LOCAL_STORE": "moto",
        "AWS_ENDPOINT_URL_DYNAMODB": "",
        "AWS_ENDPOINT_URL_SQS": "",
    }
    with HermesProcess(env) as process:
        yield process


def generate(runner: HermesProcess) -> httpx.Response:
    return httpx.post(f"{runner.url}/v1/llm/gemma", json={"prompt": "Hi"}, timeout=30)


def test_a_model_server_killed_by_sigill_gives_503_naming_it_and_its_log(
    runner: HermesProcess,
) -> None:
    # Given the runner started its embedded model server (a stand-in) and printed its log path
    log = next(
        line.split("model server log:", 1)[1].strip()
        for line in runner.read_output().splitlines()
        if "model server log:" in line
    )
    # When the server dies by SIGILL while answering
    first = generate(runner)
    # Then the answer is 503 upstream_unavailable naming the server, the signal, the fix, the log
    body = first.json()
    assert (first.status_code, body["code"]) == (503, "upstream_unavailable"), body
    message = body["error"]
    assert "embedded model server (llama-cpp-python)" in message, message
    assert "killed by SIGILL" in message and "make clean-model" in message, message
    assert log in message and "ollama" not in message.lower(), message
    assert "executing an instruction this CPU lacks" in Path(log).read_text()
    # And later requests (connection refused now) say the same
    second = generate(runner)
    assert (second.status_code, second.json()["error"]) == (503, message)
    # And the runner said so on its own
    assert "hermes: the embedded model server (llama-cpp-python) was killed by SIGILL" in (
        runner.read_output()
    )
