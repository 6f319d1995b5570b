"""Safety under a real race: many threads, one DynamoDB Local (atomic conditional writes)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from hermes.errors import HostBusy, ModelBusy
from hermes.limiter import Claim, Limiter
from tests.support.dynamodb_local import DynamoDBLocal


def race(
    limiter: Limiter, claims: list[Claim], capacity: int, threads: int = 16, rounds: int = 15
) -> tuple[int, int]:
    holders = 0
    peak = 0
    admitted = 0
    lock = threading.Lock()

    def worker(_: int) -> None:
        nonlocal holders, peak, admitted
        for _ in range(rounds):
            try:
                lease = limiter.acquire(claims, 10_000)
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


def test_sixteen_threads_never_exceed_two_slots(
    hermes_env: dict[str, str], dynamodb_local: DynamoDBLocal
) -> None:
    limiter = Limiter(dynamodb_local.client(), "LeaseTable")
    peak, admitted = race(limiter, [Claim("model#gemma", 2, 1, ModelBusy)], 2)
    assert 0 < peak <= 2 and admitted > 0
    assert limiter.usage(["model#gemma"]) == {"model#gemma": 0}


def test_transactional_claims_hold_under_the_same_race(
    hermes_env: dict[str, str], dynamodb_local: DynamoDBLocal
) -> None:
    limiter = Limiter(dynamodb_local.client(), "LeaseTable")
    claims = [Claim("model#mistral", 3, 1, ModelBusy), Claim("host#gpu", 4, 2, HostBusy)]
    peak, admitted = race(limiter, claims, 2)
    assert 0 < peak <= 2 and admitted > 0
    assert limiter.usage(["model#mistral", "host#gpu"]) == {"model#mistral": 0, "host#gpu": 0}
