"""Claims of docs/limits.md and docs/pools.md that no other test covered, each checked the
way a reader would: the poll intervals and check rates by position (an injected clock, so
no wall-time windows), a heavy model's release passing the rest of its capacity on, the
DynamoDB client's timeouts and attempts, and the lease capped by the Lambda's remaining time
(through the real handler). DynamoDB is moto, one request at a time."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from hermes.aws import client
from hermes.errors import HostBusy, ModelBusy
from hermes.limiter import Counter, Lease, Limiter, Ticket
from hermes.limiter import limiter as limiter_module
from hermes.placement import host_pool, model_counter
from hermes.service import get_service
from tests.support.clock import Clock
from tests.support.dynamodb_limits import ExpressionWatch
from tests.support.lambda_calls import LambdaContext, invoke
from tests.support.models_file import use_shipped_models
from tests.support.ollama_emulator import OllamaEmulator
from tests.support.polling import wait_until

POOL = "host#gpu"
TABLE = "LeaseTable"


@pytest.fixture
def clock() -> Clock:
    return Clock(now=1_000_000.0)


@pytest.fixture
def ddb(aws: None, dynamodb_limits: ExpressionWatch) -> Any:
    return dynamodb_limits.watch(boto3.client("dynamodb"))


@pytest.fixture
def limiter(ddb: Any, clock: Clock) -> Limiter:
    return Limiter(ddb, TABLE, clock=clock)


def slot(model: str, capacity: int = 1) -> Counter:
    return Counter(f"inflight_{model}", capacity, 1, ModelBusy, f"model '{model}'")


def memory(weight: int, budget: int = 4) -> Counter:
    return Counter("memory", budget, weight, HostBusy, "the memory budget of host 'gpu'")


def state_reads(ddb: Any, clock: Clock) -> list[float]:
    """The clock's time of every read of a pool's state item from now on."""
    seen: list[float] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        if params.get("Key", {}).get("sk", {}).get("S") == "state":
            seen.append(clock())

    ddb.meta.events.register("provide-client-params.dynamodb.GetItem", record)
    return seen


def waiting_for(limiter: Limiter, clock: Clock, seconds: float, ticket: Ticket) -> None:
    """`ticket` waits `seconds` of the clock the way the service's waiters do: poll, then
    pause for `next_poll_s` (the clock moves by it; nothing sleeps)."""
    end = clock() + seconds
    while clock() < end:
        assert limiter.poll(ticket) is None
        clock.advance(max(limiter.next_poll_s(ticket), 0.001))


# -- b. a heavy model's release passes the rest of its capacity on ------------------------


def test_a_heavy_release_to_a_lighter_head_passes_the_rest_on(
    limiter: Limiter, clock: Clock
) -> None:
    """docs/limits.md, "Waiting, first come first served": a holder that releases while
    somebody waits hands its capacity to the head of the queue ("any model ... when the head
    is a lighter model, a grant pass gives the rest to the next entries"). No slot waits for
    a lucky retry."""
    # Given a heavy model (the host's whole memory budget, 4) running, and three lighter
    # requests (2 each, two models) waiting behind it in this order
    heavy = limiter.acquire(POOL, [slot("llama3"), memory(4)], 30_000)
    until = clock.now_ms() + 30_000
    light = [[slot("gemma", 2), memory(2)], [slot("mistral", 2), memory(2)]]
    first, second, third = (
        limiter.enqueue(POOL, counters, 30_000, wait_until_ms=until)
        for counters in (light[0], light[1], light[0])
    )
    assert all(isinstance(t, Ticket) for t in (first, second, third))
    assert isinstance(first, Ticket) and isinstance(second, Ticket) and isinstance(third, Ticket)
    # When the heavy one releases, and nothing else happens (no check, no other release)
    assert limiter.release(heavy) is True
    # Then the head and the next entry both hold a lease: the 4 freed went to both of them,
    # and the third, for which nothing is left, still waits
    assert isinstance(limiter.take(first), Lease)
    assert isinstance(limiter.take(second), Lease)
    assert limiter.take(third) is None
    usage = limiter.usage([POOL])[POOL]
    assert usage == {"memory": 4, "inflight_gemma": 1, "inflight_mistral": 1}
    assert limiter.waiting(POOL) == 1


# -- c. poll intervals and check rates ---------------------------------------------------


def test_waiters_poll_their_notice_at_the_documented_pace_for_their_place(
    limiter: Limiter, clock: Clock
) -> None:
    """docs/limits.md, "Waiting, first come first served": waiters read their notices
    "every 70 ms for the next in line, 100 ms near the head, 250 ms behind it" (near the
    head: fewer than 8 live entries ahead; the first two in line both count as next)."""
    limiter.acquire(POOL, [slot("gemma")], 60_000)
    until = clock.now_ms() + 60_000
    tickets = [
        limiter.enqueue(POOL, [slot("gemma")], 60_000, wait_until_ms=until) for _ in range(10)
    ]
    assert all(isinstance(t, Ticket) for t in tickets)
    paces = []
    for ticket in tickets:
        assert isinstance(ticket, Ticket)
        assert limiter.poll(ticket) is None  # its first check counts the live entries ahead
        paces.append(limiter.next_poll_s(ticket))
    assert paces == [0.07] * 2 + [0.1] * 6 + [0.25] * 2


def test_a_waiter_reads_the_pools_state_about_once_a_second(
    limiter: Limiter, ddb: Any, clock: Clock
) -> None:
    """docs/limits.md, "Waiting, first come first served": "Every second a waiter near the
    head also reads the state" (deploy.md: "every second, the pool's state"). Its notice
    reads in between are the 70 ms polls."""
    limiter.acquire(POOL, [slot("gemma")], 60_000)
    ticket = limiter.enqueue(POOL, [slot("gemma")], 60_000, wait_until_ms=clock.now_ms() + 60_000)
    assert isinstance(ticket, Ticket)
    reads = state_reads(ddb, clock)
    waiting_for(limiter, clock, 30.0, ticket)
    gaps = [later - earlier for earlier, later in itertools.pairwise(reads)]
    assert len(reads) >= 25, reads
    # about a second apart: spread by +-20 % so that waiters do not read in step
    assert all(0.8 <= gap <= 1.2 + 0.07 for gap in gaps), gaps


def test_the_checks_of_a_pools_waiters_are_spread_to_1000_a_second(
    limiter: Limiter, ddb: Any, clock: Clock
) -> None:
    """docs/limits.md, "DynamoDB's limits" table, 3,000 RCU/s per partition key: "checks
    are spread to ≤ 1,000/s per host (0.5 RCU each)". With 5,000 waiting, each waiter
    checks about every 5 s: the pool's 5,000 waiters together about 1,000 times a second."""
    limiter.acquire(POOL, [slot("gemma")], 60_000)
    ticket = limiter.enqueue(POOL, [slot("gemma")], 60_000, wait_until_ms=clock.now_ms() + 60_000)
    assert isinstance(ticket, Ticket)
    # 4,999 more waiters, as their queue entries would count them in the state item
    ddb.update_item(
        TableName=TABLE,
        Key={"pk": {"S": POOL}, "sk": {"S": "state"}},
        UpdateExpression="ADD q_waiting :more",
        ExpressionAttributeValues={":more": {"N": "4999"}},
    )
    assert limiter.waiting(POOL) == 5000
    assert limiter.poll(ticket) is None  # a first check reads the state: 5,000 wait
    reads = state_reads(ddb, clock)
    waiting_for(limiter, clock, 55.0, ticket)
    gaps = [later - earlier for earlier, later in itertools.pairwise(reads)]
    assert len(reads) >= 8, reads
    # 5 s apart, spread by +-20 % (one waiter alone: 1 s, test above)
    assert all(0.8 * 5 <= gap <= 1.2 * 5 + 0.25 for gap in gaps), gaps


def test_a_refusal_because_others_wait_runs_a_pass_at_most_twice_a_second_per_host(
    limiter: Limiter, ddb: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/limits.md, "Liveness under contention": "a refusal because others wait
    (q_blocked) is checked by one grant pass of the refused instance (at most once per
    0.5 s per host and process)"."""
    # The limiter's monotonic clock, moved by hand (its lease clock is the test's already)
    now = [100.0]
    fake_time = SimpleNamespace(monotonic=lambda: now[0], time=time.time, sleep=time.sleep)
    monkeypatch.setattr(limiter_module, "time", fake_time)
    passes: list[str] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        if "begins_with" in params.get("KeyConditionExpression", ""):  # a pass reads the queue
            passes.append(params["ExpressionAttributeValues"][":pk"]["S"].removesuffix("#queue"))

    ddb.meta.events.register("provide-client-params.dynamodb.Query", record)
    # Given on two hosts a light model running and a heavy one waiting, short of memory: the
    # memory budget is gated for newcomers, though a light request would fit
    pools = [POOL, "host#gpu2"]
    for pool in pools:
        limiter.acquire(pool, [slot("gemma", 2), memory(2)], 60_000)
        waits = limiter.enqueue(
            pool, [slot("llama3"), memory(4)], 60_000, wait_until_ms=clock.now_ms() + 60_000
        )
        assert isinstance(waits, Ticket)
    passes.clear()

    def refuse(pool: str, times: int) -> None:
        for _ in range(times):
            with pytest.raises(HostBusy, match="has requests waiting"):
                limiter.acquire(pool, [slot("mistral", 2), memory(2)], 60_000)

    # When newcomers are refused over and over within half a second
    refuse(POOL, 10)
    now[0] += 0.4
    refuse(POOL, 10)
    # Then one pass checked the gate
    assert passes == [POOL]
    # and another host's gate has its own pass
    refuse("host#gpu2", 5)
    assert passes == [POOL, "host#gpu2"]
    # and after 0.5 s the next refusal checks it again
    now[0] += 0.1
    refuse(POOL, 10)
    assert passes == [POOL, "host#gpu2", POOL]


# -- d. botocore's timeouts and attempts ----------------------------------------------------


@pytest.fixture
def fresh_client() -> Iterator[None]:
    """hermes.aws's clients are cached per process: built afresh here, and again after."""
    client.cache_clear()
    yield
    client.cache_clear()


def test_the_dynamodb_client_has_the_documented_timeouts_and_retry_mode(
    fresh_client: None,
) -> None:
    """docs/limits.md, "Lost answers": "botocore tries each call 3 times in all (connect
    1 s, read 2 s: at most ~9 s; its `legacy` retry mode, whose DynamoDB policy waits 50
    then 100 ms)"."""
    config = client("dynamodb").meta.config
    assert (config.connect_timeout, config.read_timeout) == (1, 2)
    assert config.retries == {"mode": "legacy", "total_max_attempts": 3}
    worst_s = 3 * (config.connect_timeout + config.read_timeout) + 0.05 + 0.1
    assert worst_s <= 9.2


class _FailingDynamoDB(BaseHTTPRequestHandler):
    """Answers every request 500 InternalServerError (which botocore retries) and notes
    when each arrived."""

    arrivals: list[float]

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.arrivals.append(time.monotonic())
        body = json.dumps({"__type": "InternalServerError", "message": "emulated"}).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/x-amz-json-1.0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_failing_dynamodb_call_is_tried_3_times_with_legacy_backoff(
    fresh_client: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/limits.md, "Lost answers": "botocore tries each call 3 times in all ... its
    `legacy` retry mode, whose DynamoDB policy waits 50 then 100 ms"."""
    arrivals: list[float] = []
    handler = type("Handler", (_FailingDynamoDB,), {"arrivals": arrivals})
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            monkeypatch.setenv(
                "AWS_ENDPOINT_URL_DYNAMODB", f"http://127.0.0.1:{server.server_port}"
            )
            with pytest.raises(ClientError) as failed:
                client("dynamodb").get_item(
                    TableName=TABLE, Key={"pk": {"S": "a"}, "sk": {"S": "b"}}
                )
        finally:
            server.shutdown()
    assert failed.value.response["Error"]["Code"] == "InternalServerError"
    assert len(arrivals) == 3
    # (lower bounds only: a loaded machine may add to the pauses, never take away)
    assert arrivals[1] - arrivals[0] >= 0.05
    assert arrivals[2] - arrivals[1] >= 0.1


# -- e. the lease is capped by the Lambda's remaining time ------------------------------


def test_the_lease_is_capped_by_the_lambdas_remaining_time(
    aws: None, emulator: OllamaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/limits.md, "Crash recovery": a crashed holder's "lease stays until its expiry
    (the model timeout, capped by the Lambda's remaining time, plus `LeaseMarginMs` and a
    250 ms safety) and its bucket's end (at most one bucket later: 1 s ...)"."""
    emulator.reset()
    monkeypatch.setenv("OLLAMA_URL", emulator.url)
    monkeypatch.setenv("HERMES_LEASE_MARGIN_MS", "500")
    use_shipped_models(tmp_path, monkeypatch, 8)  # llama3: timeout 45 s
    remaining_s, margin_s = 12.0, 0.5
    # Given a call of llama3 held by its backend, in an invocation with 12 s left
    emulator.set_behaviour(model="llama3:8b", mode="hold")
    answers: list[tuple[int, dict[str, Any], dict[str, str]]] = []
    context = LambdaContext(remaining_ms=int(remaining_s * 1000))
    invoked_at = time.time()
    call = threading.Thread(
        target=lambda: answers.append(
            invoke("llm", "llm_generate.json", path="/v1/llm/llama3", context=context)
        )
    )
    call.start()
    try:
        wait_until(lambda: emulator.stats()["in_flight"].get("llama3:8b") == 1, 20, "llama3 called")
        admitted_by = time.time()

        # When its lease is read as other instances would at later times (no release: as
        # if this invocation had crashed)
        def held_at(at: float) -> int:
            later = Limiter(boto3.client("dynamodb"), TABLE, clock=Clock(now=at))
            usage = later.usage([host_pool("default")])[host_pool("default")]
            return usage.get(model_counter("llama3"), 0)

        # Then it ends by the invocation's end plus the margin, the safety and one bucket,
        # not after the model's 45 s timeout
        assert held_at(admitted_by + remaining_s + margin_s + 0.25 + 1.0) == 0
        # and it still covers the call, which runs until the invocation's end less 3.5 s
        assert held_at(invoked_at + remaining_s - 3.5) == 1
    finally:
        httpx.post(f"{emulator.url}/_emulator/release")
        call.join(30)
    assert answers and answers[0][0] == 200, answers
    assert get_service().limiter.usage([host_pool("default")])[host_pool("default")] == {}
