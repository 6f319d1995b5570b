"""Liveness: a runner SIGKILLed while holding a slot (no finally, like a Lambda timeout)
leaves a lease that others take over once it expires, and not before; and any number of
such leases are taken over."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx

from hermes.errors import HostBusy, ModelBusy
from hermes.limiter import REAP_BATCH, Counter, Limiter
from hermes.limiter.records import buckets_of
from local.dynamodb_local import DynamoDBLocal
from tests.support.clock import Clock
from tests.support.dynamodb_limits import ExpressionWatch
from tests.support.hermes_process import HermesProcess
from tests.support.ollama_emulator import OllamaEmulator


def test_a_killed_holders_slot_is_taken_over_after_its_lease_expires(
    hermes_env: dict[str, str], emulator: OllamaEmulator
) -> None:
    emulator.set_behaviour(model="llama3:8b", mode="hang")
    with HermesProcess(hermes_env) as doomed, HermesProcess(hermes_env) as survivor:

        def hold_the_slot() -> None:
            with contextlib.suppress(httpx.TransportError):  # its server is about to die
                httpx.post(f"{doomed.url}/v1/llm/llama3", json={"prompt": "hi"}, timeout=30)

        holder = threading.Thread(target=hold_the_slot, daemon=True)
        granted_at = time.monotonic()
        holder.start()
        while emulator.stats()["in_flight"].get("llama3:8b", 0) < 1:
            time.sleep(0.01)
        doomed.kill()
        emulator.set_behaviour(model="llama3:8b", mode="ok")

        # Lease = llama3's 5 s timeout + 0.5 s margin + 0.25 s safety. Before that: busy.
        status = httpx.get(f"{survivor.url}/v1/status", timeout=5).json()
        llama3 = next(m for m in status["models"] if m["name"] == "llama3")
        assert (llama3["in_flight"], status["hosts"][0]["memory_in_use"]) == (1, 4)
        busy = httpx.post(f"{survivor.url}/v1/llm/llama3", json={"prompt": "hi"}, timeout=10)
        assert (busy.status_code, busy.json()["code"]) == (429, "model_busy")
        assert time.monotonic() - granted_at < 5.0

        while True:
            response = httpx.post(
                f"{survivor.url}/v1/llm/llama3", json={"prompt": "hi"}, timeout=10
            )
            if response.status_code == 200:
                break
            assert response.status_code == 429
            assert time.monotonic() - granted_at < 15, "lease never expired"
            time.sleep(0.2)
        recovered_after = time.monotonic() - granted_at
        print(f"slot recovered {recovered_after:.2f} s after it was granted (lease 5.75 s)")
        assert recovered_after >= 5.0
        status = httpx.get(f"{survivor.url}/v1/status", timeout=5).json()
        assert status["hosts"][0]["memory_in_use"] == 0


def test_a_pool_full_of_300_expired_leases_admits_the_next_request(
    hermes_env: dict[str, str], dynamodb_local: DynamoDBLocal
) -> None:
    """300 crashed holders over 30 s: their ids and weights sit in the state item by expiry
    bucket. Reaping them all in one write would be one huge expression; every request here
    is checked against DynamoDB's documented limits, and a pass reaps REAP_BATCH buckets: the
    next request costs one pass, and a few more passes take the rest."""
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
    del ops[:]
    lease = limiter.acquire("host#gpu", counters, 60_000)
    # Refused (its answer holds the state), the queue read, one reaping write (a single
    # item: no transaction), admitted.
    assert ops == ["UpdateItem", "Query", "UpdateItem", "UpdateItem"]
    assert limiter.usage(["host#gpu"]) == {"host#gpu": {"inflight_gemma": 1, "memory": 2}}
    # Later passes take the rest, REAP_BATCH buckets at a time, until only the new lease is left.
    passes = 0
    while limiter._grant_pass("host#gpu").cleaned:
        passes += 1
    assert passes <= 300 // 10 // REAP_BATCH + 1
    assert watch.found == []
    state = client.get_item(
        TableName="LeaseTable",
        Key={"pk": {"S": "host#gpu"}, "sk": {"S": "state"}},
        ConsistentRead=True,
    )["Item"]
    assert [bucket.ids for bucket in buckets_of(state).values()] == [{lease.lease_id}]
    assert (state["inflight_gemma"], state["memory"]) == ({"N": "1"}, {"N": "2"})
    assert limiter.release(lease)
