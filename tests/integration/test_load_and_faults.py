"""Race and fault harness: several Hermes processes (standing in for Lambda instances) share
one DynamoDB Local and one Ollama emulator process under a mixed load with far more clients
than slots. The emulator records what really reached the "GPU"; the store shows what is held.
Everything runs on loopback, with bounded request counts and client timeouts."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest

from local.dynamodb_local import DynamoDBLocal, free_port
from tests.support.emulator_process import EmulatorProcess
from tests.support.hermes_process import HermesProcess
from tests.support.lease_state import held_lease_ids

LIMITS = {"gemma": 2, "llama3": 1, "mistral": 2}
TAGS = {"gemma": "gemma3:1b", "llama3": "llama3:8b", "mistral": "mistral:7b"}
WEIGHTS = {"gemma3:1b": 2, "llama3:8b": 4, "mistral:7b": 2}
BUDGET = 6  # below the 12 the limits alone would allow, so the budget binds too
MODELS = {
    "models": {
        "gemma": {
            "max_concurrency": 2,
            "memory_cost": "medium",
            "timeout": 2000,
            "backend_model": "gemma3:1b",
        },
        "llama3": {
            "max_concurrency": 1,
            "memory_cost": "high",
            "timeout": 2000,
            "backend_model": "llama3:8b",
        },
        # mistral waits for capacity (bounded waiting) instead of answering 429 at once.
        "mistral": {
            "max_concurrency": 2,
            "memory_cost": "medium",
            "timeout": 2000,
            "backend_model": "mistral:7b",
            "queue_timeout_ms": 1000,
        },
    },
    "hosts": {"default": {"memory_budget": BUDGET}},
}
DOCUMENTED = {
    (200, None),
    (429, "model_busy"),
    (429, "host_busy"),
    (429, "queue_full"),  # mistral waits: at most max_waiting (2 x 2 slots x 1 = 4) at once
    (502, "upstream_error"),
    (503, "upstream_unavailable"),
    # DynamoDB Local on a loaded machine can take seconds to grant a lease; a lease granted
    # with no time left to run is given back (issue 10, item 2), never run past its expiry.
    (503, "limiter_unavailable"),
    (504, "upstream_timeout"),
}


@pytest.fixture(scope="module")
def cluster(
    dynamodb_local: DynamoDBLocal, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    models = tmp_path_factory.mktemp("harness") / "models.json"
    models.write_text(json.dumps(MODELS))
    dynamodb_local.reset_tables()
    with ExitStack() as stack:
        emulator = stack.enter_context(EmulatorProcess())
        emulator.set_weights(WEIGHTS)
        env = {
            "AWS_ENDPOINT_URL_DYNAMODB": dynamodb_local.url,
            "OLLAMA_URL": emulator.url,
            "HERMES_MODELS_FILE": str(models),
            "HERMES_LEASE_MARGIN_MS": "500",
        }
        runners = [stack.enter_context(HermesProcess(env)) for _ in range(3)]
        yield {"emulator": emulator, "runners": runners, "env": env, "store": dynamodb_local}


def fire(urls: list[str], requests: int, clients: int, seed: int) -> list[tuple[int, str | None]]:
    """`requests` prompts over random models and runners from `clients` threads."""
    rng = random.Random(seed)
    plan = [(rng.choice(urls), rng.choice(list(LIMITS))) for _ in range(requests)]

    def one(job: tuple[str, str]) -> tuple[int, str | None]:
        url, model = job
        response = httpx.post(f"{url}/v1/llm/{model}", json={"prompt": "hi"}, timeout=15)
        body = response.json()
        return response.status_code, body.get("code")

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, plan))


def leases_left(store: DynamoDBLocal) -> list[str]:
    """Leases still held (their ids in the state items)."""
    return held_lease_ids(store.client())


def assert_limits_held(stats: dict) -> None:
    for model, limit in LIMITS.items():
        assert stats["peak_in_flight"].get(TAGS[model], 0) <= limit, (model, stats)
    assert stats["peak_weight"] <= BUDGET, stats


def test_mixed_load_never_exceeds_slots_or_budget_and_loses_nothing(cluster: dict) -> None:
    emulator = cluster["emulator"]
    emulator.reset()
    emulator.set_behaviour("*", "ok", delay_ms=60)
    results = fire([r.url for r in cluster["runners"]], requests=240, clients=24, seed=1)

    outcomes = Counter(results)
    print("mixed load outcomes:", dict(outcomes))
    assert len(results) == 240  # every request answered
    assert set(outcomes) <= DOCUMENTED, outcomes
    # Most of this closed loop is 429: nobody jumps the queue, so while mistral requests wait
    # for memory, gemma and llama3 (no waiting) are refused at once and come straight back.
    # Service rates are bench section 4's business; here: work was done, waiting included.
    assert outcomes[(200, None)] >= 5
    stats = emulator.stats()
    assert stats["requests"].get(TAGS["mistral"], 0) >= 1, stats
    assert_limits_held(stats)
    # The budget really was the binding limit at times (full, or held for a waiting request
    # that needs it), and waiting (mistral) admitted work.
    assert outcomes[(429, "host_busy")] > 0 and stats["peak_weight"] >= 4
    assert leases_left(cluster["store"]) == []


def test_ollama_faults_during_load_always_give_the_slots_back(cluster: dict) -> None:
    emulator = cluster["emulator"]
    emulator.reset()
    emulator.set_behaviour("gemma3:1b", "hang")  # → 504 after gemma's 2 s timeout
    emulator.set_behaviour("llama3:8b", "error", status=500)  # → 502
    emulator.set_behaviour("mistral:7b", "cut_stream", delay_ms=30)  # → 502
    refused = {**cluster["env"], "OLLAMA_URL": f"http://127.0.0.1:{free_port()}"}  # → 503
    with HermesProcess(refused) as orphan:
        urls = [r.url for r in cluster["runners"]] + [orphan.url]
        results = fire(urls, requests=80, clients=16, seed=2)
        busy = Counter(results)
        print("fault load outcomes:", dict(busy))
        assert len(results) == 80
        assert set(busy) <= DOCUMENTED, busy
        assert {504, 502, 503} <= {status for status, _ in busy}
        assert_limits_held(emulator.stats())

        # Every slot came back: no lease left, and a clean round is served normally.
        assert leases_left(cluster["store"]) == []
        emulator.reset()  # faults cleared
        status = httpx.get(f"{cluster['runners'][0].url}/v1/status", timeout=5).json()
        assert all(m["in_flight"] == 0 for m in status["models"])
        assert status["hosts"][0]["memory_in_use"] == 0
        for model in LIMITS:
            response = httpx.post(
                f"{cluster['runners'][1].url}/v1/llm/{model}", json={"prompt": "hi"}, timeout=10
            )
            assert response.status_code == 200, response.text


def test_status_of_each_instance_agrees_on_usage(cluster: dict) -> None:
    """Usage lives in the shared table, so every instance reports the same numbers."""
    views = [httpx.get(f"{r.url}/v1/status", timeout=5).json() for r in cluster["runners"]]
    assert len({json.dumps(v["models"], sort_keys=True) for v in views}) == 1
    assert {v["hosts"][0]["memory_budget"] for v in views} == {BUDGET}
