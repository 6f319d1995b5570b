"""Hermes under Lambda's freeze (issue 19): every handler runs in a FrozenSandbox, a process
stopped (SIGSTOP, every thread) the moment its handler returns, as Lambda freezes a sandbox.
What safety and liveness need must therefore be done before the handler returns: a release,
a handoff to a waiting request, a probe that reopens a pool, a job's final status.

Shared with the other integration tests: DynamoDB Local and the Ollama emulator (conftest)."""

from __future__ import annotations

import copy
import json
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from local.dynamodb_local import DynamoDBLocal
from local.embedded_moto import start_embedded_moto
from tests.integration.conftest import TEST_MODELS
from tests.support.emulator_process import EmulatorProcess
from tests.support.frozen_sandbox import (
    LAYER,
    FrozenSandbox,
    http_answer,
    http_event,
    post,
    sqs_event,
    start_all,
)
from tests.support.lease_state import held_lease_ids
from tests.support.ollama_emulator import OllamaEmulator
from tests.support.polling import wait_until

pytestmark = pytest.mark.integration

LLAMA3 = "llama3:8b"
# A lease outlives its model's timeout by the lease margin (500 ms here) and the holder's
# safety (250 ms, hermes.service.LEASE_SAFETY_MS): a slot a frozen sandbox kept would come
# back only after that.
RESERVE_S = 0.75
COOLDOWN_S = 2  # HERMES_CIRCUIT_COOLDOWN_S for the pool test
PROBE_S = 1  # HERMES_PROBE_TIMEOUT_S
PROBE_CLAIM_S = 10  # hermes.pools.PROBE_CLAIM_S: how long a frozen probe's claim blocks others


@pytest.fixture
def sandboxes() -> Iterator[Callable[..., list[FrozenSandbox]]]:
    """make(function, env, n): n sandboxes of `function`, started together, ready and
    frozen; all killed at the end of the test."""
    made: list[FrozenSandbox] = []

    def make(function: str, env: dict[str, str], n: int = 1) -> list[FrozenSandbox]:
        new = [FrozenSandbox(function, env) for _ in range(n)]
        made.extend(new)
        return start_all(new)

    yield make
    for sandbox in made:
        sandbox.close()


def ask(sandbox: FrozenSandbox, model: str, prompt: str = "hi") -> tuple[int, dict[str, Any]]:
    return http_answer(sandbox.invoke(post(f"/v1/llm/{model}", {"prompt": prompt})))


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def lease_items(store: DynamoDBLocal) -> list[dict[str, Any]]:
    return store.client().scan(TableName="LeaseTable", ConsistentRead=True)["Items"]  # type: ignore[no-any-return]


def waiting_tickets(store: DynamoDBLocal) -> list[str]:
    """The sort keys of the requests waiting in a queue (hermes.limiter.records: `w#...`)."""
    return [i["sk"]["S"] for i in lease_items(store) if i["sk"]["S"].startswith("w#")]


def test_an_answer_then_freeze_leaves_the_slot_to_another_sandbox(
    hermes_env: dict[str, str],
    dynamodb_local: DynamoDBLocal,
    emulator: OllamaEmulator,
    sandboxes: Callable[..., list[FrozenSandbox]],
) -> None:
    # Given two warm sandboxes (llama3: 1 slot, no waiting: a held slot is a 429 at once)
    a, b = sandboxes("LlmFunction", hermes_env, 2)
    assert a.hermes_file is not None and a.hermes_file.startswith(str(LAYER))  # as on Lambda
    for sandbox in (a, b):
        assert ask(sandbox, "gemma")[0] == 200
    # When A answers a llama3 request and is frozen
    status, body = ask(a, "llama3")
    assert (status, body["model"]) == (200, "llama3"), body
    assert a.frozen
    # Then its slot is already back, with A still frozen
    assert held_lease_ids(dynamodb_local.client()) == []
    # And B is admitted at once: 200, not 429, long before A's lease could have expired
    (status, body), took_s = timed(lambda: ask(b, "llama3"))
    assert status == 200, body
    lease_s = TEST_MODELS["models"]["llama3"]["timeout"] / 1000 + RESERVE_S
    assert took_s < lease_s, f"B took {took_s:.2f} s, A's lease was {lease_s} s"
    assert a.frozen and b.frozen
    assert emulator.stats()["peak_in_flight"][LLAMA3] == 1


