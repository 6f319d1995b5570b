"""The local runner over real sockets: Hermes process ↔ DynamoDB Local ↔ Ollama emulator."""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from local.dynamodb_local import DynamoDBLocal, free_port
from tests.integration.conftest import TEST_MODELS
from tests.support.hermes_process import HermesProcess
from tests.support.ollama_emulator import OllamaEmulator

# mistral's timeout, and the shortest timeout of any other model: a 504 after the first and
# before the second came from mistral's own timeout, not another model's or a default.
MISTRAL_TIMEOUT_S = TEST_MODELS["models"]["mistral"]["timeout"] / 1000
OTHER_TIMEOUT_S = (
    min(m["timeout"] for name, m in TEST_MODELS["models"].items() if name != "mistral") / 1000
)


@pytest.fixture(scope="module")
def shared_env(runner_env: dict[str, str]) -> dict[str, str]:
    return runner_env


@pytest.fixture(scope="module")
def hermes(shared_env: dict[str, str], dynamodb_local: DynamoDBLocal) -> Iterator[HermesProcess]:
    dynamodb_local.reset_tables()
    with HermesProcess(shared_env) as process:
        yield process


@pytest.fixture(autouse=True)
def clean_emulator(emulator: OllamaEmulator) -> None:
    emulator.reset()


def post(
    base: str, model: str, body: object = None, *, content: str | None = None, timeout: float = 30
) -> httpx.Response:
    if content is not None:
        return httpx.post(f"{base}/v1/llm/{model}", content=content, timeout=timeout)
    return httpx.post(f"{base}/v1/llm/{model}", json=body, timeout=timeout)


def test_a_prompt_returns_the_result(hermes: HermesProcess) -> None:
    # The seed's quick start, byte for byte: curl -d sends no JSON content type.
    response = httpx.post(
        f"{hermes.url}/v1/llm/gemma",
        content='{"prompt":"hi"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    assert response.json()["result"]


def test_status_is_healthy_with_live_usage(hermes: HermesProcess) -> None:
    response = httpx.get(f"{hermes.url}/v1/status", timeout=5)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "healthy"
    assert {m["name"]: m["in_flight"] for m in body["models"]} == {
        "gemma": 0,
        "ghost": 0,
        "llama3": 0,
        "mistral": 0,
    }


@pytest.mark.parametrize(
    ("model", "kwargs", "status", "code"),
    [
        ("gemma", {"content": "{not json"}, 400, "invalid_request"),
        ("gemma", {"body": {"prompt": None}}, 400, "invalid_request"),
        (
            "gemma",
            {"body": {"prompt": "hi", "options": {"temperature": -1}}},
            400,
            "invalid_request",
        ),
        ("claude", {"body": {"prompt": "hi"}}, 404, "model_not_configured"),
        ("ghost", {"body": {"prompt": "hi"}}, 404, "model_not_found"),
        ("gemma", {"body": {"prompt": "x" * 1001}}, 413, "prompt_too_large"),
    ],
)
def test_error_codes(
    hermes: HermesProcess, model: str, kwargs: dict, status: int, code: str
) -> None:
    response = post(hermes.url, model, kwargs.get("body"), content=kwargs.get("content"))
    assert (response.status_code, response.json()["code"]) == (status, code)


def test_unknown_routes_and_methods_are_json(hermes: HermesProcess) -> None:
    missing = httpx.get(f"{hermes.url}/v2/anything")
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    wrong = httpx.delete(f"{hermes.url}/v1/status")
    assert (wrong.status_code, wrong.json()["code"]) == (405, "method_not_allowed")


def test_an_ollama_failure_is_502_and_the_slot_comes_back(
    hermes: HermesProcess, emulator: OllamaEmulator
) -> None:
    emulator.set_behaviour(model="gemma3:1b", mode="error", status=500)
    response = post(hermes.url, "gemma", {"prompt": "hi"})
    assert (response.status_code, response.json()["code"]) == (502, "upstream_error")
    assert hermes.in_flight("gemma") == 0


def test_a_hanging_ollama_gives_504_and_releases_the_slot(
    hermes: HermesProcess, emulator: OllamaEmulator
) -> None:
    # A first admission on a fresh runner and store can take most of mistral's 1 s (a cold
    # DynamoDB Local on a loaded machine), which cuts the call short by its lease or leaves no
    # time at all (503): this test is about the model's timeout, so the path is warmed first.
    assert post(hermes.url, "mistral", {"prompt": "warm up"}).status_code == 200
    emulator.set_behaviour(model="mistral:7b", mode="hang")
    started = time.monotonic()
    response = post(hermes.url, "mistral", {"prompt": "hi"})
    assert (response.status_code, response.json()["code"]) == (504, "upstream_timeout")
    took = time.monotonic() - started
    # Cut by mistral's own timeout (1 s): not before it, and before the next longest (5 s).
    assert MISTRAL_TIMEOUT_S * 0.95 <= took < OTHER_TIMEOUT_S, took
    assert hermes.in_flight("mistral") == 0
    emulator.set_behaviour(model="mistral:7b", mode="ok")
    assert post(hermes.url, "mistral", {"prompt": "hi"}).status_code == 200


def test_concurrent_llama3_requests_run_one_at_a_time(
    hermes: HermesProcess, emulator: OllamaEmulator
) -> None:
    emulator.set_behaviour(model="llama3:8b", mode="ok", delay_ms=400)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(hermes.url, "llama3", {"prompt": "hi"}), range(8)))
    codes = Counter((r.status_code, r.json().get("code")) for r in responses)
    assert emulator.stats()["peak_in_flight"]["llama3:8b"] == 1
    assert codes[(200, None)] >= 1
    assert codes[(200, None)] + codes[(429, "model_busy")] == 8, codes
    assert all(r.headers["retry-after"] for r in responses if r.status_code == 429)


