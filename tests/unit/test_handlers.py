"""The Lambda entry points, called exactly as Lambda calls them, with the events under events/.
DynamoDB is moto; Ollama is the emulator on a real loopback socket."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hermes.http import LAMBDA_SAFETY_S
from hermes.limiter import Lease, Ticket
from hermes.limiter.records import waiting_attr
from hermes.service import get_service, host_pool, model_counter
from tests.support.lambda_calls import (
    LambdaContext,
    event,
    hold,
    in_flight,
    invoke,
    load_function,
)
from tests.support.models_file import use_shipped_models
from tests.support.ollama_emulator import OllamaEmulator

LLAMA3_WAITING = waiting_attr(model_counter("llama3"))  # its waiters' count, in usage


@pytest.fixture(autouse=True)
def env(aws: None, emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    emulator.reset()
    monkeypatch.setenv("OLLAMA_URL", emulator.url)


def test_given_a_prompt_when_posted_then_the_result_comes_back() -> None:
    status, body, _ = invoke("llm", "llm_generate.json")
    assert status == 200
    assert body["result"] and body["model"] == "gemma" and body["backend_model"] == "gemma3:1b"
    assert body["usage"]["completion_tokens"] > 0


def test_options_and_system_reach_the_backend(emulator: OllamaEmulator) -> None:
    sent = json.loads(event("llm_generate_with_options.json")["body"])
    status, body, _ = invoke("llm", "llm_generate_with_options.json")
    assert status == 200, body
    # The backend received the caller's system prompt and every option, as sent, and the
    # model's backend tag in place of its Hermes name.
    (call,) = emulator.received()
    assert call.path == "/api/generate"
    assert (call.body["model"], call.body["prompt"]) == ("mistral:7b", sent["prompt"])
    assert call.body["system"] == sent["system"] == "Answer tersely."
    context = get_service().settings.models["mistral"].max_num_ctx  # what every call runs at
    assert call.body["options"] == {**sent["options"], "num_ctx": context}


@pytest.mark.parametrize(
    ("event_name", "status", "code"),
    [
        ("llm_invalid_json.json", 400, "invalid_request"),
        ("llm_missing_prompt.json", 400, "invalid_request"),
        ("llm_bad_option.json", 400, "invalid_request"),
        ("llm_unknown_model.json", 404, "model_not_configured"),
    ],
)
def test_bad_requests_get_a_json_error_and_never_a_500(
    event_name: str, status: int, code: str
) -> None:
    got, body, _ = invoke("llm", event_name)
    assert (got, body["code"]) == (status, code)
    assert isinstance(body["error"], str) and "detail" not in body


@pytest.mark.parametrize(
    "body",
    [
        "[]",
        '"hi"',
        "null",
        '{"prompt": null}',
        '{"prompt": 42}',
        '{"prompt": ""}',
        '{"prompt": "x", "options": []}',
        '{"prompt": "x", "format": "yaml"}',
        '{"prompt": "x", "options": {"num_ctx": true}}',
        "\udcff",
    ],
)
def test_malformed_bodies_are_invalid_requests(body: str) -> None:
    status, got, _ = invoke("llm", "llm_generate.json", body=body)
    assert (status, got["code"]) == (400, "invalid_request")


def test_a_prompt_over_the_limit_is_413(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMES_MAX_PROMPT_CHARS", "10")
    status, body, _ = invoke("llm", "llm_generate.json", body=json.dumps({"prompt": "x" * 11}))
    assert (status, body["code"]) == (413, "prompt_too_large")


def test_a_full_model_answers_429_with_retry_after() -> None:
    service = get_service()
    hold(service, "llama3")
    status, body, headers = invoke("llm", "llm_generate.json", path="/v1/llm/llama3")
    assert (status, body["code"]) == (429, "model_busy")
    assert int(headers["retry-after"]) >= 1


def test_a_model_ollama_lacks_is_404_with_a_pull_hint(emulator: OllamaEmulator) -> None:
    emulator.set_behaviour(model="gemma3:1b", mode="not_found")
    status, body, _ = invoke("llm", "llm_generate.json")
    assert (status, body["code"]) == (404, "model_not_found")
    assert "ollama pull gemma3:1b" in body["error"]
    assert in_flight("gemma") == 0


def test_an_ollama_error_is_502_and_frees_the_slot(emulator: OllamaEmulator) -> None:
    emulator.set_behaviour(model="gemma3:1b", mode="error", status=500)
    status, body, _ = invoke("llm", "llm_generate.json")
    assert (status, body["code"]) == (502, "upstream_error")
    assert in_flight("gemma") == 0


def test_the_lambda_deadline_bounds_the_model_timeout(emulator: OllamaEmulator) -> None:
    emulator.set_behaviour(model="gemma3:1b", mode="hang")
    status, body, _ = invoke("llm", "llm_generate.json", context=LambdaContext(remaining_ms=1_500))
    assert (status, body["code"]) == (504, "upstream_timeout")
    assert in_flight("gemma") == 0


def test_unknown_route_and_method_are_json() -> None:
    status, body, _ = invoke("llm", "llm_generate.json", path="/v1/nothing")
    assert (status, body["code"]) == (404, "not_found")
    status, body, _ = invoke("llm", "llm_generate.json", method="GET")
    assert (status, body["code"]) == (405, "method_not_allowed")


def test_a_trailing_slash_is_a_json_404_not_an_empty_redirect() -> None:
    status, body, _ = invoke("llm", "llm_generate.json", path="/v1/llm/gemma/")
    assert (status, body["code"]) == (404, "not_found")


def test_an_event_that_is_not_http_gets_a_json_error_not_an_exception() -> None:
    assert (
        load_function("llm").handler({"hello": "world"}, LambdaContext())["code"]
        == "invalid_request"
    )


def test_status_reports_models_usage_and_health() -> None:
    status, body, _ = invoke("status", "status.json")
    assert status == 200 and body["status"] == "healthy"
    assert {c: body["checks"][c]["status"] for c in ("ollama", "dynamodb")} == {
        "ollama": "ok",
        "dynamodb": "ok",
    }
    gemma = next(m for m in body["models"] if m["name"] == "gemma")
    assert gemma == {
        "name": "gemma",
        "backend_model": "gemma3:1b",
        "max_concurrency": 2,
        "in_flight": 0,
        "memory_cost": "medium",
        "timeout_ms": 30000,
        "host": "default",
        "hosts": ["default"],
        "max_concurrency_total": None,
        "queue_timeout_ms": 0,
        "waiting": 0,
        "max_waiting": 0,
        "state": "ok",
        "failing_hosts": [],
    }
    assert body["failing"] == {"hosts": [], "models": []}
    assert body["hosts"] == [
        {
            "name": "default",
            "kind": "ollama",
            "url": body["hosts"][0]["url"],
            "status": "ok",
            "available": True,
            "error": None,
            "memory_budget": 8,
            "memory_in_use": 0,
            "in_flight": {"gemma": 0, "llama3": 0, "mistral": 0},
            "max_loaded_models": None,
            "circuit": "closed",
            "circuit_open_until_ms": None,
            "resident_models": [],
            "loading": None,
        }
    ]
    assert body["version"] and body["uptime_seconds"] >= 0 and body["process"]["rss_mb"] > 0
    assert isinstance(body["ollama"]["loaded_models"], list)


def test_status_is_503_naming_ollama_when_it_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ollama is the one host of every model: nothing can be served.
    monkeypatch.setenv("OLLAMA_URL", "http://127.0.0.1:9")
    status, body, _ = invoke("status", "status.json")
    assert (status, body["status"], body["checks"]["ollama"]["status"]) == (
        503,
        "unhealthy",
        "error",
    )
    assert [h["name"] for h in body["failing"]["hosts"]] == ["default"]


def test_when_the_memory_budget_binds_the_answer_is_host_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_shipped_models(tmp_path, monkeypatch, budget=4)
    service = get_service()
    hold(service, "llama3")  # weight 4
    status, body, headers = invoke("llm", "llm_generate.json")  # gemma has free slots
    assert (status, body["code"]) == (429, "host_busy")
    assert headers["retry-after"]
    _, status_body, _ = invoke("status", "status.json")
    assert status_body["hosts"][0]["memory_in_use"] == 4


def test_a_waiting_request_is_admitted_when_a_slot_frees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulator: OllamaEmulator
) -> None:
    use_shipped_models(tmp_path, monkeypatch, budget=8, llama3={"queue_timeout_ms": 30_000})
    service = get_service()
    held = [hold(service, "llama3")]
    waiting_then: list[int] = []
    # The slot frees while the request waits: released (as its holder on another instance
    # would) just before the waiter's first poll of its ticket, from the waiter's own
    # thread, so no second thread writes to moto. A ticket means the request is queued.
    poll = service.limiter.poll

    def poll_after_the_release(ticket: Ticket) -> Lease | None:
        if held:
            usage = service.limiter.usage([host_pool("default")], waiting=True)
            waiting_then.append(usage[host_pool("default")].get(LLAMA3_WAITING, 0))
            service.limiter.release(held.pop())
        return poll(ticket)

    monkeypatch.setattr(service.limiter, "poll", poll_after_the_release)
    status, body, _ = invoke("llm", "llm_generate.json", path="/v1/llm/llama3")
    # It was waiting in the queue when the slot freed, and then it was served: the queue
    # timeout (30 s) would have answered 429.
    assert waiting_then == [1]
    assert status == 200, body
    assert [call.body["model"] for call in emulator.received()] == ["llama3:8b"]
    assert in_flight("llama3") == 0


def test_waiting_ends_with_429_at_the_queue_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_shipped_models(tmp_path, monkeypatch, budget=8, llama3={"queue_timeout_ms": 1_000})
    service = get_service()
    hold(service, "llama3")
    # The deadline (Lambda time left less LAMBDA_SAFETY_S) is 10 s: the only other bound
    # that would end the wait, with the same 429.
    context = LambdaContext(remaining_ms=int((LAMBDA_SAFETY_S + 10) * 1000))
    started = time.monotonic()
    status, body, _ = invoke("llm", "llm_generate.json", path="/v1/llm/llama3", context=context)
    waited = time.monotonic() - started
    assert (status, body["code"]) == (429, "model_busy")
    # Never before the queue timeout; long before the deadline (however loaded the machine,
    # answering 9 s late is not load but the deadline): the queue timeout ended it.
    assert 1.0 <= waited < 10, waited
    usage = service.limiter.usage([host_pool("default")], waiting=True)
    assert usage[host_pool("default")].get(LLAMA3_WAITING, 0) == 0  # its place given up


def test_waiting_never_outlasts_the_lambda_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_shipped_models(tmp_path, monkeypatch, budget=8, llama3={"queue_timeout_ms": 20_000})
    service = get_service()
    hold(service, "llama3")
    # 1 s left to wait once LAMBDA_SAFETY_S is kept back for the answer and the releases.
    remaining_s = LAMBDA_SAFETY_S + 1
    started = time.monotonic()
    status, body, _ = invoke(
        "llm",
        "llm_generate.json",
        path="/v1/llm/llama3",
        context=LambdaContext(remaining_ms=int(remaining_s * 1000)),
    )
    waited = time.monotonic() - started
    assert (status, body["code"]) == (429, "model_busy")
    # It waited until the deadline (1 s), not the queue timeout (20 s), and answered before
    # the Lambda would have been ended (remaining_s): the contract's own bound.
    assert 1.0 <= waited < remaining_s, waited
