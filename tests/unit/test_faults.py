"""Injected faults: DynamoDB throttling is retried with backoff (botocore's standard mode,
then the limiter's own until the request's patience runs out: 429, never 503), persistent
failure fails closed (503); Ollama's own 503 "server busy" asks to retry later."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from hermes.aws import client
from hermes.errors import ModelBusy
from hermes.limiter.records import buckets_of, counters_of
from hermes.service import get_service, host_pool
from tests.support.lambda_calls import LambdaContext, event, load_function
from tests.support.ollama_emulator import OllamaEmulator


class Throttle:
    """Answers the first `times` matching DynamoDB calls with ThrottlingException, before
    they leave the client, so botocore's real retry logic handles them."""

    def __init__(self, times: int, code: str = "ThrottlingException", status: int = 400) -> None:
        self.times, self.code, self.status, self.seen = times, code, status, 0

    def __call__(self, request: Any, **_: Any) -> AWSResponse | None:
        self.seen += 1
        if self.seen > self.times:
            return None
        body = json.dumps(
            {"__type": f"com.amazonaws.dynamodb.v20120810#{self.code}", "message": "injected"}
        )
        return AWSResponse(
            request.url, self.status, {"Content-Type": "application/x-amz-json-1.0"}, _Raw(body)
        )


class _Raw:
    def __init__(self, body: str) -> None:
        self.body = body.encode()

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


@pytest.fixture(autouse=True)
def env(aws: None, emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    emulator.reset()
    monkeypatch.setenv("OLLAMA_URL", emulator.url)
    client.cache_clear()
    yield
    client.cache_clear()


def inject(fault: Throttle) -> None:
    # Admission and release are both one UpdateItem of the state item.
    get_service().limiter._ddb.meta.events.register_first("before-send.dynamodb.UpdateItem", fault)


def test_transient_throttling_is_retried_and_the_request_succeeds() -> None:
    fault = Throttle(times=2)
    inject(fault)
    response = load_function("llm").handler(event("llm_generate.json"), LambdaContext())
    assert response["statusCode"] == 200
    assert fault.seen >= 4  # 2 throttled + the admitting write + the release
    # Whether a throttled attempt had been applied or not, nothing is counted twice: the
    # raw counters (not only the live leases) are back to zero.
    item = client("dynamodb").get_item(
        TableName="LeaseTable", Key={"pk": {"S": host_pool("default")}, "sk": {"S": "state"}}
    )
    state = item["Item"]
    assert counters_of(state) == {"inflight_gemma": 0, "memory": 0}
    assert all(bucket.empty for bucket in buckets_of(state).values())


class RefuseEveryCall:
    """Answers every matching call with ThrottlingException before it is made: nothing is
    applied, as with DynamoDB's throttling. (Throttle's before-send answer lets moto apply
    the write all the same: botocore runs every before-send handler.) botocore does not
    retry these, so the limiter's own retries are what is seen."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, **_: Any) -> tuple[Any, dict[str, Any]]:
        self.seen += 1
        http = type("Http", (), {"status_code": 400, "headers": {}})()
        error = {"Code": "ThrottlingException", "Message": "injected"}
        return http, {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 400}}


def test_persistent_throttling_answers_busy_not_unavailable() -> None:
    """Given DynamoDB throttling every write, when a request comes, then it is retried for
    the limiter's patience and answered 429 with Retry-After: contention is not an outage
    (no 503, no LimiterErrors alarm)."""
    fault = RefuseEveryCall()
    get_service().limiter._ddb.meta.events.register_first("before-call.dynamodb.UpdateItem", fault)
    response = load_function("llm").handler(event("llm_generate.json"), LambdaContext())
    body = json.loads(response["body"])
    assert (response["statusCode"], body["code"]) == (429, "model_busy")
    assert "contended" in body["error"] and response["headers"]["retry-after"]
    assert fault.seen > 3  # the limiter backed off and asked again, for its patience


def test_persistent_dynamodb_errors_fail_closed_with_503() -> None:
    inject(Throttle(times=100, code="InternalServerError", status=500))
    response = load_function("llm").handler(event("llm_generate.json"), LambdaContext())
    body = json.loads(response["body"])
    assert (response["statusCode"], body["code"]) == (503, "limiter_unavailable")
    assert response["headers"]["retry-after"]


def test_a_dynamodb_internal_error_is_retried_too() -> None:
    fault = Throttle(times=1, code="InternalServerError", status=500)
    inject(fault)
    assert (
        load_function("llm").handler(event("llm_generate.json"), LambdaContext())["statusCode"]
        == 200
    )


def test_a_release_that_keeps_failing_leaves_the_lease_to_expire() -> None:
    service = get_service()
    config = service.model("gemma")
    lease = service.limiter.acquire(host_pool("default"), service.counters("gemma", config), 60_000)
    service.limiter._ddb.meta.events.register_first(
        "before-call.dynamodb.UpdateItem", RefuseEveryCall()
    )
    soon_ms = int(time.time() * 1000) + 500
    # Retried until its deadline, then logged; the answer does not depend on it.
    assert service.limiter.release(lease, until_ms=soon_ms) is False
    assert time.time() * 1000 < soon_ms + 400  # it stopped at its deadline
    with pytest.raises(ModelBusy):
        service.limiter.acquire(
            host_pool("default"), service.counters("gemma", config), 60_000, until_ms=soon_ms
        )


def test_ollama_server_busy_asks_to_retry_later(emulator: OllamaEmulator) -> None:
    emulator.set_behaviour(model="gemma3:1b", mode="busy")
    response = load_function("llm").handler(event("llm_generate.json"), LambdaContext())
    body = json.loads(response["body"])
    assert (response["statusCode"], body["code"]) == (503, "upstream_unavailable")
    assert "overloaded" in body["error"] and response["headers"]["retry-after"] == "1"
