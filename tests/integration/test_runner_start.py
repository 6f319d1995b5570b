"""`make run` with a models file of the user's own (issue 22, item 1): whatever models it
names, the runner starts, says which have no backend and what to do, and serves the embedded
model under a name of the user's choosing; every error at start is one sentence naming the
file, field or variable to fix, never a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from local import embedded_model
from local.process import free_port
from local.template import ROOT

pytestmark = pytest.mark.integration

MINE = {
    "models": {
        "chat": {"max_concurrency": 1, "memory_cost": "low", "timeout": 20000, "backend_model": "x"}
    }
}


def env(**changes: str) -> dict[str, str]:
    """A fresh machine's environment: no OLLAMA_URL, no HERMES_ settings of the test run."""
    base = {
        k: v for k, v in os.environ.items() if not k.startswith("HERMES_") and k != "OLLAMA_URL"
    }
    return {**base, "PORT": str(free_port()), "HERMES_LOCAL_STORE": "moto", **changes}


def no_ollama_here() -> None:
    if embedded_model.ollama_answers("http://localhost:11434"):
        pytest.skip("an Ollama answers on localhost:11434 here")


@contextmanager
def started(environment: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    """The runner, once it says it listens: (its URL, its output lines so far)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "local.runner"],
        env=environment,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                pytest.fail(f"the runner exited: {''.join(lines)}")
            lines.append(line)
            if line.startswith("Hermes listening on "):
                break
        else:
            pytest.fail(f"the runner did not start: {''.join(lines)}")
        url = f"http://127.0.0.1:{environment['PORT']}"
        while True:  # the line comes before uvicorn listens
            try:
                httpx.get(f"{url}/openapi.json", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
                time.sleep(0.1)
        yield url, lines
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_models_file_without_gemma_starts_and_says_what_to_do(tmp_path: Path) -> None:
    no_ollama_here()
    path = tmp_path / "my.json"
    path.write_text(json.dumps(MINE))
    with started(env(HERMES_MODELS_FILE=str(path))) as (url, lines):
        output = "".join(lines)
        assert "Traceback" not in output
        assert f"models file {path} has no model 'gemma'" in output
        assert "chat has no backend" in output and "HERMES_EMBEDDED_MODEL_AS=<name>" in output
        answer = httpx.post(f"{url}/v1/llm/chat", json={"prompt": "hi"}, timeout=30)
        assert (answer.status_code, answer.json()["code"]) == (503, "upstream_unavailable")


def test_the_embedded_model_serves_under_the_name_the_user_chooses(tmp_path: Path) -> None:
    no_ollama_here()
    if not embedded_model.available():
        pytest.skip("the embedded model is not installed")
    path = tmp_path / "my.json"
    path.write_text(json.dumps(MINE))
    environment = env(HERMES_MODELS_FILE=str(path), HERMES_EMBEDDED_MODEL_AS="local-small")
    with started(environment) as (url, lines):
        assert "as model 'local-small'" in "".join(lines)
        body = {"prompt": "The capital of France is", "options": {"num_predict": 8}}
        answer = httpx.post(f"{url}/v1/llm/local-small", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"] and answer.json()["usage"]["completion_tokens"] > 0
        # Issue 23: embeddings too, real vectors from the same server.
        texts = {"model": "local-small", "input": ["a blue sky", "stock prices"]}
        vectors = httpx.post(f"{url}/api/embed", json=texts, timeout=120).json()["embeddings"]
        assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 100


def fails_with(environment: dict[str, str]) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "local.runner"],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0, run.stdout
    assert "Traceback" not in run.stderr, run.stderr
    return run.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{bad", "is not valid JSON"),
        (json.dumps({"models": {"chat": {**MINE["models"]["chat"], "max_concurrency": 0}}}),
         "field 'models.chat.max_concurrency'"),
        (None, "cannot read models file"),
    ],
)  # fmt: skip
def test_a_bad_models_file_is_one_sentence_naming_it(
    tmp_path: Path, content: str | None, says: str
) -> None:
    path = tmp_path / "my.json"
    if content is not None:
        path.write_text(content)
    line = fails_with(env(HERMES_MODELS_FILE=str(path)))
    assert line.startswith("hermes: ") and str(path) in line and says in line, line


def test_bad_variables_and_a_taken_port_are_one_sentence_naming_them() -> None:
    assert "PORT must be a port number" in fails_with(env(PORT="abc"))
    assert "HERMES_EMBEDDED_MODEL_AS must be a model name" in fails_with(
        env(HERMES_EMBEDDED_MODEL_AS="a/b")
    )
    assert "HERMES_API_KEYS must be" in fails_with(
        env(HERMES_API_KEYS="alice", OLLAMA_URL="http://127.0.0.1:9")
    )
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        line = fails_with(env(PORT=port, OLLAMA_URL="http://127.0.0.1:9"))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "set PORT" in line, line
