"""Limiter semantics on moto (single-threaded here, so moto's lack of locking is harmless;
the concurrent races run against DynamoDB Local in tests/integration). Every request the
limiter sends here is checked against DynamoDB's documented limits (`dynamodb_limits`)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ReadTimeoutError

from hermes.config import MAX_LEASES_PER_HOST, ConfigError, load_config
from hermes.errors import HostBusy, LimiterUnavailable, ModelBusy, UpstreamTimeout
from hermes.limiter import REAP_BATCH, Counter, Lease, Limiter
from hermes.service import get_service, host_pool
from tests.support.dynamodb_limits import MAX_ITEM_BYTES, ExpressionWatch, item_size
from tests.support.ollama_emulator import OllamaEmulator


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(aws: None, clock: Clock, dynamodb_limits: ExpressionWatch) -> Limiter:
    return Limiter(dynamodb_limits.watch(boto3.client("dynamodb")), "LeaseTable", clock=clock)


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


def raw_item(limiter: Limiter, pool: str = POOL) -> dict[str, Any]:
    item: dict[str, Any] = limiter._ddb.get_item(
        TableName="LeaseTable", Key={"pk": {"S": pool}}, ConsistentRead=True
    ).get("Item", {})
    return item


def leases_in(item: dict[str, Any]) -> list[str]:
    return [name for name in item if name.startswith("l_")]


# -- A holder never runs past its lease (issue 10, item 2) ----------------------------------


def test_a_lease_carries_the_expiry_dynamodb_holds(limiter: Limiter, clock: Clock) -> None:
    lease = limiter.acquire(POOL, gemma(), 5_000)
    stored = int(raw_item(limiter)[f"l_{lease.lease_id}"]["M"]["exp"]["N"])
    assert lease.expires_at_ms == stored == int(clock.now * 1000) + 5_000
    clock.now += 1.5
    assert limiter.time_left(lease) == pytest.approx(3.5)


def test_a_slow_reaping_round_does_not_eat_into_the_new_lease(
    limiter: Limiter, clock: Clock
) -> None:
    limiter.acquire(POOL, gemma(1), 1_000)  # a crashed holder
    clock.now += 2

    def slow_write(**_: Any) -> None:
        clock.now += 3  # each write takes 3 s

    limiter._ddb.meta.events.register("before-call.dynamodb.UpdateItem", slow_write)
    asked_at = clock.now
    lease = limiter.acquire(POOL, gemma(1), 5_000)
    # Failed write (3 s), reap (3 s), then the admitting write, whose lease counts from
    # when it was sent: 5 s from there, not from when admission began.
    assert lease.expires_at_ms == int((asked_at + 6) * 1000) + 5_000


SOLO_MODELS = {
    "models": {
        "solo": {
            "max_concurrency": 1,
            "memory_cost": "low",
            "timeout": 1000,
            "backend_model": "llama3:8b",
        }
    }
}
MARGIN_S = 0.2
SAFETY_S = 0.25  # hermes.service.LEASE_SAFETY_MS


@pytest.fixture
def solo(
    aws: None,
    emulator: OllamaEmulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dynamodb_limits: ExpressionWatch,
) -> list[Lease]:
    """A service whose model `solo` allows 1 call of 1 s (lease margin 200 ms), whose backend
    hangs, and whose granted leases are recorded (returned list)."""
    from hermes.aws import client

    models = tmp_path / "models.json"
    models.write_text(json.dumps(SOLO_MODELS))
    monkeypatch.setenv("HERMES_MODELS_FILE", str(models))
    monkeypatch.setenv("OLLAMA_URL", emulator.url)
    monkeypatch.setenv("HERMES_LEASE_MARGIN_MS", str(int(MARGIN_S * 1000)))
    emulator.reset()
    emulator.set_behaviour(model="llama3:8b", mode="hang")
    client.cache_clear()
    limiter = get_service().limiter
    dynamodb_limits.watch(limiter._ddb)
    granted: list[Lease] = []
    acquire = limiter.acquire

    def recorded(*args: Any, **kwargs: Any) -> Lease:
        granted.append(acquire(*args, **kwargs))
        return granted[-1]

    monkeypatch.setattr(limiter, "acquire", recorded)
    yield granted
    client.cache_clear()


def answers_late(seconds: float, times: int = 1) -> None:
    """The next `times` writes land at once; their answers come `seconds` later."""
    left = [times]

    def late(**_: Any) -> None:
        if left[0] > 0:
            left[0] -= 1
            time.sleep(seconds)

    get_service().limiter._ddb.meta.events.register("after-call.dynamodb.UpdateItem", late)


def run_solo() -> Any:
    return asyncio.run(get_service().complete("solo", "/api/generate", {"prompt": "hi"}))


def test_a_late_admission_answer_shortens_the_call_to_what_its_lease_has_left(
    solo: list[Lease], emulator: OllamaEmulator
) -> None:
    # Lease = 1 s + margin + safety = 1.45 s from the write; its answer comes 0.6 s late.
    answers_late(0.6)
    with pytest.raises(UpstreamTimeout) as timeout:
        run_solo()
    ended = time.time()
    (lease,) = solo
    # The call ran what the lease had left less margin and safety (~0.4 s), not the model's
    # 1 s from the late answer (which would end 0.15 s AFTER the lease expired), and was over
    # at least the margin before the expiry: no other instance could take the slot meanwhile.
    assert lease.expires_at_ms / 1000 - ended > MARGIN_S
    assert 300 <= timeout.value.extra["timeout_ms"] <= 420
    assert "slow to grant" in timeout.value.message
    assert emulator.stats()["requests"]["llama3:8b"] == 1


def test_a_stream_admitted_late_ends_before_its_lease_too(
    solo: list[Lease], emulator: OllamaEmulator
) -> None:
    emulator.set_behaviour(model="llama3:8b", mode="ok", tokens=50, token_delay_ms=100)
    answers_late(0.6)

    async def stream() -> list[dict[str, Any]]:
        chunks = await get_service().open_stream("solo", "/api/generate", {"prompt": "hi"})
        return [chunk async for chunk in chunks]

    with pytest.raises(UpstreamTimeout, match="slow to grant"):
        asyncio.run(stream())  # 5 s of tokens; the lease left ~0.4 s of them
    (lease,) = solo
    assert lease.expires_at_ms / 1000 - time.time() > MARGIN_S


def test_a_lease_granted_too_late_to_use_is_given_back_with_503(
    solo: list[Lease], emulator: OllamaEmulator
) -> None:
    answers_late(1.1)  # past the lease less margin and safety: nothing left to run
    with pytest.raises(LimiterUnavailable, match="left no time to run it") as error:
        run_solo()
    assert error.value.retry_after == 1
    # Given back, not left to expire: no lease in the item, the counters back to zero.
    item = raw_item(get_service().limiter, host_pool("default"))
    assert leases_in(item) == [] and item["inflight_solo"] == {"N": "0"}
    assert emulator.stats()["requests"].get("llama3:8b", 0) == 0  # and the model never called


def test_a_prompt_admission_keeps_the_models_whole_timeout(
    solo: list[Lease], emulator: OllamaEmulator
) -> None:
    with pytest.raises(UpstreamTimeout) as timeout:
        run_solo()
    assert timeout.value.extra["timeout_ms"] == 1000
    assert timeout.value.message == "model 'solo' did not answer within 1 s; its slot was released"


# -- A lost admission answer frees its slot at once (item 3) --------------------------------


def lose_answers(limiter: Limiter, times: int) -> None:
    """The next `times` UpdateItem calls are applied, then fail as if the answer never came
    (what botocore raises once its retries are spent)."""
    left = [times]

    def lost(**_: Any) -> None:
        if left[0] > 0:
            left[0] -= 1
            raise ReadTimeoutError(endpoint_url="https://dynamodb.us-east-1.amazonaws.com/")

    limiter._ddb.meta.events.register("after-call.dynamodb.UpdateItem", lost)


def test_an_admission_whose_answer_was_lost_frees_its_slot_at_once(limiter: Limiter) -> None:
    lose_answers(limiter, 1)
    with pytest.raises(LimiterUnavailable):
        limiter.acquire(POOL, gemma(1), 60_000)
    # The write had landed; the lease is gone again, counters and all, long before it expires.
    assert leases_in(raw_item(limiter)) == []
    assert raw_item(limiter)["inflight_gemma"] == {"N": "0"}
    assert limiter.release(limiter.acquire(POOL, gemma(1), 60_000)) is True


def test_withdrawing_an_admission_that_never_landed_frees_nothing_else(limiter: Limiter) -> None:
    theirs = limiter.acquire(POOL, gemma(2), 60_000)

    def refused(**_: Any) -> None:
        raise ReadTimeoutError(endpoint_url="https://dynamodb.us-east-1.amazonaws.com/")

    limiter._ddb.meta.events.register_first("before-call.dynamodb.UpdateItem", refused)
    with pytest.raises(LimiterUnavailable):
        limiter.acquire(POOL, gemma(2), 60_000)
    limiter._ddb.meta.events.unregister("before-call.dynamodb.UpdateItem", refused)
    assert leases_in(raw_item(limiter)) == [f"l_{theirs.lease_id}"]
    assert in_use(limiter) == 1


# -- Reaping any number of expired leases (item 4) ------------------------------------------


def test_a_pool_full_of_300_expired_leases_admits_the_next_request(
    limiter: Limiter, clock: Clock
) -> None:
    for _ in range(300):
        limiter.acquire(POOL, gemma(300), 1_000)  # 300 crashed holders
    clock.now += 2
    calls: list[str] = []
    limiter._ddb.meta.events.register(
        "before-call.dynamodb.UpdateItem", lambda model, **_: calls.append(model.name)
    )
    lease = limiter.acquire(POOL, gemma(300), 1_000)
    # One failed write, 300 / REAP_BATCH reaping writes (each checked under 4 KB by the
    # dynamodb_limits hook), the admitting write.
    assert len(calls) == 1 + 300 // REAP_BATCH + 1
    assert leases_in(raw_item(limiter)) == [f"l_{lease.lease_id}"]
    assert raw_item(limiter)["inflight_gemma"] == {"N": "1"}


def test_reaping_stops_where_another_instance_reaped_first(limiter: Limiter, clock: Clock) -> None:
    for _ in range(120):
        limiter.acquire(POOL, gemma(120), 1_000)
    clock.now += 2
    other = Limiter(limiter._ddb, "LeaseTable", clock=clock)
    item = raw_item(limiter)
    assert other._reap_expired(POOL, item) is True  # the other instance reaps them all
    assert limiter._reap_expired(POOL, item) is True  # stale view: its first batch fails
    assert leases_in(raw_item(limiter)) == []
    assert raw_item(limiter)["inflight_gemma"] == {"N": "0"}  # nothing subtracted twice


def test_usage_reads_any_number_of_pools_100_keys_at_a_time(limiter: Limiter) -> None:
    pools = [f"host#h{i}" for i in range(250)]
    limiter.acquire(pools[-1], gemma(), 10_000)
    usage = limiter.usage(pools)
    assert len(usage) == 250 and usage[pools[-1]] == {"inflight_gemma": 1}


def write_models(tmp_path: Path, models: dict[str, Any], **extra: Any) -> Path:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": models, **extra}))
    return path


def model(max_concurrency: int, cost: str = "low", host: str = "default") -> dict[str, Any]:
    return {
        "max_concurrency": max_concurrency,
        "memory_cost": cost,
        "timeout": 1000,
        "backend_model": "m:1b",
        "host": host,
    }


def test_capacities_one_lease_item_cannot_hold_are_refused_at_load(tmp_path: Path) -> None:
    big = {"hosts": {"default": {"memory_budget": 100_000}}}
    path = write_models(tmp_path, {"a": model(600), "b": model(500)}, **big)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "field 'models.a.max_concurrency'" in message
    assert f"bound of {MAX_LEASES_PER_HOST} leases" in message and "1100 leases" in message
    # The same models fit when the memory budget is what bounds the leases...
    load_config(write_models(tmp_path, {"a": model(600), "b": model(500)}))
    # ...or when they are split over two hosts.
    two = {"hosts": {"default": {"memory_budget": 100_000}, "other": {"memory_budget": 100_000}}}
    load_config(write_models(tmp_path, {"a": model(600), "b": model(500, host="other")}, **two))


def test_a_model_name_longer_than_a_request_can_carry_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model names are at most 100 characters"):
        load_config(write_models(tmp_path, {"x" * 101: model(1)}))


def test_a_negative_memory_weight_is_refused(tmp_path: Path) -> None:
    path = write_models(tmp_path, {"a": model(1)}, memory_weights={"low": -1})
    with pytest.raises(ConfigError, match=r"field 'memory_weights\.low': must be at least 0"):
        load_config(path)


def test_a_lease_item_at_the_capacity_bound_fits_in_400_KB(limiter: Limiter) -> None:
    """The bound's arithmetic, on the limiter's real item: the longest names and the largest
    numbers, one lease per model (the most counters)."""
    name = "x" * 100
    counters = [
        Counter(f"inflight_{name}", 1000, 1, ModelBusy, "model"),
        Counter("memory", 100_000, 100_000, HostBusy, "budget"),
    ]
    pool = "host#" + "h" * 2043  # DynamoDB's longest partition key, 2048 bytes
    lease = limiter.acquire(pool, counters, 3_600_000)
    item = raw_item(limiter, pool)
    lease_bytes = item_size({f"l_{lease.lease_id}": item[f"l_{lease.lease_id}"]})
    counter_bytes = item_size({f"inflight_{name}": {"N": "1000"}})
    fixed = item_size({"pk": item["pk"], "memory": {"N": "100000"}})
    assert lease_bytes <= 78 + len(name) and counter_bytes <= 12 + len(name)
    assert MAX_LEASES_PER_HOST * (lease_bytes + counter_bytes) + fixed < MAX_ITEM_BYTES * 0.75
