"""Schemathesis over the committed openapi.json against a running `make run` (issue 21,
item 3): every route, positive and negative cases, through real sockets, the runner's own
routing and body handling, DynamoDB Local and the Ollama emulator. No case answers a 5xx
(the emulator is healthy: a 503 would be Hermes' own failure), every error is JSON with a
sentence, and no slot is left taken."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from local.openapi import OPENAPI_FILE
from tests.support.hermes_process import HermesProcess

pytestmark = pytest.mark.integration

schema = schemathesis.openapi.from_path(str(OPENAPI_FILE))


@pytest.fixture(scope="module")
def runner(runner_env: dict[str, str]) -> Iterator[HermesProcess]:
    with HermesProcess(runner_env) as started:
        yield started


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_answers_a_server_error(runner: HermesProcess, case: Any) -> None:
    response = case.call(base_url=runner.url, timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text)
    if response.status_code >= 400:
        body = response.json()
        error = body["error"]
        assert isinstance(error, str) or isinstance(error.get("message"), str), body


HOSTILE = {
    "nested 20,000 deep": '{"prompt": ' + "[" * 20_000 + "]" * 20_000 + "}",
    "NaN": '{"prompt": "hi", "options": {"temperature": NaN}}',
    "Infinity": '{"prompt": "hi", "options": {"temperature": -Infinity}}',
    "out of range": '{"prompt": "hi", "options": {"temperature": 1e400}}',
    "not UTF-8": b'{"prompt": "\xff\xfe"}',
}
POSTS = ["/v1/llm/gemma", "/api/generate", "/api/chat", "/v1/chat/completions", "/v1/jobs/gemma"]


@pytest.mark.parametrize("path", POSTS)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_json_is_a_400_on_every_route(runner: HermesProcess, path: str, name: str) -> None:
    """The audit's bodies, sent raw over a socket: each a 400 invalid_request, never a 500
    (a RecursionError) or a reset connection (NaN reaching the backend call)."""
    import httpx

    body = HOSTILE[name]
    answer = httpx.post(f"{runner.url}{path}", content=body, timeout=30)
    assert answer.status_code == 400, answer.text
    assert "invalid_request" in answer.text, answer.text
