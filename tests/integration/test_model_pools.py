"""Model pools across GPU hosts (issue 13), with real parts: 3 Ollama emulator processes are 3
GPU hosts (each keeps at most 2 models loaded, a load takes 200 ms), 3 Hermes runner processes
share one DynamoDB Local. What reached each "GPU" is read from its emulator; what Hermes shares
about the hosts from /v1/status. Every test starts from nothing loaded and no host records."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import ollama
import pytest

from local.dynamodb_local import DynamoDBLocal
from tests.support.hermes_process import HermesProcess
from tests.support.ollama_emulator import OllamaEmulator
from tests.support.polling import wait_until
from tests.support.pool_cluster import PoolCluster

BUDGET = 6  # per host: 2 "pooled" (2 each) and 1 "heavy" (4) do not fit together
MODELS: dict[str, dict[str, Any]] = {
    # Served by gpu1..gpu3 (PoolCluster's default); max_concurrency is per host.
    "pooled": {"max_concurrency": 2, "memory_cost": "medium", "backend_model": "gemma3:1b"},
    "heavy": {"max_concurrency": 1, "memory_cost": "high", "backend_model": "llama3:8b"},
    "patient": {
        "max_concurrency": 1,
        "memory_cost": "low",
        "backend_model": "qwen2:0.5b",
        "queue_timeout_ms": 5000,
    },
    "capped": {
        "max_concurrency": 2,
        "max_concurrency_total": 3,
        "memory_cost": "medium",
        "backend_model": "mistral:7b",
    },
    # The placement sequence's four models.
    "a": {"max_concurrency": 2, "memory_cost": "low", "backend_model": "phi3:3.8b"},
    "b": {"max_concurrency": 2, "memory_cost": "low", "backend_model": "tinyllama:1.1b"},
    "c": {"max_concurrency": 2, "memory_cost": "low", "backend_model": "smollm:1.7b"},
    "d": {"max_concurrency": 2, "memory_cost": "low", "backend_model": "granite3:2b"},
}
for _model in MODELS.values():
    _model.setdefault("timeout", 10_000)
TAG = {name: model["backend_model"] for name, model in MODELS.items()}


@pytest.fixture(scope="module")
def cluster(
    dynamodb_local: DynamoDBLocal, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PoolCluster]:
    dynamodb_local.reset_tables()
    workdir = tmp_path_factory.mktemp("pools")
    with PoolCluster(dynamodb_local, MODELS, workdir=workdir, memory_budget=BUDGET) as cluster:
        yield cluster


@pytest.fixture
def pool(cluster: PoolCluster) -> PoolCluster:
    """The cluster with every host up, nothing loaded and no shared host records."""
    for host in cluster.hosts:
        if not cluster.running(host):
            cluster.restart(host)
    cluster.reset()
    return cluster


def call(url: str, model: str, timeout: float = 20) -> tuple[int, str | None]:
    response = httpx.post(f"{url}/v1/llm/{model}", json={"prompt": "hi"}, timeout=timeout)
    return response.status_code, response.json().get("code")


def fire(pool: PoolCluster, models: list[str]) -> list[Future[tuple[int, str | None]]]:
    """One request per entry of `models`, all at once, spread over the runners."""
    executor = ThreadPoolExecutor(len(models))
    futures = [
        executor.submit(call, pool.urls[i % len(pool.urls)], model)
        for i, model in enumerate(models)
    ]
    executor.shutdown(wait=False)
    return futures


def held_per_host(pool: PoolCluster, tag: str) -> dict[str, int]:
    return {host: s["in_flight"].get(tag, 0) for host, s in pool.stats().items()}


def loads(pool: PoolCluster, tags: list[str]) -> dict[str, dict[str, int]]:
    """{host: {tag: loads}} for `tags` (hosts and tags with none left out)."""
    found = {
        host: {t: n for t, n in s["loads"].items() if t in tags and n}
        for host, s in pool.stats().items()
    }
    return {host: counts for host, counts in found.items() if counts}


def answered(
    futures: list[Future[Any]], n: int, held: Callable[[], int], timeout_s: float = 15
) -> list[Any]:
    """The answers once `n` of `futures` are done and every other one is held at a backend
    (`held()`: how many are), where none can answer before it is released: so no further
    answer can come, and none that came is missed."""
    wait_until(lambda: sum(f.done() for f in futures) >= n, timeout_s, f"{n} answers")
    rest = len(futures) - n
    wait_until(lambda: held() >= rest, timeout_s, f"the other {rest} held at a backend")
    assert held() == rest, f"{held()} held at a backend, not {rest}"
    done = [f.result() for f in futures if f.done()]
    assert len(done) == n, done
    return done


def hold(pool: PoolCluster, tag: str) -> None:
    for emulator in pool.emulators.values():
        emulator.set_behaviour(tag, "hold")


def let_go(pool: PoolCluster, tag: str, futures: list[Future[Any]]) -> list[Any]:
    """Requests of `tag` run normally from now on, held ones included; the answers of
    `futures`."""
    for emulator in pool.emulators.values():
        emulator.set_behaviour(tag, "ok")

    def release() -> None:
        for host, emulator in pool.emulators.items():
            if pool.running(host):
                emulator.release()

    return released(futures, release)


def released(futures: list[Future[Any]], release: Callable[[], Any]) -> list[Any]:
    """`release()` until every one of `futures` is answered (a request still loading its
    model when released is held after the load); their answers."""
    deadline = time.monotonic() + 20
    while not all(f.done() for f in futures):
        assert time.monotonic() < deadline, "held requests never answered"
        release()
        time.sleep(0.1)
    return [f.result() for f in futures]


def test_limits_hold_per_host_over_three_hosts_and_three_runners(pool: PoolCluster) -> None:
    # Given "pooled" (2 per host, no waiting) held open on every host
    hold(pool, TAG["pooled"])
    # When 9 requests come at once through 3 runners
    first = fire(pool, ["pooled"] * 9)
    # Then 6 run, 2 on each host, and the other 3 are refused at once
    pool.wait_until(
        lambda: sum(held_per_host(pool, TAG["pooled"]).values()) == 6, 15, "6 pooled in flight"
    )
    refused = answered(first, 3, lambda: sum(held_per_host(pool, TAG["pooled"]).values()))
    assert sorted(refused) == [(429, "model_busy")] * 3, refused
    assert held_per_host(pool, TAG["pooled"]) == {"gpu1": 2, "gpu2": 2, "gpu3": 2}
    code, status = pool.status(1)
    assert code == 200
    assert next(m for m in status["models"] if m["name"] == "pooled")["in_flight"] == 6
    assert [h["in_flight"]["pooled"] for h in status["hosts"]] == [2, 2, 2]
    assert [h["memory_in_use"] for h in status["hosts"]] == [4, 4, 4]
    # And the memory budget binds: "heavy" (4) does not fit next to 2 "pooled" (2 + 2) of 6
    assert call(pool.urls[2], "heavy") == (429, "host_busy")
    assert let_go(pool, TAG["pooled"], first).count((200, None)) == 6

    # A mixed burst (delayed answers) over all hosts and runners: never more than the limits
    for emulator in pool.emulators.values():
        emulator.set_behaviour("*", "ok", delay_ms=150)
    burst = fire(pool, ["pooled", "heavy", "pooled"] * 10)
    outcomes = Counter(f.result(timeout=30) for f in burst)
    assert set(outcomes) <= {(200, None), (429, "model_busy"), (429, "host_busy")}, outcomes
    assert outcomes[(200, None)] >= 9, outcomes
    for host, stats in pool.stats().items():
        assert stats["peak_in_flight"].get(TAG["pooled"], 0) <= 2, (host, stats)
        assert stats["peak_in_flight"].get(TAG["heavy"], 0) <= 1, (host, stats)
        assert stats["peak_weight"] <= BUDGET, (host, stats)


def test_requests_beyond_every_hosts_slots_wait_when_the_model_allows_it(
    pool: PoolCluster,
) -> None:
    # Given "patient" (1 per host, waits up to 5 s) held open on every host
    hold(pool, TAG["patient"])
    # When 4 requests come at once
    futures = fire(pool, ["patient"] * 4)
    pool.wait_until(
        lambda: sum(held_per_host(pool, TAG["patient"]).values()) == 3, 15, "3 patient in flight"
    )

    # Then the 4th waits for a slot (in a queue, no answer, no fourth call on any host)
    def waiting() -> int:
        return next(m for m in pool.status(0)[1]["models"] if m["name"] == "patient")["waiting"]

    pool.wait_until(lambda: waiting() == 1, 15, "the 4th patient request waiting")
    assert sum(f.done() for f in futures) == 0
    assert held_per_host(pool, TAG["patient"]) == {"gpu1": 1, "gpu2": 1, "gpu3": 1}
    # And runs once one is free
    assert let_go(pool, TAG["patient"], futures) == [(200, None)] * 4
    assert all(s["peak_in_flight"][TAG["patient"]] == 1 for s in pool.stats().values())


def test_a_model_wide_cap_holds_over_all_hosts(pool: PoolCluster) -> None:
    # Given "capped": 2 per host over 3 hosts, but 3 in all
    hold(pool, TAG["capped"])
    # When 6 requests come at once
    futures = fire(pool, ["capped"] * 6)
    pool.wait_until(
        lambda: sum(held_per_host(pool, TAG["capped"]).values()) == 3, 15, "3 capped in flight"
    )
    refused = answered(futures, 3, lambda: sum(held_per_host(pool, TAG["capped"]).values()))
    # Then 3 run and 3 are refused: held answers never end, so the peaks add up to the total
    assert refused == [(429, "model_busy")] * 3
    assert sum(s["peak_in_flight"][TAG["capped"]] for s in pool.stats().values()) == 3
    assert let_go(pool, TAG["capped"], futures).count((200, None)) == 3
    assert sum(s["peak_in_flight"][TAG["capped"]] for s in pool.stats().values()) == 3


def test_a_killed_host_loses_no_request_and_its_circuit_opens_then_closes(
    pool: PoolCluster,
) -> None:
    # Given 4 clients sending "pooled" requests (300 ms answers) through 3 runners: at most
    # 4 in flight, which 2 hosts can carry
    for emulator in pool.emulators.values():
        emulator.set_behaviour(TAG["pooled"], "ok", delay_ms=300)
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            results.append(call(pool.urls[(i + n) % 3], "pooled"))
            n += 1

    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in clients:
        thread.start()
    pool.wait_until(lambda: len(results) >= 8, 20, "the load is running")

    # When a host dies mid-answer
    def some_in_flight() -> dict[str, int] | None:
        now = held_per_host(pool, TAG["pooled"])
        return now if max(now.values()) else None

    busy = pool.wait_until(some_in_flight, 10, "a request in flight")
    victim = max(busy, key=lambda h: busy[h])
    mid_answer = busy[victim]
    before = len(results)
    pool.emulators[victim].kill()
    # Then its circuit opens for every instance, and requests keep succeeding elsewhere
    pool.wait_until(lambda: pool.host_status(victim, 2)["circuit"] == "open", 5, "open circuit")
    # …and status stays 200 (one host of a pool down takes nothing out of service), naming it
    code, status = pool.status(1)
    assert (code, status["status"]) == (200, "degraded"), status
    assert victim in [h["name"] for h in status["failing"]["hosts"]]
    assert status["failing"]["models"] == []
    pool.wait_until(lambda: len(results) >= before + 12, 20, "requests after the kill")
    stop.set()
    for thread in clients:
        thread.join(timeout=30)
    outcomes = Counter(results)
    print(f"{victim} killed with {mid_answer} in flight; outcomes {dict(outcomes)}")
    failed = len(results) - outcomes[(200, None)]
    assert set(outcomes) <= {(200, None), (502, "upstream_error")}, outcomes
    assert failed <= mid_answer, outcomes

    # When it comes back on its port, after the cooldown (1 s) a probe closes its circuit
    pool.restart(victim)
    pool.wait_until(
        lambda: (
            call(pool.urls[0], "pooled") == (200, None)
            and pool.host_status(victim, 1)["circuit"] == "closed"
        ),
        15,
        f"{victim}'s circuit closes",
    )
    assert pool.status(2)[0] == 200
    # And it serves again: 6 held requests need every host
    hold(pool, TAG["pooled"])
    futures = fire(pool, ["pooled"] * 6)
    pool.wait_until(
        lambda: held_per_host(pool, TAG["pooled"]) == {"gpu1": 2, "gpu2": 2, "gpu3": 2},
        15,
        "2 in flight on every host",
    )
    served_again = let_go(pool, TAG["pooled"], futures)
    assert served_again == [(200, None)] * 6, served_again


def test_a_stream_whose_host_is_down_before_its_first_chunk_is_served_by_another(
    pool: PoolCluster,
) -> None:
    # Given "pooled" loaded on gpu1 (the first request's host), which then dies unnoticed
    assert call(pool.urls[0], "pooled") == (200, None)
    assert loads(pool, [TAG["pooled"]]) == {"gpu1": {TAG["pooled"]: 1}}
    killed_ms = time.time() * 1000
    pool.emulators["gpu1"].kill()
    # When the official client streams from it (placement prefers gpu1, where it is loaded)
    with ollama.Client(host=pool.urls[1], timeout=20) as client:
        chunks = list(client.generate(model="pooled", prompt="one two three", stream=True))
    # Then the whole answer comes from another host, and gpu1's circuit is open
    assert chunks[-1]["done"] is True
    assert "".join(c["response"] for c in chunks).startswith("Echo:")
    served = {h: s["requests"].get(TAG["pooled"], 0) for h, s in pool.stats().items()}
    assert sum(served.values()) == 1 and "gpu1" not in served, served
    # And gpu1's circuit was opened by that failed call: open, or half-open once its cooldown
    # (1 s) has passed, which a loaded machine may take to get here
    gpu1 = pool.host_status("gpu1", 2)
    assert gpu1["circuit"] in ("open", "half_open"), gpu1
    assert gpu1["circuit_open_until_ms"] > killed_ms, gpu1


def test_requests_go_where_their_model_is_loaded(pool: PoolCluster) -> None:
    # Given "a" loaded on gpu2 only: while gpu1 cold-loads a held "heavy" (Hermes never has a
    # host load two models at once), "a" (cold everywhere) goes to the next host in order
    hold(pool, TAG["heavy"])
    heavy = fire(pool, ["heavy"])
    pool.wait_until(lambda: held_per_host(pool, TAG["heavy"])["gpu1"] == 1, 15, "heavy on gpu1")
    assert call(pool.urls[0], "a") == (200, None)
    assert let_go(pool, TAG["heavy"], heavy) == [(200, None)]
    assert loads(pool, [TAG["a"]]) == {"gpu2": {TAG["a"]: 1}}
    # When "a" is asked for again, one at a time and two at a time (its limit per host),
    # from every runner: the least busy host or the first in order would be another
    for i in range(6):
        assert call(pool.urls[i % 3], "a") == (200, None)
    for emulator in pool.emulators.values():
        emulator.set_behaviour(TAG["a"], "ok", delay_ms=150)
    for _ in range(3):
        assert [f.result(timeout=20) for f in fire(pool, ["a", "a"])] == [(200, None)] * 2
    # Then all of them ran on gpu2, and nothing loaded "a" anywhere else
    stats = pool.stats()
    assert {h: s["requests"].get(TAG["a"], 0) for h, s in stats.items()} == {
        "gpu1": 0,
        "gpu2": 13,
        "gpu3": 0,
    }
    assert loads(pool, [TAG["a"]]) == {"gpu2": {TAG["a"]: 1}}
    assert "a" in pool.host_status("gpu2")["resident_models"]


def test_a_cold_load_that_failed_frees_its_host_for_another_load(pool: PoolCluster) -> None:
    # Given a cold load of "a" on gpu1 (the first host) that fails before loading anything
    pool.emulators["gpu1"].set_behaviour(TAG["a"], "not_found")
    assert call(pool.urls[0], "a") == (404, "model_not_found")
    # When "b" comes, cold everywhere
    assert call(pool.urls[1], "b") == (200, None)
    # Then gpu1 (nothing loaded, nothing loading) takes it, as the first host in order
    assert pool.host_status("gpu1")["loading"] is None
    assert loads(pool, [TAG["a"], TAG["b"]]) == {"gpu1": {TAG["b"]: 1}}


# 32 requests over 4 models that fit the 3 hosts x 2 loaded models, in a fixed, mixed order.
# Random placement loads 21 times on average on it (10 at least in 20,000 simulated runs).
SEQUENCE = [["a", "b", "c", "d"][(i * 7 + i // 5) % 4] for i in range(32)]


def run_sequence(urls: list[str]) -> None:
    for i, model in enumerate(SEQUENCE):
        assert call(urls[i % len(urls)], model) == (200, None), (i, model)


def test_residency_placement_loads_each_model_once_where_random_placement_reloads(
    pool: PoolCluster,
) -> None:
    tags = [TAG[m] for m in "abcd"]
    # Given the same sequence of requests for 4 models, one at a time over the runners
    run_sequence(pool.urls)
    # Then residency placement loads each model once, and never evicts
    by_host = loads(pool, tags)
    residency = sum(sum(counts.values()) for counts in by_host.values())
    evictions = sum(sum(s["evictions"].get(t, 0) for t in tags) for s in pool.stats().values())
    print(f"residency placement: {residency} loads ({json.dumps(by_host)})")
    assert (residency, evictions) == (4, 0), by_host
    # While random placement (LiteLLM's simple-shuffle) on the same sequence loads far more
    pool.reset()
    with HermesProcess({**pool.env, "HERMES_PLACEMENT": "random"}) as shuffler:
        run_sequence([shuffler.url])
    by_host = loads(pool, tags)
    random_loads = sum(sum(counts.values()) for counts in by_host.values())
    print(f"random placement: {random_loads} loads ({json.dumps(by_host)})")
    assert random_loads >= 2 * residency, by_host


def test_a_single_host_models_file_works_as_before(
    hermes_env: dict[str, str], emulator: OllamaEmulator, dynamodb_local: DynamoDBLocal
) -> None:
    # Given the seed's models file (one implicit host "default", no pools)
    emulator.set_behaviour("gemma3:1b", "hold")
    with HermesProcess(hermes_env) as hermes:
        # When gemma (2 at a time) gets 3 requests at once
        with ThreadPoolExecutor(3) as executor:
            futures = [executor.submit(call, hermes.url, "gemma") for _ in range(3)]
            wait_until(
                lambda: emulator.stats()["in_flight"]["gemma3:1b"] >= 2, 15, "2 gemma in flight"
            )
            # Then 2 run and the third is refused at once, as before
            refused = answered(futures, 1, lambda: emulator.stats()["in_flight"]["gemma3:1b"])
            assert refused == [(429, "model_busy")]
            status = httpx.get(f"{hermes.url}/v1/status", timeout=10).json()
            emulator.set_behaviour("gemma3:1b", "ok")
            answers = released(
                futures, lambda: httpx.post(f"{emulator.url}/_emulator/release", timeout=10)
            )
            assert answers.count((200, None)) == 2
        # And status shows one host serving every model, with a closed circuit
        assert status["status"] == "healthy"
        assert [h["name"] for h in status["hosts"]] == ["default"]
        assert status["hosts"][0]["circuit"] == "closed"
        assert status["hosts"][0]["in_flight"]["gemma"] == 2
        assert {m["name"]: m["hosts"] for m in status["models"]} == {
            m["name"]: ["default"] for m in status["models"]
        }
        loaded = httpx.get(f"{hermes.url}/api/ps", timeout=10).json()["models"]
        assert [(m["name"], m["host"]) for m in loaded] == [("gemma", "default")]
    # And no placement state was written: no host record, no model-wide pool
    items = dynamodb_local.client().scan(TableName="LeaseTable", ConsistentRead=True)["Items"]
    assert [i for i in items if i["sk"]["S"] == "host" or i["pk"]["S"].startswith("model#")] == []
    assert {i["pk"]["S"].split("#")[1] for i in items} == {"default"}