def test_two_runners_sharing_one_store_never_exceed_the_limit(
    hermes: HermesProcess, shared_env: dict[str, str], emulator: OllamaEmulator
) -> None:
    emulator.set_behaviour(model="gemma3:1b", mode="ok", delay_ms=300)
    with HermesProcess(shared_env) as second, ThreadPoolExecutor(12) as pool:
        urls = [hermes.url, second.url] * 6
        responses = list(pool.map(lambda url: post(url, "gemma", {"prompt": "hi"}), urls))
    codes = Counter(r.status_code for r in responses)
    assert emulator.stats()["peak_in_flight"]["gemma3:1b"] <= 2
    assert codes[200] >= 2 and codes[200] + codes[429] == 12, codes


def test_ollama_down_is_503_upstream_unavailable(shared_env: dict[str, str]) -> None:
    env = {**shared_env, "OLLAMA_URL": f"http://127.0.0.1:{free_port()}"}
    with HermesProcess(env) as runner:
        response = post(runner.url, "gemma", {"prompt": "hi"})
        assert (response.status_code, response.json()["code"]) == (503, "upstream_unavailable")
        assert runner.in_flight("gemma") == 0
        # Ollama is the one host of every model: nothing can be served.
        status = httpx.get(f"{runner.url}/v1/status", timeout=5)
        assert (status.status_code, status.json()["checks"]["ollama"]["status"]) == (503, "error")
        assert status.json()["status"] == "unhealthy"


def test_dynamodb_down_fails_closed_with_503(
    shared_env: dict[str, str], emulator: OllamaEmulator
) -> None:
    store = DynamoDBLocal().start()
    store.reset_tables()
    with HermesProcess({**shared_env, "AWS_ENDPOINT_URL_DYNAMODB": store.url}) as runner:
        assert post(runner.url, "gemma", {"prompt": "hi"}).status_code == 200
        store.stop()
        response = post(runner.url, "gemma", {"prompt": "hi"})
        assert (response.status_code, response.json()["code"]) == (503, "limiter_unavailable")
        assert emulator.stats()["requests"].get("gemma3:1b") == 1  # never admitted blindly
        status = httpx.get(f"{runner.url}/v1/status", timeout=5)
        assert (status.status_code, status.json()["status"]) == (503, "unhealthy")
        assert status.json()["checks"]["dynamodb"]["status"] == "error"


