"""Limiter semantics on moto (single-threaded here, so moto's lack of locking is harmless;
the concurrent races run against DynamoDB Local in tests/integration). Every request the
limiter sends here is checked against DynamoDB's documented limits (`dynamodb_limits`)."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ReadTimeoutError

from hermes import ollama_api, openai_api
from hermes.config import MAX_MODEL_NAME_CHARS, MAX_MODELS_PER_HOST, ConfigError, load_config
from hermes.errors import HostBusy, LimiterUnavailable, ModelBusy, UpstreamTimeout
from hermes.limiter import REAP_BATCH, Counter, Lease, Limiter, Ticket
from hermes.limiter.limiter import MAX_ROUNDS
from hermes.limiter.records import BUCKET_MS, buckets_of
from hermes.service import get_service, host_pool
from tests.support.clock import Clock
from tests.support.dynamodb_limits import (
    EXPRESSIONS,
    MAX_EXPRESSION_BYTES,
    ExpressionWatch,
    item_size,
)
from tests.support.models_file import write_models
from tests.support.ollama_emulator import OllamaEmulator
from tests.support.polling import wait_until


@pytest.fixture
def clock() -> Clock:
    return Clock(now=1_000_000.0)


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
    # One conditional write of the state item to admit, one to release: no transaction,
    # which would hold the item for its commit and cancel everything that overlaps it.
    assert calls == ["UpdateItem", "UpdateItem"]


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


def state_item(limiter: Limiter, pool: str = POOL) -> dict[str, Any]:
    """The pool's state item: its counters (and queue bookkeeping)."""
    item: dict[str, Any] = limiter._ddb.get_item(
        TableName="LeaseTable", Key={"pk": {"S": pool}, "sk": {"S": "state"}}, ConsistentRead=True
    ).get("Item", {})
    return item


def lease_ids(limiter: Limiter, pool: str = POOL) -> list[str]:
    """The ids of the leases the pool's state item holds, by expiry bucket (oldest first)."""
    buckets = buckets_of(state_item(limiter, pool))
    return [lease_id for end in sorted(buckets) for lease_id in sorted(buckets[end].ids)]


# -- A holder never runs past its lease (issue 10, item 2) ----------------------------------


def test_a_lease_carries_the_expiry_dynamodb_holds(limiter: Limiter, clock: Clock) -> None:
    lease = limiter.acquire(POOL, gemma(), 5_000)
    assert lease.expires_at_ms == int(clock.now * 1000) + 5_000
    assert lease.counts == {"inflight_gemma": 1}  # the count its write returned (metrics)
    # Its id is kept in the bucket its expiry falls in: reaped once that bucket has ended.
    (bucket,) = buckets_of(state_item(limiter)).values()
    assert bucket.ids == {lease.lease_id} and bucket.weights == {"inflight_gemma": 1}
    assert (bucket.end - 1) * BUCKET_MS < lease.expires_at_ms <= bucket.end * BUCKET_MS
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
    limiter._ddb.meta.events.register("before-call.dynamodb.TransactWriteItems", slow_write)
    asked_at = clock.now
    lease = limiter.acquire(POOL, gemma(1), 5_000)
    # Failed write (3 s), the grant pass that reaps (3 s), then the admitting write, whose
    # lease counts from when it was sent: 5 s from there, not from when admission began.
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
def solo_clock() -> Clock:
    """The clock of the `solo` service's limiter (leases, their expiry, what is left of them),
    moved by hand: a whole second, so that lease times are exact milliseconds."""
    return Clock(now=float(int(time.time())))


@pytest.fixture
def solo(
    aws: None,
    emulator: OllamaEmulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dynamodb_limits: ExpressionWatch,
    solo_clock: Clock,
) -> list[Lease]:
    """A service whose model `solo` allows 1 call of 1 s (lease margin 200 ms), whose backend
    hangs, whose limiter runs on `solo_clock`, and whose granted leases are recorded
    (returned list)."""
    import hermes.service
    from hermes.aws import client

    monkeypatch.setattr(hermes.service, "Limiter", functools.partial(Limiter, clock=solo_clock))
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


