"""Usage per caller (issue 20, item 5) on moto and the Ollama emulator: each request ADDs to
its caller's row of the day before its handler returns, and GET /v1/usage shows a caller its
own rows, an admin everyone's. (Across runners, against what the emulator served:
tests/integration/test_callers.py.)"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from hermes.service import get_service
from tests.integration.conftest import TEST_MODELS
from tests.support.lambda_calls import (
    ALICE,
    LambdaContext,
    event,
    hold_caller_slot,
    iam_event,
    load_function,
)
from tests.support.models_file import use_models
from tests.support.ollama_emulator import OllamaEmulator

BOB = "arn:aws:iam::123456789012:user/bob"
AUDITOR = "arn:aws:iam::123456789012:user/auditor"
MODELS = {
    "models": {"gemma": TEST_MODELS["models"]["gemma"]},
    "callers": {ALICE: {"max_concurrency": 1}, AUDITOR: {"admin": True}, "*": {"admin": False}},
}


@pytest.fixture(autouse=True)
def env(
    aws: None, emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    emulator.reset()
    use_models(monkeypatch, tmp_path, MODELS)
    monkeypatch.setenv("OLLAMA_URL", emulator.url)


def generate(caller: str) -> int:
    response = load_function("llm").handler(iam_event(caller), LambdaContext())
    return int(response["statusCode"])


def usage(asking: str, /, **query: str) -> tuple[int, dict[str, Any]]:
    """GET /v1/usage as `asking` (its IAM principal), through the status function."""
    data = event("usage.json")
    data["requestContext"]["authorizer"]["iam"]["userArn"] = asking
    data["queryStringParameters"] = query or None
    data["rawQueryString"] = "&".join(f"{k}={v}" for k, v in query.items())
    response = load_function("status").handler(data, LambdaContext())
    return response["statusCode"], json.loads(response["body"])


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def test_a_row_counts_requests_reported_tokens_slot_time_and_refusals(
    emulator: OllamaEmulator,
) -> None:
    """Two answers and one 429 of Alice: her row of the day, written before each handler
    returned, holds 2 requests, the tokens the emulator reported serving, the slots' time
    and 1 refused."""
    emulator.set_behaviour(model="gemma3:1b", mode="ok", delay_ms=100)
    assert [generate(ALICE), generate(ALICE)] == [200, 200]
    hold_caller_slot(ALICE)
    assert generate(ALICE) == 429
    served = emulator.stats()["served"]
    status, body = usage(ALICE)
    assert status == 200, body
    [row] = body["usage"]
    slot_seconds = row.pop("slot_seconds")
    assert row == {
        "caller": ALICE,
        "model": "gemma",
        "day": today(),
        "requests": 2,
        "prompt_tokens": sum(prompt for *_, prompt, _ in served),
        "completion_tokens": sum(completion for *_, completion in served),
        "refused": 1,
    }
    assert len(served) == 2 and 0.2 <= slot_seconds < 5, slot_seconds  # 2 x 100 ms at least


def test_a_caller_sees_its_own_rows_and_an_admin_sees_everyones() -> None:
    assert [generate(ALICE), generate(BOB)] == [200, 200]
    assert [row["caller"] for row in usage(BOB)[1]["usage"]] == [BOB]
    status, body = usage(BOB, caller=ALICE)
    assert (status, body["code"]) == (403, "forbidden"), body
    assert "admin" in body["error"]
    assert [row["caller"] for row in usage(AUDITOR)[1]["usage"]] == [ALICE, BOB]
    assert [row["caller"] for row in usage(AUDITOR, caller=ALICE)[1]["usage"]] == [ALICE]
    assert usage(AUDITOR, model="llama3")[1]["usage"] == []
    yesterday = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86_400))
    assert usage(AUDITOR, to=yesterday)[1]["usage"] == []
    assert len(usage(AUDITOR, **{"from": today(), "to": today()})[1]["usage"]) == 2


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ({"from": "2026-13-01"}, "YYYY-MM-DD"),
        ({"to": "yesterday"}, "YYYY-MM-DD"),
        ({"from": "2026-12-02", "to": "2026-12-01"}, "is after"),
        ({"from": "2020-01-01", "to": "2026-01-01"}, "at most 366 days"),
        ({"caller": "a b"}, "caller must be"),
    ],
)
def test_a_bad_query_answers_400_naming_what_is_wrong(query: dict[str, str], says: str) -> None:
    status, body = usage(AUDITOR, **query)
    assert (status, body["code"]) == (400, "invalid_request"), body
    assert says in body["error"]


def test_a_usage_write_that_fails_costs_the_row_never_the_answer() -> None:
    usage_log = get_service().usage
    assert usage_log is not None
    usage_log.name = "NoSuchTable"
    try:
        assert generate(ALICE) == 200
    finally:
        usage_log.name = get_service().settings.usage_table
    assert usage(ALICE)[1]["usage"] == []
