"""Jobs end to end in the local runner: HTTP submit → local SQS → the runner's worker poller →
the emulator → poll for the result. SQS is a moto server the test owns, so it can inject
duplicate deliveries and read the dead-letter queue."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pytest

from local.embedded_moto import start_embedded_moto
from tests.support.hermes_process import HermesProcess
from tests.support.ollama_emulator import OllamaEmulator
from tests.support.polling import wait_until


@pytest.fixture(scope="module")
def sqs_endpoint() -> str:
    return start_embedded_moto()


@pytest.fixture(scope="module")
def runner(
    sqs_endpoint: str, runner_env: dict[str, str], dynamodb_local: Any
) -> Iterator[HermesProcess]:
    dynamodb_local.reset_tables()
    env = {
        **runner_env,
        "AWS_ENDPOINT_URL_SQS": sqs_endpoint,
        "HERMES_PARAMETERS": "JobMaxAttempts=3",
        "HERMES_JOB_RETRY_BASE_S": "1",
        "HERMES_MAX_PROMPT_CHARS": "100000",  # the default: full-size prompts as jobs
    }
    with HermesProcess(env) as process:
        yield process


@pytest.fixture
def sqs(sqs_endpoint: str) -> Any:
    return boto3.client("sqs", endpoint_url=sqs_endpoint)


@pytest.fixture(autouse=True)
def clean(emulator: OllamaEmulator) -> None:
    emulator.reset()


def submit(runner: HermesProcess, model: str, prompt: str = "hi") -> str:
    response = httpx.post(f"{runner.url}/v1/jobs/{model}", json={"prompt": prompt}, timeout=10)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def wait_for(runner: HermesProcess, job_id: str, timeout_s: float = 20) -> list[dict[str, Any]]:
    """Poll until the job finishes; returns every distinct state seen on the way."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{runner.url}/v1/jobs/{job_id}", timeout=5).json()
        if not seen or (job["status"], job.get("code")) != (
            seen[-1]["status"],
            seen[-1].get("code"),
        ):
            seen.append(job)
        if job["status"] in ("succeeded", "failed"):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {seen}")


def test_submit_poll_result(runner: HermesProcess) -> None:
    states = wait_for(runner, submit(runner, "gemma", "tell me a story"))
    assert states[-1]["status"] == "succeeded"
    assert states[-1]["result"]["result"].startswith("Echo: tell")


def test_a_duplicate_delivery_calls_the_model_once(
    runner: HermesProcess, emulator: OllamaEmulator, sqs: Any
) -> None:
    emulator.set_behaviour(model="gemma3:1b", mode="ok", delay_ms=300)
    job_id = submit(runner, "gemma")
    queue = sqs.get_queue_url(QueueName="JobsQueue")["QueueUrl"]
    sqs.send_message(
        QueueUrl=queue, MessageBody=json.dumps({"job_id": job_id})
    )  # SQS at-least-once
    assert wait_for(runner, job_id)[-1]["status"] == "succeeded"

    # Both deliveries consumed: none waiting and none received but not yet deleted (the poller
    # deletes a message once the worker has handled it, so the duplicate's run is over).
    def consumed() -> bool:
        counts = sqs.get_queue_attributes(
            QueueUrl=queue,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return set(counts.values()) == {"0"}

    wait_until(consumed, 20, "both deliveries of the job consumed")
    assert emulator.stats()["requests"]["gemma3:1b"] == 1


def test_a_busy_model_delays_a_job_instead_of_failing_it(
    runner: HermesProcess, emulator: OllamaEmulator
) -> None:
    emulator.set_behaviour(model="llama3:8b", mode="hang")  # a sync request holds llama3's slot
    holder = threading.Thread(
        target=lambda: httpx.post(f"{runner.url}/v1/llm/llama3", json={"prompt": "hi"}, timeout=30),
        daemon=True,
    )
    holder.start()
    wait_until(
        lambda: emulator.stats()["in_flight"].get("llama3:8b", 0) >= 1, 15, "llama3's slot held"
    )
    emulator.set_behaviour(model="llama3:8b", mode="ok")  # later calls answer
    states = wait_for(runner, submit(runner, "llama3"), timeout_s=30)
    assert ("queued", "model_busy") in [(s["status"], s.get("code")) for s in states]
    assert states[-1]["status"] == "succeeded"
    assert states[-1]["waits"] >= 1
    holder.join(timeout=10)


def test_a_poisoned_job_lands_in_the_dead_letter_queue_and_reads_failed(
    runner: HermesProcess, emulator: OllamaEmulator, sqs: Any
) -> None:
    emulator.set_behaviour(model="mistral:7b", mode="error", status=500)
    job_id = submit(runner, "mistral")
    final = wait_for(runner, job_id, timeout_s=30)[-1]
    assert (final["status"], final["code"], final["attempts"]) == ("failed", "upstream_error", 3)
    dlq = sqs.get_queue_url(QueueName="JobsDLQ")["QueueUrl"]
    bodies = wait_until(
        lambda: [
            m["Body"]
            for m in sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10).get("Messages", [])
        ],
        10,
        "a message in the dead-letter queue",
        interval_s=0.2,
    )
    assert {"job_id": job_id} in [json.loads(b) for b in bodies]


def test_a_non_ascii_prompt_the_llm_route_accepts_is_accepted_as_a_job(
    runner: HermesProcess,
) -> None:
    # 100,000 '€': within HERMES_MAX_PROMPT_CHARS as /v1/llm counts, 300 KB of UTF-8, and the
    # job record in DynamoDB Local (which enforces the 400 KB item limit) still holds it.
    prompt = "€" * 100_000
    sync = httpx.post(f"{runner.url}/v1/llm/gemma", json={"prompt": prompt}, timeout=30)
    assert sync.status_code == 200, sync.text[:300]
    final = wait_for(runner, submit(runner, "gemma", prompt))[-1]
    assert final["status"] == "succeeded", final
    assert final["result"]["result"].startswith("Echo: €€€")
    assert "error" not in final and "code" not in final


def test_jobs_run_concurrently_as_the_worker_would_within_the_models_slots(
    runner: HermesProcess, emulator: OllamaEmulator
) -> None:
    """Issue 22: four jobs of gemma (2 slots): the runner's poller runs batches at once up to
    the worker's MaximumConcurrency (WorkerMaxConcurrency, 5), so two answer at a time,
    never three; the ones refused a slot wait (queued, model_busy) and then succeed."""
    emulator.set_behaviour(model="gemma3:1b", mode="ok", delay_ms=1500)
    jobs = [submit(runner, "gemma", f"job {i}") for i in range(4)]
    finals = [wait_for(runner, job_id, timeout_s=45)[-1] for job_id in jobs]
    assert [f["status"] for f in finals] == ["succeeded"] * 4, finals
    stats = emulator.stats()
    assert stats["peak_in_flight"]["gemma3:1b"] == 2, stats["peak_in_flight"]