def answers_late(clock: Clock, seconds: float, times: int = 1) -> None:
    """The next `times` writes land at once; their answers come `seconds` later by the
    limiter's clock, which the test moves: real time (a loaded machine) adds nothing."""
    left = [times]

    def late(**_: Any) -> None:
        if left[0] > 0:
            left[0] -= 1
            clock.advance(seconds)

    get_service().limiter._ddb.meta.events.register("after-call.dynamodb.UpdateItem", late)


def run_solo() -> Any:
    return asyncio.run(get_service().complete("solo", "/api/generate", {"prompt": "hi"}))


def test_a_late_admission_answer_shortens_the_call_to_what_its_lease_has_left(
    solo: list[Lease], solo_clock: Clock, emulator: OllamaEmulator
) -> None:
    # Lease = 1 s + margin + safety = 1.45 s from the write; its answer comes 0.6 s late.
    answers_late(solo_clock, 0.6)
    with pytest.raises(UpstreamTimeout) as timeout:
        run_solo()
    (lease,) = solo
    run_ms = timeout.value.extra["timeout_ms"]
    # The call ran what the lease had left less margin and safety (1.45 - 0.6 - 0.45 = 0.4 s,
    # to the millisecond), not the model's 1 s from the late answer (which would end 0.15 s
    # AFTER the lease expired), so it was over at least the margin (and the safety) before
    # the expiry: no other instance could take the slot meanwhile.
    assert abs(run_ms - 400) <= 1, run_ms
    granted_ms = solo_clock.now_ms()  # the clock stood still since the late answer
    assert lease.expires_at_ms - (granted_ms + run_ms) >= (MARGIN_S + SAFETY_S) * 1000 - 1
    assert "slow to grant" in timeout.value.message
    assert emulator.stats()["requests"]["llama3:8b"] == 1


def test_a_stream_admitted_late_ends_before_its_lease_too(
    solo: list[Lease], solo_clock: Clock, emulator: OllamaEmulator
) -> None:
    emulator.set_behaviour(model="llama3:8b", mode="ok", tokens=50, token_delay_ms=100)
    answers_late(solo_clock, 0.6)

    async def stream() -> list[dict[str, Any]]:
        chunks = await get_service().open_stream("solo", "/api/generate", {"prompt": "hi"})
        return [chunk async for chunk in chunks]

    with pytest.raises(UpstreamTimeout, match="slow to grant") as timeout:
        asyncio.run(stream())  # 5 s of tokens; the lease left 0.4 s of them
    (lease,) = solo
    run_ms = timeout.value.extra["timeout_ms"]
    assert abs(run_ms - 400) <= 1, run_ms
    granted_ms = solo_clock.now_ms()
    assert lease.expires_at_ms - (granted_ms + run_ms) >= (MARGIN_S + SAFETY_S) * 1000 - 1


DIALECTS: dict[str, Callable[[AsyncIterator[dict[str, Any]]], AsyncIterator[Any]]] = {
    "service": lambda chunks: chunks,
    "ollama": lambda chunks: ollama_api.ndjson(chunks, "solo"),
    "openai": lambda chunks: openai_api.sse(chunks, "solo", True, False),
}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_a_stream_closed_before_its_first_item_frees_its_slot(
    solo: list[Lease], emulator: OllamaEmulator, dialect: str
) -> None:
    # Given an admitted streamed call, its first object already read from the backend
    emulator.set_behaviour(model="llama3:8b", mode="ok", tokens=50, token_delay_ms=100)

    async def closed_unread() -> int:
        chunks = await get_service().open_stream("solo", "/api/generate", {"prompt": "hi"})
        # When the answer is closed before anything was iterated (a client gone before the
        # first byte: StreamingBody closes its body iterator, never started)
        await DIALECTS[dialect](chunks).aclose()  # type: ignore[attr-defined]
        pool = host_pool("default")
        return int(get_service().limiter.usage([pool])[pool].get("inflight_solo", 0))

    # Then the slot is free at once, not when the lease expires
    assert asyncio.run(closed_unread()) == 0
    # And Ollama saw the call end
    wait_until(
        lambda: emulator.stats()["in_flight"]["llama3:8b"] == 0,
        30,
        "the emulator sees the closed stream's call end",
    )


