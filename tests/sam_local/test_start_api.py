"""Every public route family through `sam local start-api`, each answer compared with the
Docker-free runner's answer to the same request, against the same DynamoDB Local and
Ollama emulator: the two local paths cannot drift apart unnoticed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from local.sam.api import StartApi
from tests.sam_local.answers import EVENTS, Answer, from_http, load, request_for
from tests.sam_local.conftest import PARITY, SYNC_BUDGET_MS
from tests.support.hermes_process import HermesProcess
from tests.support.ollama_emulator import OllamaEmulator

# Generous: the first test also pays for the session (a cold stand-in image build: ~2 min).
pytestmark = [pytest.mark.sam_local, pytest.mark.timeout(900)]

HTTP_EVENTS = [path for path in EVENTS if "routeKey" in load(path)]
# What each route family must answer (every other event: anything but a 5xx).
EXPECTED = {
    "llm_generate.json": 200,
    "status.json": 200,
    "ollama_generate.json": 200,
    "openai_chat.json": 200,
    "jobs_submit.json": 202,
}


class Both:
    """The same request to SAM's emulator and to the runner."""

    def __init__(self, sam: StartApi, runner: HermesProcess) -> None:
        self.sam = httpx.Client(base_url=sam.url, timeout=60, trust_env=False)
        self.runner = httpx.Client(base_url=runner.url, timeout=60, trust_env=False)

    def request(self, **request: Any) -> tuple[httpx.Response, httpx.Response]:
        return self.sam.request(**request), self.runner.request(**request)

    def post(self, path: str, json: Any) -> tuple[httpx.Response, httpx.Response]:
        return self.request(method="POST", url=path, json=json)


@pytest.fixture(scope="module")
def both(sam_api: StartApi, runner: HermesProcess) -> Iterator[Both]:
    pair = Both(sam_api, runner)
    yield pair
    pair.sam.close()
    pair.runner.close()


@pytest.fixture(autouse=True)
def normal_emulator(emulator: OllamaEmulator) -> Iterator[None]:
    emulator.reset()
    yield
    emulator.reset()


def same(sam: httpx.Response, runner: httpx.Response) -> Answer:
    asked = f"{sam.request.method} {sam.request.url.path}"
    PARITY.append((asked, "start-api", from_http(runner), from_http(sam)))
    assert from_http(sam).comparable() == from_http(runner).comparable(), (sam.text, runner.text)
    return from_http(sam)


@pytest.mark.parametrize("event", HTTP_EVENTS, ids=lambda path: path.name)
def test_every_route_answers_through_sam_as_through_the_runner(event: Path, both: Both) -> None:
    """Given an events/ file, when its request goes through sam and through the runner, then
    both answer alike, and each route family answers what it should."""
    answer = same(*both.request(**request_for(load(event))))
    assert answer.status == EXPECTED.get(event.name, answer.status) and answer.status < 500


def test_a_generation_returns_the_result(both: Both) -> None:
    sam, runner = both.post("/v1/llm/gemma", {"prompt": "hi"})
    same(sam, runner)
    assert sam.status_code == 200 and sam.json()["result"].startswith("Echo:")


def test_status_is_healthy_with_dynamodb_and_ollama_reachable(both: Both) -> None:
    sam, runner = both.request(method="GET", url="/v1/status")
    same(sam, runner)
    assert sam.json()["status"] == "healthy", sam.json()["checks"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ("not json", 400, "invalid_request"),
        ({"prompt": ""}, 400, "invalid_request"),
        ({"prompt": "x" * 100_001}, 413, "prompt_too_large"),
    ],
    ids=["invalid-json", "empty-prompt", "too-large"],
)
def test_bad_requests_get_the_same_json_error(
    both: Both, body: Any, status: int, code: str
) -> None:
    if isinstance(body, str):
        sam, runner = both.request(method="POST", url="/v1/llm/gemma", content=body)
    else:
        sam, runner = both.post("/v1/llm/gemma", body)
    answer = same(sam, runner)
    assert (answer.status, answer.code) == (status, code)


def test_an_unknown_model_is_404_not_configured(both: Both) -> None:
    answer = same(*both.post("/v1/llm/gpt5", {"prompt": "hi"}))
    assert (answer.status, answer.code) == (404, "model_not_configured")


def test_a_model_ollama_lacks_is_404_not_found(both: Both, emulator: OllamaEmulator) -> None:
    emulator.set_behaviour("gemma3:1b", "not_found")
    answer = same(*both.post("/v1/llm/gemma", {"prompt": "hi"}))
    assert (answer.status, answer.code) == (404, "model_not_found")


def test_an_ollama_error_is_502(both: Both, emulator: OllamaEmulator) -> None:
    emulator.set_behaviour("gemma3:1b", "error", status=500)
    answer = same(*both.post("/v1/llm/gemma", {"prompt": "hi"}))
    assert (answer.status, answer.code) == (502, "upstream_error")


def test_a_full_model_is_429_with_retry_after_across_both_paths(
    both: Both, emulator: OllamaEmulator
) -> None:
    """Given both gemma slots held by slow requests through the runner, when one more comes
    through sam and one through the runner, then both are refused with 429 and Retry-After:
    the two paths share one lease table, as Lambda instances do."""
    emulator.set_behaviour("gemma3:1b", "ok", delay_ms=6000)
    holders = [
        threading.Thread(
            target=both.runner.post, args=("/v1/llm/gemma",), kwargs={"json": {"prompt": "hold"}}
        )
        for _ in range(2)
    ]
    for holder in holders:
        holder.start()
    deadline = time.monotonic() + 10
    while emulator.stats()["in_flight"].get("gemma3:1b", 0) < 2:
        assert time.monotonic() < deadline, emulator.stats()
        time.sleep(0.05)
    answer = same(*both.post("/v1/llm/gemma", {"prompt": "hi"}))
    assert (answer.status, answer.code) == (429, "model_busy")
    assert dict(answer.headers)["retry-after"].isdigit()
    for holder in holders:
        holder.join()


def test_a_hung_model_is_504_within_the_synchronous_budget(
    both: Both, emulator: OllamaEmulator
) -> None:
    emulator.set_behaviour("mistral:7b", "hang")
    answers: dict[str, httpx.Response] = {}
    sam = threading.Thread(
        target=lambda: answers.update(sam=both.sam.post("/v1/llm/mistral", json={"prompt": "hi"}))
    )
    started = time.monotonic()
    sam.start()
    answers["runner"] = both.runner.post("/v1/llm/mistral", json={"prompt": "hi"})
    sam.join()
    answer = same(answers["sam"], answers["runner"])
    assert (answer.status, answer.code) == (504, "upstream_timeout")
    assert time.monotonic() - started < SYNC_BUDGET_MS / 1000 + 5


def test_a_job_is_accepted_with_a_status_url(both: Both) -> None:
    sam, runner = both.post("/v1/jobs/gemma", {"prompt": "a long story"})
    same(sam, runner)
    assert sam.status_code == 202 and sam.headers["location"] == sam.json()["status_url"]
    # Submitted through sam, readable through the runner: one jobs table.
    assert both.runner.get(sam.json()["status_url"]).status_code == 200