@pytest.fixture(scope="module")
def waiting_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TEST_MODELS, with llama3 (1 slot) waiting up to 20 s for a slot and running up to 20 s."""
    models = copy.deepcopy(TEST_MODELS)
    models["models"]["llama3"] |= {"timeout": 20_000, "queue_timeout_ms": 20_000}
    path = tmp_path_factory.mktemp("frozen") / "waiting-models.json"
    path.write_text(json.dumps(models))
    return path


def test_a_waiting_request_handed_the_slot_then_both_frozen_leave_it_to_the_next(
    hermes_env: dict[str, str],
    dynamodb_local: DynamoDBLocal,
    emulator: OllamaEmulator,
    waiting_models: Path,
    sandboxes: Callable[..., list[FrozenSandbox]],
) -> None:
    env = {**hermes_env, "HERMES_MODELS_FILE": str(waiting_models)}
    a, b, c = sandboxes("LlmFunction", env, 3)
    for sandbox in (a, b, c):
        assert ask(sandbox, "gemma")[0] == 200
    # Given A holding llama3's one slot (the emulator holds its call), and B waiting for it
    emulator.set_behaviour(LLAMA3, "hold")
    with ThreadPoolExecutor(2) as pool:
        answer_a = pool.submit(ask, a, "llama3", "first")
        wait_until(lambda: emulator.stats()["in_flight"].get(LLAMA3) == 1, 20, "A calls llama3")
        answer_b = pool.submit(ask, b, "llama3", "second")
        wait_until(lambda: waiting_tickets(dynamodb_local), 20, "B waits in llama3's queue")
        assert not answer_b.done()
        # When A's call ends: A answers and freezes, B is handed the slot, answers, freezes
        emulator.set_behaviour(LLAMA3, "ok")
        httpx.post(f"{emulator.url}/_emulator/release", timeout=10).raise_for_status()
        assert answer_a.result(timeout=30)[0] == 200
        status, body = answer_b.result(timeout=30)
    assert status == 200, body
    assert body["result"].startswith("Echo: second")
    assert a.frozen and b.frozen
    # Then nothing is held and nobody waits, with both still frozen
    assert held_lease_ids(dynamodb_local.client()) == []
    assert waiting_tickets(dynamodb_local) == []
    # And C is admitted at once, long before a lease kept by A or B would have expired
    (status, body), took_s = timed(lambda: ask(c, "llama3", "third"))
    assert status == 200, body
    lease_s = 20 + RESERVE_S
    assert took_s < lease_s / 2, f"C took {took_s:.2f} s; a kept lease lasts {lease_s} s"
    assert a.frozen and b.frozen and c.frozen
    assert emulator.stats()["peak_in_flight"][LLAMA3] == 1


@pytest.fixture
def two_hosts() -> Iterator[dict[str, EmulatorProcess]]:
    hosts = {"gpu1": EmulatorProcess(), "gpu2": EmulatorProcess()}
    try:
        for host in hosts.values():
            host.start()
        yield hosts
    finally:
        for host in hosts.values():
            if host.child is not None:
                host.child.kill()
                host.child.close()


def host_records(store: DynamoDBLocal) -> dict[str, dict[str, int]]:
    """{pk: {open_until, probe_until}} of Hermes' shared host records (epoch ms; 0 = none)."""
    return {
        item["pk"]["S"]: {
            f: int(item[f]["N"]) if f in item else 0 for f in ("open_until", "probe_until")
        }
        for item in lease_items(store)
        if item["sk"]["S"] == "host"
    }