def test_a_lease_granted_too_late_to_use_is_given_back_with_503(
    solo: list[Lease], solo_clock: Clock, emulator: OllamaEmulator
) -> None:
    answers_late(solo_clock, 1.1)  # past the lease less margin and safety: nothing left to run
    with pytest.raises(LimiterUnavailable, match="left no time to run it") as error:
        run_solo()
    assert error.value.retry_after == 1
    # Given back, not left to expire: no lease item left, the counters back to zero.
    limiter = get_service().limiter
    assert lease_ids(limiter, host_pool("default")) == []
    assert state_item(limiter, host_pool("default"))["inflight_solo"] == {"N": "0"}
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
    """The next `times` admission writes are applied, then fail as if the answer never came
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
    assert lease_ids(limiter) == []
    assert state_item(limiter)["inflight_gemma"] == {"N": "0"}
    assert limiter.release(limiter.acquire(POOL, gemma(1), 60_000)) is True


def test_withdrawing_an_admission_that_never_landed_frees_nothing_else(limiter: Limiter) -> None:
    theirs = limiter.acquire(POOL, gemma(2), 60_000)

    def refused(**_: Any) -> None:
        raise ReadTimeoutError(endpoint_url="https://dynamodb.us-east-1.amazonaws.com/")

    limiter._ddb.meta.events.register_first("before-call.dynamodb.UpdateItem", refused)
    with pytest.raises(LimiterUnavailable):
        limiter.acquire(POOL, gemma(2), 60_000)
    limiter._ddb.meta.events.unregister("before-call.dynamodb.UpdateItem", refused)
    assert lease_ids(limiter) == [theirs.lease_id]
    assert in_use(limiter) == 1


# -- Reaping any number of expired leases (item 4) ------------------------------------------


def transaction_sizes(limiter: Limiter) -> list[int]:
    """The number of actions of every TransactWriteItems the limiter sends from now on."""
    sizes: list[int] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        sizes.append(len(params["TransactItems"]))

    limiter._ddb.meta.events.register("provide-client-params.dynamodb.TransactWriteItems", record)
    return sizes


def crash_holders(limiter: Limiter, clock: Clock, count: int, capacity: int) -> list[int]:
    """`count` holders admitted over count / 10 s (about ten per expiry bucket) and crashed:
    their 1 s leases all expired 2 s after the last. The number of leases of each batch of
    REAP_BATCH buckets, oldest first."""
    for _ in range(count):
        limiter.acquire(POOL, gemma(capacity), 1_000)
        clock.now += 0.1
    clock.now += 2
    buckets = buckets_of(state_item(limiter))
    sizes = [len(buckets[end].ids) for end in sorted(buckets)]
    return [sum(sizes[i : i + REAP_BATCH]) for i in range(0, len(sizes), REAP_BATCH)]


def test_a_pool_full_of_300_expired_leases_admits_the_next_request(
    limiter: Limiter, clock: Clock
) -> None:
    batches = crash_holders(limiter, clock, 300, 300)  # ~30 expired buckets of ~10
    sizes = transaction_sizes(limiter)
    lease = limiter.acquire(POOL, gemma(300), 1_000)
    # The refused admission, one reaping write of the REAP_BATCH oldest buckets (a single
    # item: no transaction), then the admitting write; every request within DynamoDB's
    # limits (dynamodb_limits checks each).
    assert sizes == []
    assert in_use(limiter) == 1  # usage leaves out the expired leases not reaped yet
    assert len(lease_ids(limiter)) == 300 - batches[0] + 1
    assert lease_ids(limiter)[-1] == lease.lease_id
    # The rest go REAP_BATCH buckets at a time, with whatever pass comes next.
    assert [limiter._grant_pass(POOL).cleaned for _ in batches[1:]] == batches[1:]
    assert lease_ids(limiter) == [lease.lease_id]
    assert state_item(limiter)["inflight_gemma"] == {"N": "1"}
    # Nothing left of the reaped buckets: the state item holds the live lease's bucket only.
    assert list(buckets_of(state_item(limiter))) == [lease.bucket]


def test_reaping_stops_where_another_instance_reaped_first(limiter: Limiter, clock: Clock) -> None:
    first, rest = crash_holders(limiter, clock, 120, 120)  # ~12 expired buckets of ~10
    other = Limiter(limiter._ddb, "LeaseTable", clock=clock)
    stale = state_item(limiter)  # read before the other reaps
    assert other._grant_pass(POOL).cleaned == first  # the other instance reaps first
    done = limiter._grant_pass(POOL, stale)
    # Its first write (reaping buckets that are gone) fails as a whole on its conditions; it
    # reads again and reaps what is left. Nothing is subtracted twice.
    assert done.written and done.cleaned == rest
    assert lease_ids(limiter) == []
    assert state_item(limiter)["inflight_gemma"] == {"N": "0"}
    assert in_use(limiter) == 0


def test_emptied_buckets_go_at_most_reap_batch_at_a_time(
    limiter: Limiter, clock: Clock, dynamodb_limits: ExpressionWatch
) -> None:
    """30 leases in 30 one-second buckets, all released while their buckets were still
    ahead: once the buckets are past, each later release removes REAP_BATCH of the empty
    ones (an update naming hundreds would pass moto and break DynamoDB's 4 KB limit)."""
    leases = [limiter.acquire(POOL, gemma(40), 1_000 * (i + 1)) for i in range(30)]
    for lease in leases:
        assert limiter.release(lease)
    assert len(buckets_of(state_item(limiter))) == 30
    clock.now += 100
    left = []
    for _ in range(6):
        limiter.release(limiter.acquire(POOL, gemma(40), 1_000))
        left.append(
            len(
                [
                    b
                    for b in buckets_of(state_item(limiter)).values()
                    if b.end * 1000 < clock.now * 1000
                ]
            )
        )
    assert left == [22, 14, 6, 0, 0, 0]
    assert dynamodb_limits.found == []


def test_usage_reads_any_number_of_pools_100_keys_at_a_time(limiter: Limiter) -> None:
    pools = [f"host#h{i}" for i in range(250)]
    limiter.acquire(pools[-1], gemma(), 10_000)
    usage = limiter.usage(pools)
    assert len(usage) == 250 and usage[pools[-1]] == {"inflight_gemma": 1}


def models_file(tmp_path: Path, models: dict[str, Any], **extra: Any) -> Path:
    return write_models(tmp_path, {"models": models, **extra})


def model(max_concurrency: int, cost: str = "low", host: str = "default") -> dict[str, Any]:
    return {
        "max_concurrency": max_concurrency,
        "memory_cost": cost,
        "timeout": 1000,
        "backend_model": "m:1b",
        "host": host,
    }


def test_a_host_serves_at_most_MAX_MODELS_PER_HOST_models(tmp_path: Path) -> None:
    models = {f"m{i:02d}": model(1) for i in range(MAX_MODELS_PER_HOST + 1)}
    with pytest.raises(ConfigError) as error:
        load_config(models_file(tmp_path, models))
    message = str(error.value)
    assert f"field 'models.m{MAX_MODELS_PER_HOST:02d}.host'" in message
    assert f"would serve {MAX_MODELS_PER_HOST + 1} models" in message
    assert f"bound of {MAX_MODELS_PER_HOST} per host" in message
    # At the bound it loads, and so do the same models split over two hosts.
    load_config(models_file(tmp_path, dict(list(models.items())[:MAX_MODELS_PER_HOST])))
    two = {"hosts": {"default": {"memory_budget": 100}, "other": {"memory_budget": 100}}}
    split = {name: model(1, host="other" if i % 2 else "default") for i, name in enumerate(models)}
    load_config(models_file(tmp_path, split, **two))


def test_concurrency_is_no_longer_bounded_by_what_one_item_holds(tmp_path: Path) -> None:
    """Leases are items of their own: 1,100 leases on one host load (they did not when every
    lease lived in the host's item)."""
    big = {"hosts": {"default": {"memory_budget": 100_000}}}
    config = load_config(models_file(tmp_path, {"a": model(600), "b": model(500)}, **big))
    assert config.models["a"].max_concurrency + config.models["b"].max_concurrency == 1100


def test_a_model_name_longer_than_a_request_can_carry_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model names are at most 100 characters"):
        load_config(models_file(tmp_path, {"x" * 101: model(1)}))


def test_a_negative_memory_weight_is_refused(tmp_path: Path) -> None:
    path = models_file(tmp_path, {"a": model(1)}, memory_weights={"low": -1})
    with pytest.raises(ConfigError, match=r"field 'memory_weights\.low': must be at least 0"):
        load_config(path)


def size_of(item: dict[str, Any]) -> int:
    """item_size, plus string sets (the sum of their strings, one byte of overhead each)."""
    sets = {k: v for k, v in item.items() if "SS" in v}
    rest = {k: v for k, v in item.items() if k not in sets}
    return item_size(rest) + sum(len(k) + sum(len(x) + 1 for x in v["SS"]) for k, v in sets.items())


def largest_expressions(client: Any) -> dict[str, int]:
    """The largest expression of each kind sent from now on, transaction actions included."""
    biggest: dict[str, int] = {}

    def record(params: dict[str, Any], **_: Any) -> None:
        actions = [
            request for action in params.get("TransactItems", []) for request in action.values()
        ]
        for request in [params, *actions]:
            for kind in EXPRESSIONS:
                if kind in request:
                    size = len(request[kind].encode())
                    biggest[kind] = max(biggest.get(kind, 0), size)

    client.meta.events.register("provide-client-params.dynamodb.*", record)
    return biggest


CRASHED = 30


def test_a_host_at_the_model_bound_keeps_a_grant_pass_under_4_KB_per_expression(
    limiter: Limiter, clock: Clock, dynamodb_limits: ExpressionWatch
) -> None:
    """The bound's arithmetic, on the limiter's real writes: MAX_MODELS_PER_HOST models with
    the longest names on one host whose key is the longest DynamoDB allows, and the largest
    grant pass there is: it reaps a bucket of 30 crashed leases (30 models) and grants the
    30 waiters the memory budget then has room for (the 20 other models and 10 of the first),
    so its state update names every counter of the host (51) and 31 of them twice more (the
    reaped bucket's and the grants'). Every request is checked by dynamodb_limits."""
    names = [f"{i:02d}" + "x" * (MAX_MODEL_NAME_CHARS - 2) for i in range(MAX_MODELS_PER_HOST)]
    pool = "host#" + "h" * (2048 - len("host#") - len("#queue"))  # <pool>#queue: 2048 bytes
    crashed, other = range(CRASHED), range(CRASHED, MAX_MODELS_PER_HOST)

    def counters(i: int) -> list[Counter]:
        return [
            Counter(f"inflight_{names[i]}", 1, 1, ModelBusy, f"model {i}"),
            Counter("memory", CRASHED, 1, HostBusy, "memory budget"),
        ]

    for i in crashed:
        limiter.acquire(pool, counters(i), 1_000)  # the memory budget is now full
    wait_until = int(clock.now * 1000) + 60_000
    tickets = [
        limiter.enqueue(pool, counters(i), 60_000, wait_until_ms=wait_until)
        for i in [*other, *crashed]  # the other models first: they only wait for memory
    ]
    assert all(isinstance(ticket, Ticket) for ticket in tickets)
    waiting = state_item(limiter, pool)
    assert "memory" in waiting["q_blocked"]["SS"]
    clock.now += 2
    biggest = largest_expressions(limiter._ddb)
    sizes = transaction_sizes(limiter)
    done = limiter._grant_pass(pool)
    assert done.written and done.cleaned == CRASHED
    assert len(done.grants) == CRASHED and sizes == [1 + 2 * CRASHED]
    granted = {tickets[i].ticket_id for i in range(CRASHED)}
    assert set(done.grants) == granted  # the head of the queue, in order
    state = state_item(limiter, pool)
    # The 20 left waiting are short of memory, which newcomers must not take.
    assert state["memory"] == {"N": str(CRASHED)}
    assert set(state["q_blocked"]["SS"]) == {"memory"}
    assert len([name for name in state if name.startswith("inflight_")]) == MAX_MODELS_PER_HOST
    # The largest state item: every counter, and every counter's name in q_blocked.
    every_name = [name for name in state if name.startswith(("inflight_", "memory"))]
    largest_state = size_of({**state, "q_blocked": {"SS": every_name}})
    print(
        f"\n  {MAX_MODELS_PER_HOST} models on one host: largest expressions {biggest}, "
        f"state item {size_of(waiting)} B waiting, {size_of(state)} B after the pass, "
        f"at most {largest_state} B; {dynamodb_limits.checked} requests checked"
    )
    assert max(biggest.values()) < MAX_EXPRESSION_BYTES * 0.75
    assert largest_state < 16 * 1024  # 4% of 400 KB, whatever the number of leases
    assert dynamodb_limits.found == []


def test_an_admission_retried_after_its_answer_was_lost_is_counted_once(
    limiter: Limiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore retries a write whose answer it did not get; when the first attempt landed,
    the retry must not admit twice (a second count would hold a slot nobody uses until the
    lease expires: the 1,000-lease scale test once lost 29 slots that way). Each attempt here
    is applied and the answer of the second is the one returned, as for such a retry."""
    update_item = limiter._ddb.update_item
    attempts: list[str] = []

    def applied_twice(**request: Any) -> Any:
        attempts.append(request["UpdateExpression"])
        if len(attempts) == 1:
            update_item(**request)  # landed; its answer is lost
        return update_item(**request)

    monkeypatch.setattr(limiter._ddb, "update_item", applied_twice)
    lease = limiter.acquire(POOL, gemma(2), 10_000)
    monkeypatch.undo()
    assert len(attempts) == 1  # one admission, sent twice by the "retry" above
    assert in_use(limiter) == 1 and lease_ids(limiter) == [lease.lease_id]
    assert limiter.release(lease) and in_use(limiter) == 0


class TakesWhatIsFreed:
    """An instance's DynamoDB client beside which another instance, after each of the
    instance's first `times` successful writes (its reaping passes: its admissions are
    refused), takes every slot the write freed, exactly: no more, so it never reaps itself."""

    def __init__(self, client: Any, other: Limiter, times: int, capacity: int) -> None:
        self._client, self._other, self._times, self._capacity = client, other, times, capacity
        self.taken = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def update_item(self, **kwargs: Any) -> Any:
        answer = self._client.update_item(**kwargs)
        if self._times > 0:
            self._times -= 1
            state = self._client.get_item(
                TableName="LeaseTable", Key={"pk": {"S": POOL}, "sk": {"S": "state"}}
            )["Item"]
            for _ in range(self._capacity - int(state["inflight_gemma"]["N"])):
                self._other.acquire(POOL, gemma(self._capacity), 60_000)
                self.taken += 1
        return answer


def test_rounds_that_reap_do_not_use_up_an_admissions_rounds(
    limiter: Limiter, clock: Clock
) -> None:
    """Issue 24: a 120-slot pool full of expired leases (42 buckets: more reaping passes than
    an admission has rounds), and another instance taking what each of the first passes
    frees. The last pass's capacity stays free: the request must get it, not answer 'at
    capacity' because its rounds ran out on passes that each freed capacity."""
    for _ in range(120):  # crashed holders: 1 s leases over 42 s, all expired 2 s later
        limiter.acquire(POOL, gemma(120), 1_000)
        clock.now += 0.35
    clock.now += 2
    other = TakesWhatIsFreed(boto3.client("dynamodb"), limiter, MAX_ROUNDS - 1, 120)
    newcomer = Limiter(other, "LeaseTable", clock=clock)
    lease = newcomer.acquire(POOL, gemma(120), 1_000)
    assert other.taken > 0  # the other instance did take what the first passes freed
    assert lease.pool == POOL
    assert in_use(limiter) == other.taken + 1
