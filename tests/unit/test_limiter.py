"""Limiter semantics on moto (single-threaded here, so moto's lack of locking is harmless;
the concurrent races run against DynamoDB Local in tests/integration)."""

from __future__ import annotations

import boto3
import pytest
from botocore.config import Config

from hermes.errors import HostBusy, LimiterUnavailable, ModelBusy
from hermes.limiter import Counter, Limiter


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(aws: None, clock: Clock) -> Limiter:
    return Limiter(boto3.client("dynamodb"), "LeaseTable", clock=clock)


POOL = "host#gpu"


def gemma(capacity: int = 2) -> list[Counter]:
    return [Counter("inflight_gemma", capacity, 1, ModelBusy, "model 'gemma'")]


def in_use(limiter: Limiter, counter: str = "inflight_gemma") -> int:
    return limiter.usage([POOL])[POOL].get(counter, 0)


def test_admits_up_to_capacity_then_answers_busy_with_retry_after(limiter: Limiter) -> None:
    limiter.acquire(POOL, gemma(), 10_000)
    limiter.acquire(POOL, gemma(), 10_000)
    with pytest.raises(ModelBusy) as busy:
        limiter.acquire(POOL, gemma(), 10_000, retry_after_s=2)
    assert busy.value.retry_after == 2
    assert in_use(limiter) == 2


def test_release_frees_the_slot(limiter: Limiter) -> None:
    first = limiter.acquire(POOL, gemma(1), 10_000)
    assert limiter.release(first) is True
    limiter.acquire(POOL, gemma(1), 10_000)


def test_release_frees_only_the_callers_own_lease(limiter: Limiter) -> None:
    mine = limiter.acquire(POOL, gemma(1), 10_000)
    assert limiter.release(mine) is True
    theirs = limiter.acquire(POOL, gemma(1), 10_000)
    # Releasing mine again (a retry, a duplicate) must not free theirs.
    assert limiter.release(mine) is False
    assert in_use(limiter) == 1
    with pytest.raises(ModelBusy):
        limiter.acquire(POOL, gemma(1), 10_000)
    assert limiter.release(theirs) is True


def test_expired_lease_of_a_crashed_holder_is_taken_over_but_not_before(
    limiter: Limiter, clock: Clock
) -> None:
    crashed = limiter.acquire(POOL, gemma(1), 5_000)  # never released: no finally after a crash
    clock.now += 4.9
    with pytest.raises(ModelBusy):
        limiter.acquire(POOL, gemma(1), 5_000)
    clock.now += 0.2
    successor = limiter.acquire(POOL, gemma(1), 5_000)
    assert in_use(limiter) == 1
    # The late release of the crashed holder frees nothing that is not its own.
    assert limiter.release(crashed) is False
    assert in_use(limiter) == 1
    assert limiter.release(successor) is True
    assert in_use(limiter) == 0


def test_usage_ignores_expired_leases(limiter: Limiter, clock: Clock) -> None:
    limiter.acquire(POOL, gemma(), 1_000)
    limiter.acquire(POOL, gemma(), 60_000)
    clock.now += 2
    assert limiter.usage([POOL, "host#other"]) == {POOL: {"inflight_gemma": 1}, "host#other": {}}


def test_changed_max_concurrency_applies_without_migration(limiter: Limiter) -> None:
    held = [limiter.acquire(POOL, gemma(2), 10_000) for _ in range(2)]
    limiter.acquire(POOL, gemma(3), 10_000)  # raised to 3: one more fits at once
    with pytest.raises(ModelBusy):
        limiter.acquire(POOL, gemma(1), 10_000)  # lowered to 1: nothing fits until usage drops
    for lease in held:
        limiter.release(lease)
    with pytest.raises(ModelBusy):
        limiter.acquire(POOL, gemma(1), 10_000)  # still one in flight, limit 1


def test_uncontended_admission_costs_two_dynamodb_requests(limiter: Limiter) -> None:
    calls: list[str] = []
    limiter._ddb.meta.events.register(
        "before-call.dynamodb.*", lambda model, **_: calls.append(model.name)
    )
    lease = limiter.acquire(POOL, gemma(), 10_000)
    limiter.release(lease)
    assert calls == ["UpdateItem", "UpdateItem"]  # one write to admit, one to release


def test_model_slot_and_memory_budget_are_taken_together(limiter: Limiter) -> None:
    def llama3() -> list[Counter]:
        return [
            Counter("inflight_llama3", 2, 1, ModelBusy, "model 'llama3'"),
            Counter("memory", 6, 4, HostBusy, "memory budget"),
        ]

    first = limiter.acquire(POOL, llama3(), 10_000)
    with pytest.raises(HostBusy):  # a slot is free, the budget is not
        limiter.acquire(POOL, llama3(), 10_000)
    assert limiter.usage([POOL])[POOL] == {"inflight_llama3": 1, "memory": 4}
    # The failed admission charged nothing: a lighter model still fits the budget.
    light = limiter.acquire(POOL, [Counter("memory", 6, 2, HostBusy, "memory budget")], 10_000)
    assert limiter.release(first) is True and limiter.release(light) is True
    assert limiter.usage([POOL])[POOL] == {}


def test_the_full_counter_names_the_error(limiter: Limiter) -> None:
    counters = [
        Counter("inflight_gemma", 1, 1, ModelBusy, "model 'gemma'"),
        Counter("memory", 8, 2, HostBusy, "memory budget"),
    ]
    limiter.acquire(POOL, counters, 10_000)
    with pytest.raises(ModelBusy, match="model 'gemma' is at capacity"):
        limiter.acquire(POOL, counters, 10_000)


def test_missing_table_fails_closed(aws: None) -> None:
    limiter = Limiter(boto3.client("dynamodb"), "NoSuchTable")
    with pytest.raises(LimiterUnavailable):
        limiter.acquire(POOL, gemma(), 10_000)


def test_unreachable_dynamodb_fails_closed() -> None:
    client = boto3.client(
        "dynamodb",
        endpoint_url="http://127.0.0.1:9",  # discard port: connection refused
        config=Config(connect_timeout=0.5, retries={"max_attempts": 1}),
    )
    with pytest.raises(LimiterUnavailable):
        Limiter(client, "LeaseTable").acquire(POOL, gemma(), 10_000)
