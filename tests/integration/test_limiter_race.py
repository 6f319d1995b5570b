"""Safety under a real race: many threads, one DynamoDB Local (atomic conditional writes),
directly and behind the conflict-faithful store (overlapping transactions cancelled, as on
real DynamoDB). Direct admissions only here; waiting requests race in
test_fair_admission.py."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from hermes.errors import HostBusy, ModelBusy
from hermes.limiter import Counter, Limiter
from local.dynamodb_local import DynamoDBLocal
from tests.support.conflict_store import ConflictingDynamoDB
from tests.support.lease_state import held_lease_ids


@pytest.fixture(params=["conflicts", "dynamodb-local"])
def store_client(
    request: pytest.FixtureRequest,
    hermes_env: dict[str, str],
    dynamodb_local: DynamoDBLocal,
    conflicting_dynamodb: ConflictingDynamoDB,
) -> Any:
    if request.param == "dynamodb-local":
        return dynamodb_local.client()
    return conflicting_dynamodb.client()


def race(
    limiter: Limiter, counters: list[Counter], threads: int = 16, rounds: int = 15
) -> tuple[int, int]:
    holders = 0
    peak = 0
    admitted = 0
    lock = threading.Lock()

    def worker(_: int) -> None:
        nonlocal holders, peak, admitted
        for _ in range(rounds):
            try:
                lease = limiter.acquire("host#gpu", counters, 10_000)
            except (ModelBusy, HostBusy):
                continue
            with lock:
                holders += 1
                admitted += 1
                peak = max(peak, holders)
            time.sleep(0.003)  # hold the slot long enough for others to collide with it
            with lock:
                holders -= 1
            limiter.release(lease)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    return peak, admitted


def assert_nothing_left(dynamodb_local: DynamoDBLocal) -> None:
    """Every lease left the state item with its release, and every counter is back to zero."""
    client = dynamodb_local.client()
    assert held_lease_ids(client) == []
    state = client.get_item(
        TableName="LeaseTable",
        Key={"pk": {"S": "host#gpu"}, "sk": {"S": "state"}},
        ConsistentRead=True,
    )["Item"]
    assert {k: v for k, v in state.items() if "N" in v and v["N"] != "0"} == {}


def test_sixteen_threads_never_exceed_two_slots(
    store_client: Any, dynamodb_local: DynamoDBLocal
) -> None:
    limiter = Limiter(store_client, "LeaseTable")
    peak, admitted = race(limiter, [Counter("inflight_gemma", 2, 1, ModelBusy, "gemma")])
    assert 0 < peak <= 2 and admitted > 0
    assert limiter.usage(["host#gpu"]) == {"host#gpu": {}}
    assert_nothing_left(dynamodb_local)


def test_slot_and_budget_together_hold_under_the_same_race(
    store_client: Any, dynamodb_local: DynamoDBLocal
) -> None:
    limiter = Limiter(store_client, "LeaseTable")
    counters = [
        Counter("inflight_mistral", 3, 1, ModelBusy, "mistral"),
        Counter("memory", 4, 2, HostBusy, "budget"),  # the budget binds at 2
    ]
    peak, admitted = race(limiter, counters)
    assert 0 < peak <= 2 and admitted > 0
    assert limiter.usage(["host#gpu"]) == {"host#gpu": {}}
    assert_nothing_left(dynamodb_local)