def test_an_api_key_protects_the_runner(shared_env: dict[str, str]) -> None:
    with HermesProcess({**shared_env, "HERMES_API_KEY": "s3cret"}) as runner:
        missing = post(runner.url, "gemma", {"prompt": "hi"})
        assert (missing.status_code, missing.json()["code"]) == (401, "unauthorized")
        wrong = httpx.get(f"{runner.url}/v1/status", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        good = httpx.post(
            f"{runner.url}/v1/llm/gemma",
            json={"prompt": "hi"},
            headers={"Authorization": "Bearer s3cret"},
            timeout=10,
        )
        assert good.status_code == 200


def test_beyond_loopback_the_runner_listens_with_a_key(shared_env: dict[str, str]) -> None:
    env = {**shared_env, "HOST": "0.0.0.0", "HERMES_API_KEY": "s3cret"}
    with HermesProcess(env) as runner:
        assert post(runner.url, "gemma", {"prompt": "hi"}).status_code == 401


# The runner's body limit: HERMES_MAX_PROMPT_CHARS=1000 (runner_env) at 6 bytes each + 64 KiB.
BODY_LIMIT = 1000 * 6 + 64 * 1024
FIFTY_MB = 50 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def answer(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, object]]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, dict(response.getheaders()), json.loads(response.read())


def head(hermes: HermesProcess, *headers: str) -> bytes:
    lines = ["POST /v1/llm/gemma HTTP/1.1", f"Host: 127.0.0.1:{hermes.port}",
             "Content-Type: application/json", *headers]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_50_mb_content_length_is_413_before_the_body_is_sent(hermes: HermesProcess) -> None:
    assert hermes.process is not None
    before = rss_bytes(hermes.process.pid)
    with socket.create_connection(("127.0.0.1", hermes.port), timeout=10) as sock:
        # Headers claiming 50 MB, then a few bytes: the answer comes without the rest.
        sock.sendall(head(hermes, f"Content-Length: {FIFTY_MB}") + b'{"prompt": "')
        started = time.monotonic()
        status, headers, body = answer(sock)
        took = time.monotonic() - started
    assert (status, body["code"]) == (413, "prompt_too_large")
    assert f"{FIFTY_MB} bytes" in str(body["error"]) and str(BODY_LIMIT) in str(body["error"])
    assert headers["connection"] == "close"
    assert took < 5
    assert rss_bytes(hermes.process.pid) - before < 10 * 1024 * 1024


def test_a_chunked_body_is_413_once_it_passes_the_limit(hermes: HermesProcess) -> None:
    assert hermes.process is not None
    before = rss_bytes(hermes.process.pid)
    chunk = b"x" * 16384
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent = 0
    with socket.create_connection(("127.0.0.1", hermes.port), timeout=30) as sock:
        sock.sendall(head(hermes, "Transfer-Encoding: chunked") + frame)
        sent += len(chunk)
        # Send one frame past the limit (a client streaming 50 MB, paused there), then nothing
        # more: a server that read the whole body before judging it would never answer.
        while sent <= BODY_LIMIT and not select.select([sock], [], [], 0)[0]:
            sock.sendall(frame)
            sent += len(chunk)
        assert select.select([sock], [], [], 30)[0], f"no answer after {sent} bytes of body"
        status, _, body = answer(sock)
    assert (status, body["code"]) == (413, "prompt_too_large")
    assert f"more than {BODY_LIMIT} bytes" in str(body["error"])
    assert rss_bytes(hermes.process.pid) - before < 10 * 1024 * 1024


def test_a_chunked_body_within_the_limit_is_served(hermes: HermesProcess) -> None:
    def pieces() -> Iterator[bytes]:
        yield b'{"prompt": '
        yield b'"hi"}'

    response = httpx.post(f"{hermes.url}/v1/llm/gemma", content=pieces(), timeout=30)
    assert response.status_code == 200 and response.json()["result"]
