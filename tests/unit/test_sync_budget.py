"""The synchronous HTTP budget (HERMES_SYNC_BUDGET_MS, 29 s deployed) counts from API Gateway's
receipt of the request (`requestContext.timeEpoch`), not from the handler's start: time lost to
a cold start comes out of the budget, so Hermes' JSON 504 always beats the gateway's own
timeout. Every generating route, through its real Lambda handler with an events/ file."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from hermes.http import REPLAYED_EVENT_AGE_S, gateway_age_s
from tests.support.lambda_calls import LambdaContext, event, load_function
from tests.support.ollama_emulator import OllamaEmulator

BUDGET_MS = 6_000
COLD_START_S = 5.0  # the request reached API Gateway this long before the handler ran


@pytest.fixture(autouse=True)
def env(aws: None, emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    emulator.reset()
    emulator.set_behaviour(model="*", mode="hang")  # only the budget can end a call
    monkeypatch.setenv("OLLAMA_URL", emulator.url)
    monkeypatch.setenv("HERMES_SYNC_BUDGET_MS", str(BUDGET_MS))


def received(name: str, seconds_ago: float) -> dict[str, Any]:
    data = event(name)
    data["requestContext"]["timeEpoch"] = int((time.time() - seconds_ago) * 1000)
    return data


def call(function: str, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = load_function(function).handler(data, LambdaContext(remaining_ms=60_000))
    body = response["body"]
    if response["headers"]["content-type"].startswith("text/event-stream"):
        body = body.removeprefix("data: ").split("\n\n")[0]
    return response["statusCode"], json.loads(body)


def budget_left_ms(
    function: str, data: dict[str, Any], emulator: OllamaEmulator
) -> tuple[int, dict[str, Any], float, float]:
    """Call `function` and bound, from the outside, the run time the budget left it (ms):
    (status, body, low, high). The budget ends at timeEpoch + BUDGET_MS, however long the
    handler took to start; the run time is what is left of it when the slot is granted,
    which is after this call started and before the backend received the request (the
    emulator records when), so: BUDGET_MS - (each of those instants - timeEpoch). A budget
    counted from the handler's start would be COLD_START_S more, far outside."""
    epoch_ms = data["requestContext"]["timeEpoch"]
    started_ms = time.time() * 1000
    status, body = call(function, data)
    ended_ms = time.time() * 1000
    calls = emulator.received()
    assert len(calls) <= 1, calls  # none when no time was left to run
    granted_by_ms = calls[0].at * 1000 if calls else ended_ms
    # +/- 1 ms: the run time is rounded to the millisecond (or to 6 digits in a message).
    return (
        status,
        body,
        BUDGET_MS - (granted_by_ms - epoch_ms) - 1,
        BUDGET_MS - (started_ms - epoch_ms) + 1,
    )


def granted_s(error: dict[str, Any]) -> float:
    """The run time the request was given, as its 504 states it."""
    message = error["error"] if isinstance(error["error"], str) else error["error"]["message"]
    found = re.search(r"within ([0-9.e-]+) s", message)
    assert found, message
    return float(found.group(1))


def test_given_a_cold_start_of_5_s_the_llm_504_comes_5_s_earlier(emulator: OllamaEmulator) -> None:
    status, body, low, high = budget_left_ms(
        "llm", received("llm_generate.json", COLD_START_S), emulator
    )
    assert (status, body["code"]) == (504, "upstream_timeout")
    # Budget 6 s, 5 s of it spent before the handler ran: about 1 s was left, not 6.
    assert high <= BUDGET_MS - COLD_START_S * 1000 + 1
    assert low <= body["timeout_ms"] <= high
    assert body["jobs_url"] == "/v1/jobs/gemma"


@pytest.mark.parametrize(
    ("function", "name"),
    [
        ("ollama_api", "ollama_generate.json"),  # streamed: the 504 comes before any byte
        ("ollama_api", "ollama_chat.json"),
        ("openai_api", "openai_chat.json"),
        ("openai_api", "openai_completions.json"),
    ],
)
def test_the_compatible_routes_count_the_budget_from_the_gateway_too(
    function: str, name: str, emulator: OllamaEmulator
) -> None:
    status, body, low, high = budget_left_ms(function, received(name, COLD_START_S), emulator)
    assert status == 504
    assert high <= BUDGET_MS - COLD_START_S * 1000 + 1
    assert low <= granted_s(body) * 1000 <= high


def test_a_replayed_event_gets_the_whole_budget_from_the_handlers_start() -> None:
    """events/*.json carry a fixed timeEpoch; replayed days later (sam local invoke -e), they
    must not time out at once."""
    data = event("llm_generate.json")
    assert time.time() - data["requestContext"]["timeEpoch"] / 1000 > REPLAYED_EVENT_AGE_S
    assert gateway_age_s(data) == 0.0


@pytest.mark.parametrize(
    ("context", "age"),
    [
        ({"timeEpoch": 1_000_000_000_000}, 5.0),  # HTTP API (v2)
        ({"requestTimeEpoch": 1_000_000_000_000}, 5.0),  # REST API (v1)
        ({"timeEpoch": 1_000_000_010_000}, 0.0),  # the gateway's clock ahead of Lambda's
        ({"timeEpoch": "yesterday"}, 0.0),
        ({}, 0.0),
    ],
)
def test_the_gateway_age_comes_from_the_event(context: dict[str, Any], age: float) -> None:
    assert gateway_age_s({"requestContext": context}, now=1_000_000_005.0) == age
