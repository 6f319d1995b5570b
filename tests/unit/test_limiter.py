"""Limiter semantics on moto (single-threaded here, so moto's lack of locking is harmless;
the concurrent races run against DynamoDB Local in tests/integration)."""

from __future__ import annotations

import boto3
import pytest
from botocore.config import Config

from hermes.errors import HostBusy, LimiterUnavailable, ModelBusy
from hermes.limiter import Claim, Limiter


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


def gemma(capacity: int = 2) -> list[Claim]:
    return [Claim("model#gemma", capacity, 1, ModelBusy)]


def test_admits_up_to_capacity_then_answers_busy_with_retry_after(limiter: Limiter) -> None:
    limiter.acquire(gemma(), 10_000)
    limiter.acquire(gemma(), 10_000)
    with pytest.raises(ModelBusy) as busy:
        limiter.acquire(gemma(), 10_000, retry_after_s=2)
    assert busy.value.retry_after == 2
    assert limiter.usage(["model#gemma"]) == {"model#gemma": 2}


def test_release_frees_the_slot(limiter: Limiter) -> None:
    first = limiter.acquire(gemma(1), 10_000)
    assert limiter.release(first) is True
    limiter.acquire(gemma(1), 10_000)


def test_release_frees_only_the_callers_own_lease(limiter: Limiter) -> None:
    mine = limiter.acquire(gemma(1), 10_000)
    assert limiter.release(mine) is True
    theirs = limiter.acquire(gemma(1), 10_000)
    # Releasing mine again (a retry, a duplicate) must not free theirs.
    assert limiter.release(mine) is False
    assert limiter.usage(["model#gemma"]) == {"model#gemma": 1}
    with pytest.raises(ModelBusy):
        limiter.acquire(gemma(1), 10_000)
    assert limiter.release(theirs) is True


def test_expired_lease_of_a_crashed_holder_is_taken_over_but_not_before(
    limiter: Limiter, clock: Clock
) -> None:
    crashed = limiter.acquire(gemma(1), 5_000)  # never released: no finally after a crash
    clock.now += 4.9
    with pytest.raises(ModelBusy):
        limiter.acquire(gemma(1), 5_000)
    clock.now += 0.2
    successor = limiter.acquire(gemma(1), 5_000)
    assert limiter.usage(["model#gemma"]) == {"model#gemma": 1}
    # The late release of the crashed holder frees nothing that is not its own.
    assert limiter.release(crashed) is False
    assert limiter.usage(["model#gemma"]) == {"model#gemma": 1}
    assert limiter.release(successor) is True
    assert limiter.usage(["model#gemma"]) == {"model#gemma": 0}


def test_usage_ignores_expired_leases(limiter: Limiter, clock: Clock) -> None:
    limiter.acquire(gemma(), 1_000)
    limiter.acquire(gemma(), 60_000)
    clock.now += 2
    assert limiter.usage(["model#gemma", "model#other"]) == {"model#gemma": 1, "model#other": 0}


def test_changed_max_concurrency_applies_without_migration(limiter: Limiter) -> None:
    held = [limiter.acquire(gemma(2), 10_000) for _ in range(2)]
    limiter.acquire(gemma(3), 10_000)  # raised to 3: one more fits at once
    with pytest.raises(ModelBusy):
        limiter.acquire(gemma(1), 10_000)  # lowered to 1: nothing fits until usage drops
    for lease in held:
        limiter.release(lease)
    with pytest.raises(ModelBusy):
        limiter.acquire(gemma(1), 10_000)  # still one in flight, limit 1


def test_uncontended_admission_costs_two_dynamodb_requests(limiter: Limiter) -> None:
    calls: list[str] = []
    limiter._ddb.meta.events.register(
        "before-call.dynamodb.*", lambda model, **_: calls.append(model.name)
    )
    lease = limiter.acquire(gemma(), 10_000)
    limiter.release(lease)
    assert calls == ["UpdateItem", "UpdateItem"]


def test_claims_on_two_pools_are_all_or_nothing(limiter: Limiter) -> None:
    def claims() -> list[Claim]:
        return [Claim("model#llama3", 2, 1, ModelBusy), Claim("host#gpu", 6, 4, HostBusy)]

    first = limiter.acquire(claims(), 10_000)
    with pytest.raises(HostBusy):
        limiter.acquire(claims(), 10_000)
    assert limiter.usage(["model#llama3", "host#gpu"]) == {"model#llama3": 1, "host#gpu": 4}
    assert limiter.release(first) is True
    assert limiter.usage(["model#llama3", "host#gpu"]) == {"model#llama3": 0, "host#gpu": 0}


def test_missing_table_fails_closed(aws: None) -> None:
    limiter = Limiter(boto3.client("dynamodb"), "NoSuchTable")
    with pytest.raises(LimiterUnavailable):
        limiter.acquire(gemma(), 10_000)


def test_unreachable_dynamodb_fails_closed() -> None:
    client = boto3.client(
        "dynamodb",
        endpoint_url="http://127.0.0.1:9",  # discard port: connection refused
        config=Config(connect_timeout=0.5, retries={"max_attempts": 1}),
    )
    with pytest.raises(LimiterUnavailable):
        Limiter(client, "LeaseTable").acquire(gemma(), 10_000)