def test_a_pool_whose_hosts_come_back_serves_a_fresh_sandbox_after_the_cooldown(
    hermes_env: dict[str, str],
    dynamodb_local: DynamoDBLocal,
    two_hosts: dict[str, EmulatorProcess],
    tmp_path: Path,
    sandboxes: Callable[..., list[FrozenSandbox]],
) -> None:
    models = {
        "models": {
            "pooled": {
                "max_concurrency": 1,
                "memory_cost": "medium",
                "timeout": 5000,
                "backend_model": "gemma3:1b",
                "hosts": list(two_hosts),
            }
        },
        "hosts": {name: {"memory_budget": 8, "url": h.url} for name, h in two_hosts.items()},
    }
    (tmp_path / "pool.json").write_text(json.dumps(models))
    env = {
        **hermes_env,
        "HERMES_MODELS_FILE": str(tmp_path / "pool.json"),
        "HERMES_CIRCUIT_COOLDOWN_S": str(COOLDOWN_S),
        "HERMES_PROBE_TIMEOUT_S": str(PROBE_S),
    }
    a, b, c = sandboxes("LlmFunction", env, 3)
    assert ask(a, "pooled")[0] == 200  # A is warm; B and C have never served
    # Given both hosts of the pool down: A's request fails on each, answers 503 and opens
    # both circuits, and A stays frozen from now on
    for host in two_hosts.values():
        host.kill()
    status, body = ask(a, "pooled")
    assert (status, body["code"]) == (503, "upstream_unavailable"), body
    records = host_records(dynamodb_local)
    assert len(records) == 2 and all(r["open_until"] for r in records.values()), records
    reopens_at = max(r["open_until"] for r in records.values()) / 1000
    # When both come back, and the cooldown passes
    for host in two_hosts.values():
        host.restart()
    time.sleep(max(0.0, reopens_at - time.time()) + 0.05)
    # Then a fresh sandbox is served within the probe's time (and its own first request's
    # set-up), not after a probe claim lapses
    (status, body), took_s = timed(lambda: ask(b, "pooled"))
    bound_s = PROBE_S + 3.0  # generous for a loaded machine, well under PROBE_CLAIM_S
    if status != 200 or took_s > bound_s:
        records_after_b = host_records(dynamodb_local)
        raise AssertionError(
            f"after the cooldown, fresh sandbox B answered {status} {body.get('code')} in "
            f"{took_s:.2f} s (bound {bound_s:g} s); the pool served again only "
            f"{recovery(c, reopens_at)} after the cooldown ended (a probe claim lasts "
            f"{PROBE_CLAIM_S} s); host records after B (epoch ms, cooldown ended at "
            f"{reopens_at * 1000:.0f}): {records_after_b}"
        )
    assert a.frozen and b.frozen


def recovery(sandbox: FrozenSandbox, since: float, limit_s: float = 20) -> str:
    """How long after `since` (epoch s) `sandbox` first got a 200 (asking every 0.5 s)."""
    while time.time() - since < limit_s:
        if ask(sandbox, "pooled")[0] == 200:
            return f"{time.time() - since:.1f} s"
        time.sleep(0.5)
    return f"more than {limit_s:g} s"


@pytest.fixture
def jobs_queue() -> tuple[str, str]:
    """(SQS endpoint, URL of a fresh queue) on an in-process moto server."""
    endpoint = start_embedded_moto()
    sqs = boto3.client("sqs", endpoint_url=endpoint)
    url = sqs.create_queue(QueueName=f"frozen-jobs-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    return endpoint, url


def test_a_jobs_status_is_final_when_the_workers_handler_returns(
    hermes_env: dict[str, str],
    dynamodb_local: DynamoDBLocal,
    jobs_queue: tuple[str, str],
    sandboxes: Callable[..., list[FrozenSandbox]],
) -> None:
    endpoint, queue_url = jobs_queue
    env = {**hermes_env, "AWS_ENDPOINT_URL_SQS": endpoint, "HERMES_JOBS_QUEUE_URL": queue_url}
    jobs = sandboxes("JobsFunction", env)[0]
    worker = sandboxes("WorkerFunction", env)[0]
    # Given a job submitted through the jobs API (its sandbox frozen after the 202)
    status, job = http_answer(jobs.invoke(post("/v1/jobs/gemma", {"prompt": "tell me a story"})))
    assert status == 202, job
    sqs = boto3.client("sqs", endpoint_url=endpoint)
    messages = sqs.receive_message(
        QueueUrl=queue_url, AttributeNames=["All"], MaxNumberOfMessages=1, WaitTimeSeconds=5
    )["Messages"]
    # When the worker's handler runs its message and returns
    assert worker.invoke(sqs_event(messages[0])) == {"batchItemFailures": []}
    # Then, the worker already frozen, the job's record is final, with its result
    assert worker.frozen
    item = dynamodb_local.client().get_item(
        TableName="JobsTable", Key={"job_id": {"S": job["job_id"]}}, ConsistentRead=True
    )["Item"]
    assert item["status"]["S"] == "succeeded", item
    result = json.loads(zlib.decompress(item["result_z"]["B"]))
    assert result["result"].startswith("Echo: tell"), result
    # And the jobs API says so
    status, seen = http_answer(jobs.invoke(http_event("GET", f"/v1/jobs/{job['job_id']}")))
    assert (status, seen["status"], seen["result"]) == (200, "succeeded", result)
    assert jobs.frozen and worker.frozen
