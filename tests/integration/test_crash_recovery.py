"""Liveness: a runner SIGKILLed while holding a slot (no finally, like a Lambda timeout)
leaves a lease that others take over once it expires, and not before; and any number of
such leases are taken over."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import httpx
import pytest

from hermes.errors import HostBusy, ModelBusy
from hermes.limiter import REAP_BATCH, Counter, Limiter
from hermes.limiter.records import BUCKET_MS, buckets_of
from local.dynamodb_local import DynamoDBLocal
from tests.support.clock import Clock
from tests.support.dynamodb_limits import ExpressionWatch
from tests.support.hermes_process import HermesProcess
from tests.support.lease_state import held_lease_ids
from tests.support.ollama_emulator import OllamaEmulator
from tests.support.polling import wait_until

# llama3's lease: its 5 s timeout + the runners' 0.5 s LeaseMarginMs + 0.25 s safety
# (hermes.service.LEASE_SAFETY_MS), written as the runner's clock + LEASE_MS when it admits.
LEASE_MS = 5000 + 500 + 250


def crashed_bucket_end_ms(client: Any) -> int:
    """When the expiry bucket of the one lease the lease table holds ends (epoch ms): a slot
    may be taken over only after that (records.Bucket.expired)."""
    items = client.scan(TableName="LeaseTable", ConsistentRead=True)["Items"]
    ends = [
        bucket.end * BUCKET_MS
        for item in items
        if item["sk"]["S"] == "state"
        for bucket in buckets_of(item).values()
        if bucket.ids
    ]
    assert len(ends) == 1, f"expected the one crashed lease, found buckets ending {ends}"
    return ends[0]


def test_a_killed_holders_slot_is_taken_over_after_its_lease_expires(
    hermes_env: dict[str, str], emulator: OllamaEmulator, dynamodb_local: DynamoDBLocal
) -> None:
    """Never before the lease, measured from before the request was sent (so at least the
    whole lease after its grant), and not before its expiry bucket ended as the lease table
    holds it; once that bucket has ended the next request is admitted, whenever it comes.
    Wall times on a loaded machine only make the test wait longer."""
    emulator.set_behaviour(model="llama3:8b", mode="hang")
    with HermesProcess(hermes_env) as doomed, HermesProcess(hermes_env) as survivor:

        def hold_the_slot() -> None:
            with contextlib.suppress(httpx.TransportError):  # its server is about to die
                httpx.post(f"{doomed.url}/v1/llm/llama3", json={"prompt": "hi"}, timeout=30)

        sent_ms = time.time() * 1000  # before the lease was granted
        holder = threading.Thread(target=hold_the_slot, daemon=True)
        holder.start()
        wait_until(
            lambda: emulator.stats()["in_flight"].get("llama3:8b", 0) >= 1,
            30,
            "the held request reached the emulator",
        )
        doomed.kill()
        emulator.set_behaviour(model="llama3:8b", mode="ok")
        bucket_end_ms = crashed_bucket_end_ms(dynamodb_local.client())
        # The lease written lasts at least LEASE_MS from the request (its bucket ends later).
        assert bucket_end_ms >= sent_ms + LEASE_MS, (bucket_end_ms, sent_ms)

        # While the lease lives: held, and busy.
        status = httpx.get(f"{survivor.url}/v1/status", timeout=5).json()
        busy = httpx.post(f"{survivor.url}/v1/llm/llama3", json={"prompt": "hi"}, timeout=10)
        checked_ms = time.time() * 1000
        assert checked_ms < sent_ms + LEASE_MS, (
            f"the machine stalled {(checked_ms - sent_ms) / 1000:.1f} s: too slow to tell a "
            "held lease from an expired one"
        )
        llama3 = next(m for m in status["models"] if m["name"] == "llama3")
        assert (llama3["in_flight"], status["hosts"][0]["memory_in_use"]) == (1, 4)
        assert (busy.status_code, busy.json()["code"]) == (429, "model_busy")

        refused = 0
        while True:
            probe_sent_ms = time.time() * 1000
            response = httpx.post(
                f"{survivor.url}/v1/llm/llama3", json={"prompt": "hi"}, timeout=10
            )
            answered_ms = time.time() * 1000
            if response.status_code == 200:
                break
            assert (response.status_code, response.json()["code"]) == (429, "model_busy")
            # A request that reaches the runner after the bucket ended finds the slot back.
            assert probe_sent_ms <= bucket_end_ms, (
                f"refused {(probe_sent_ms - bucket_end_ms) / 1000:.2f} s after the crashed "
                f"lease's bucket ended: {response.json()}"
            )
            assert answered_ms - sent_ms < LEASE_MS + BUCKET_MS + 30_000, "lease never expired"
            refused += 1
            time.sleep(0.1)
        recovered_after_s = (answered_ms - sent_ms) / 1000
        print(
            f"slot recovered {recovered_after_s:.2f} s after it was asked for (lease "
            f"{LEASE_MS / 1000:g} s, its bucket ended {(bucket_end_ms - sent_ms) / 1000:.2f} s "
            f"after it), {refused} refused probes before"
        )
        # Not early: the takeover came after the whole lease, and after its bucket ended.
        assert answered_ms - sent_ms >= LEASE_MS
        assert answered_ms > bucket_end_ms
        status = httpx.get(f"{survivor.url}/v1/status", timeout=5).json()
        assert status["hosts"][0]["memory_in_use"] == 0


def test_a_pool_full_of_300_expired_leases_admits_the_next_request(
    hermes_env: dict[str, str], dynamodb_local: DynamoDBLocal
) -> None:
    """300 crashed holders over 30 s: their ids and weights sit in the state item by expiry
    bucket. Reaping them all in one write would be one huge expression; every request here
    is checked against DynamoDB's documented limits, and a pass reaps REAP_BATCH buckets: the
    next request costs one pass, and the next 299 requests, which need the rest of the pool,
    take it back in a few more passes, all seen from outside: DynamoDB's requests, and what
    the lease table holds."""
    watch = ExpressionWatch()
    clock = Clock()
    client = watch.watch(dynamodb_local.client())
    ops: list[str] = []
    client.meta.events.register("before-call.dynamodb.*", lambda model, **_: ops.append(model.name))
    limiter = Limiter(client, "LeaseTable", clock=clock, light_calls=False)  # all seen by ops
    counters = [
        Counter("inflight_gemma", 300, 1, ModelBusy, "model 'gemma'"),
        Counter("memory", 600, 2, HostBusy, "memory budget"),
    ]
    for _ in range(300):
        limiter.acquire("host#gpu", counters, 1_000)
        clock.now += 0.1
    clock.now += 2  # all 300 expired, none released
    crashed = set(held_lease_ids(client))
    assert len(crashed) == 300
    del ops[:]
    lease = limiter.acquire("host#gpu", counters, 60_000)
    # Refused (its answer holds the state), the queue read, one reaping write (a single
    # item: no transaction), admitted.
    assert ops == ["UpdateItem", "Query", "UpdateItem", "UpdateItem"]
    assert limiter.usage(["host#gpu"]) == {"host#gpu": {"inflight_gemma": 1, "memory": 2}}
    left = crashed & set(held_lease_ids(client))
    assert 0 < len(left) < 300  # one pass, REAP_BATCH buckets: not all of them at once
    # The whole pool is asked for again: each request that finds it full of expired leases
    # reaps REAP_BATCH more buckets (a pass: one queue read, one reaping write).
    del ops[:]
    leases = [lease] + [limiter.acquire("host#gpu", counters, 60_000) for _ in range(299)]
    passes, writes = ops.count("Query"), ops.count("UpdateItem")
    print(f"\n  300 admissions over {len(left)} crashed leases: {passes} passes, {writes} writes")
    assert 1 <= passes <= 300 // 10 // REAP_BATCH + 1
    # Each admission one write, each pass a refused admission and its reaping write.
    assert writes == 299 + 2 * passes
    assert watch.found == []
    state = client.get_item(
        TableName="LeaseTable",
        Key={"pk": {"S": "host#gpu"}, "sk": {"S": "state"}},
        ConsistentRead=True,
    )["Item"]
    assert sorted(held_lease_ids(client)) == sorted(x.lease_id for x in leases)
    assert [len(bucket.ids) for bucket in buckets_of(state).values() if bucket.ids] == [300]
    assert (state["inflight_gemma"], state["memory"]) == ({"N": "300"}, {"N": "600"})
    with pytest.raises(ModelBusy, match="at capacity"):
        limiter.acquire("host#gpu", counters, 60_000)
    assert limiter.release(leases[0])
    assert limiter.usage(["host#gpu"]) == {"host#gpu": {"inflight_gemma": 299, "memory": 598}}
