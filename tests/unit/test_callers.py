"""Callers (issue 20) on moto and the Ollama emulator: who a request's caller is on every
entry point, and that caller's limits as the handlers answer them. (Across instances and
dialects: tests/integration/test_callers.py.)"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import boto3
import pytest

from hermes.callers import (
    ANONYMOUS,
    DEFAULT_MAX_OUTPUT_TOKENS,
    acting_as,
    api_keys,
    caller_from_event,
    prompt_tokens_bound,
    with_output_cap,
)
from hermes.config import ConfigError, load_config
from hermes.limiter import Counter
from hermes.service import get_service
from tests.integration.conftest import TEST_MODELS
from tests.support.lambda_calls import (
    ALICE,
    LambdaContext,
    event,
    hold_caller_slot,
    iam_event,
    load_function,
    logged,
)
from tests.support.models_file import use_models
from tests.support.ollama_emulator import OllamaEmulator

MODELS = {
    "models": {"gemma": TEST_MODELS["models"]["gemma"]},
    "callers": {
        ALICE: {"max_concurrency": 1, "max_priority": "low"},
        "metered": {"tokens_per_minute": 200, "requests_per_minute": 3},
        "bulk": {"tokens_per_day": 1_000_000},
        "*": {},
    },
}


@pytest.fixture(autouse=True)
def env(
    aws: None, emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    emulator.reset()
    use_models(monkeypatch, tmp_path, MODELS)
    monkeypatch.setenv("OLLAMA_URL", emulator.url)


def call(data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = load_function("llm").handler(data, LambdaContext())
    return response["statusCode"], json.loads(response["body"])


# -- who is asking ------------------------------------------------------------------------


def test_the_caller_is_the_iam_principal_or_the_jwt_claim_or_anonymous() -> None:
    assert caller_from_event(iam_event()) == ALICE
    jwt = {"requestContext": {"authorizer": {"jwt": {"claims": {"sub": "u-1", "email": "a@b"}}}}}
    assert caller_from_event(jwt) == "u-1"
    assert caller_from_event(jwt, claim="email") == "a@b"
    assert caller_from_event(event("llm_generate.json")) == ANONYMOUS
    odd = caller_from_event({"requestContext": {"authorizer": {"jwt": {"claims": {"sub": "a b"}}}}})
    assert odd.startswith("id-") and odd != caller_from_event(
        {"requestContext": {"authorizer": {"jwt": {"claims": {"sub": "a  b"}}}}}
    )  # kept by its digest: two ids stay two callers


def test_the_runners_keys_name_their_callers() -> None:
    assert api_keys("alice:k1, bob:k2", "k0") == {"k1": "alice", "k2": "bob", "k0": "default"}
    assert api_keys(None, None) == {}
    with pytest.raises(ValueError, match="HERMES_API_KEYS must be comma-separated caller:key"):
        api_keys("alice", None)
    with pytest.raises(ValueError, match="one key to two callers"):
        api_keys("a:k,b:k", None)


def test_a_callers_section_names_configured_models_only(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text(
        json.dumps({**MODELS, "callers": {"a": {"models": {"nope": {"max_concurrency": 1}}}}})
    )
    with pytest.raises(ConfigError, match=r"field 'callers.a.models.nope': no model 'nope'"):
        load_config(path)
    path.write_text(json.dumps({**MODELS, "callers": {"a b": {}}}))
    with pytest.raises(ConfigError, match=r"field 'callers.a b': caller ids are"):
        load_config(path)


def test_every_request_logs_its_caller(log_lines: io.StringIO) -> None:
    assert call(iam_event())[0] == 200
    finished = logged(log_lines, "request finished")
    assert finished and finished[-1]["caller"] == ALICE


# -- its limits ---------------------------------------------------------------------------


def test_a_caller_at_its_cap_gets_caller_busy_and_others_are_served() -> None:
    hold_caller_slot(ALICE)
    status, body = call(iam_event())
    assert (status, body["code"]) == (429, "caller_busy"), body
    assert ALICE in body["error"] and "max_concurrency" in body["error"]
    assert call(iam_event("arn:aws:iam::123456789012:user/bob"))[0] == 200


def test_a_direct_invoke_is_limited_as_its_caller() -> None:
    direct = load_function("llm").handler
    hold_caller_slot(ALICE)
    answer = direct({"model": "gemma", "prompt": "hi", "caller": ALICE}, LambdaContext())
    assert (answer["status"], answer["code"]) == (429, "caller_busy"), answer
    assert "result" in direct({"model": "gemma", "prompt": "hi"}, LambdaContext())  # anonymous
    bad = direct({"model": "gemma", "prompt": "hi", "caller": "a b"}, LambdaContext())
    assert (bad["status"], bad["code"]) == (400, "invalid_request") and "caller" in bad["error"]


def test_tokens_and_requests_are_reserved_then_settled_to_what_was_used() -> None:
    direct = load_function("llm").handler

    def ask(**options: Any) -> dict[str, Any]:
        body = {"model": "gemma", "prompt": "hi", "caller": "metered", "options": options}
        answer: dict[str, Any] = direct(body, LambdaContext())
        return answer

    # A request that could never fit the minute's 200 tokens: 400 at once, nothing counted.
    too_big = ask(num_predict=500)
    assert (too_big["status"], too_big["code"]) == (400, "invalid_request")
    assert "tokens_per_minute 200" in too_big["error"]
    # Two requests of num_predict 50 fit together (the emulator answers 5 tokens each); the
    # window then holds what the backend reported, not the reservations.
    first, second = ask(num_predict=50), ask(num_predict=50)
    used = sum(
        a["usage"]["prompt_tokens"] + a["usage"]["completion_tokens"] for a in (first, second)
    )
    minute_items = boto3.client("dynamodb").query(
        TableName="LeaseTable",
        KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": "caller#metered#budget"}},
    )["Items"]
    counts = {item["sk"]["S"].split("#")[0]: int(item["n"]["N"]) for item in minute_items}
    assert counts == {"tpm": used, "rpm": 2}
    # The third request of the minute is its last; the fourth is refused with when to retry.
    assert "result" in ask(num_predict=10)
    refused = ask(num_predict=10)
    assert (refused["status"], refused["code"]) == (429, "quota_exceeded"), refused
    assert "requests_per_minute 3" in refused["error"] and "'metered'" in refused["error"]


def test_a_request_without_an_output_cap_gets_one_and_a_caller_waits_at_its_priority() -> None:
    service = get_service()
    config = service.model("gemma")
    with acting_as("bulk"):
        body, priority, reservation = asyncio.run(
            service._reserve(config, {"prompt": "hi"}, "high")
        )
    assert body["options"]["num_predict"] == DEFAULT_MAX_OUTPUT_TOKENS > 0
    assert reservation is not None
    assert reservation.tokens == prompt_tokens_bound(body) + DEFAULT_MAX_OUTPUT_TOKENS
    assert priority == "high"  # bulk may wait at high
    with acting_as(ALICE):
        _, priority, reservation = asyncio.run(service._reserve(config, {"prompt": "hi"}, "high"))
    assert (priority, reservation) == ("low", None)  # ALICE: max_priority low, no budgets


def test_the_output_cap_is_the_requests_own_when_it_gives_one() -> None:
    body = {"prompt": "hi", "options": {"num_predict": 7, "temperature": 0}}
    assert with_output_cap(body, 100) == (body, 7)
    capped, cap = with_output_cap({"prompt": "hi", "options": {"num_predict": -1}}, 100)
    assert cap == 100 and capped["options"]["num_predict"] == 100  # -1 is no bound
    assert prompt_tokens_bound({"prompt": "héllo"}) >= len("héllo".encode())


# -- fair share -------------------------------------------------------------------------------


def queue_callers(limiter: Any, pool: str, tickets: dict[str, str]) -> list[str]:
    """The callers of the queue's entries, head first."""
    items = boto3.client("dynamodb").query(
        TableName="LeaseTable",
        KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": f"{pool}#queue"}},
    )["Items"]
    return [tickets[item["t"]["S"]] for item in items]  # sorted by sk: the queue's order


def test_a_callers_backlog_is_spread_out_and_weights_and_priority_order_the_rest() -> None:
    from hermes.errors import ModelBusy
    from hermes.limiter import Limiter

    limiter = Limiter(boto3.client("dynamodb"), "LeaseTable")
    slot = [Counter("inflight_m", 1, 1, ModelBusy, "model 'm'")]
    held = limiter.acquire("p", slot, 60_000)
    tickets: dict[str, str] = {}

    def wait(caller: str, weight: int = 1, priority: str = "normal") -> None:
        ticket = limiter.enqueue(
            "p", slot, 30_000, wait_until_ms=2**42, priority=priority, fair=(caller, weight)
        )
        tickets[ticket.ticket_id] = caller  # type: ignore[union-attr]

    for _ in range(4):
        wait("flood")
    wait("one")  # arrives last, starts with the flood's first
    wait("three", weight=3)
    wait("three", weight=3)
    wait("low", priority="low")
    assert queue_callers(limiter, "p", tickets) == [
        "flood", "one", "three", "three", "flood", "flood", "flood", "low",
    ]  # fmt: skip
    limiter.release(held)
