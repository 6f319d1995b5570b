"""A model's waiting is bounded (issue 19): every waiting request holds a Lambda instance, so
past `max_waiting` waiters per model and host the answer is 429 `queue_full` at once. The
per-model count lives in the pool's state item beside q_waiting, and every way out of the
queue (abandon, handoff, grant pass, lapsed entry dropped) takes the waiter off both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
import pytest

from hermes.config import load_config
from hermes.errors import ModelBusy, QueueFull
from hermes.limiter import Counter, Lease, Limiter, Ticket
from hermes.limiter.records import STATE_SK, WAITING, value, waiting_attr
from tests.support.clock import Clock
from tests.support.dynamodb_limits import ExpressionWatch
from tests.support.models_file import write_models

POOL = "host#gpu"
WAIT_MS = 60_000


@pytest.fixture
def clock() -> Clock:
    return Clock(now=1_000_000.0)


@pytest.fixture
def limiter(aws: None, clock: Clock, dynamodb_limits: ExpressionWatch) -> Limiter:
    return Limiter(dynamodb_limits.watch(boto3.client("dynamodb")), "LeaseTable", clock=clock)


def slot(model: str) -> list[Counter]:
    return [Counter(f"inflight_{model}", 1, 1, ModelBusy, f"model '{model}'")]


def wait(limiter: Limiter, clock: Clock, model: str, max_waiting: int) -> Lease | Ticket:
    until = int(clock.now * 1000) + WAIT_MS
    return limiter.enqueue(
        POOL, slot(model), 120_000, wait_until_ms=until, max_waiting=max_waiting, retry_after_s=3
    )


def waiting(limiter: Limiter) -> dict[str, int]:
    """q_waiting and each model's count, as the state item holds them."""
    state = limiter._table.get(POOL, STATE_SK, consistent=True) or {}
    counts = {m: value(state, waiting_attr(f"inflight_{m}")) for m in ("gemma", "llama3")}
    return {"total": value(state, WAITING)} | counts


def test_past_max_waiting_the_answer_is_queue_full_with_retry_after(
    limiter: Limiter, clock: Clock
) -> None:
    holder = wait(limiter, clock, "gemma", 2)
    assert isinstance(holder, Lease)
    first, second = (wait(limiter, clock, "gemma", 2) for _ in range(2))
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    with pytest.raises(QueueFull) as refused:
        wait(limiter, clock, "gemma", 2)
    assert refused.value.status == 429 and refused.value.code == "queue_full"
    assert refused.value.retry_after == 3
    assert "model 'gemma'" in refused.value.message and "max_waiting" in refused.value.message
    # Per model: another model of the same host still waits.
    assert isinstance(wait(limiter, clock, "llama3", 2), Lease)
    assert isinstance(wait(limiter, clock, "llama3", 2), Ticket)
    assert waiting(limiter) == {"total": 3, "gemma": 2, "llama3": 1}


def test_every_way_out_of_the_queue_gives_the_place_back(limiter: Limiter, clock: Clock) -> None:
    holder = wait(limiter, clock, "gemma", 2)
    assert isinstance(holder, Lease)
    first, second = (wait(limiter, clock, "gemma", 2) for _ in range(2))
    assert isinstance(first, Ticket) and isinstance(second, Ticket)

    assert limiter.abandon(second) is None  # gave up
    assert waiting(limiter) == {"total": 1, "gemma": 1, "llama3": 0}
    third = wait(limiter, clock, "gemma", 2)
    assert isinstance(third, Ticket)

    limiter.release(holder)  # handed over to the head
    granted = limiter.poll(first)
    assert isinstance(granted, Lease)
    assert waiting(limiter) == {"total": 1, "gemma": 1, "llama3": 0}

    # A waiter that vanished (its sandbox died): its entry lapses, and the release after it
    # drops it from the queue and from its model's count.
    clock.now += WAIT_MS / 1000 + 1
    limiter.release(granted)
    assert waiting(limiter) == {"total": 0, "gemma": 0, "llama3": 0}
    assert isinstance(wait(limiter, clock, "gemma", 2), Lease)


def test_max_waiting_zero_never_waits(limiter: Limiter, clock: Clock) -> None:
    assert isinstance(wait(limiter, clock, "gemma", 0), Lease)
    with pytest.raises(QueueFull):
        wait(limiter, clock, "gemma", 0)
    assert waiting(limiter)["total"] == 0


def gemma_file(tmp_path: Path, **gemma: Any) -> Path:
    entry = {"max_concurrency": 2, "memory_cost": "medium", "timeout": 10_000} | gemma
    return write_models(tmp_path, {"models": {"gemma": {"backend_model": "g"} | entry}})


@pytest.mark.parametrize(
    ("fields", "limit"),
    [
        ({}, 0),  # no waiting: the seed's 429 at once
        ({"queue_timeout_ms": 5_000}, 4),  # 2 x 2 slots x ceil(5 s / 10 s)
        ({"queue_timeout_ms": 25_000}, 12),  # 2 x 2 slots x ceil(25 s / 10 s)
        ({"queue_timeout_ms": 5_000, "max_waiting": 7}, 7),
    ],
)
def test_the_default_bound_follows_the_wait_and_the_slots(
    tmp_path: Path, fields: dict[str, Any], limit: int
) -> None:
    models = load_config(gemma_file(tmp_path, **fields)).models
    assert models["gemma"].waiting_limit == limit
