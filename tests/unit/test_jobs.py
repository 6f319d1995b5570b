"""Direct invocation, the jobs API and the SQS worker, through their Lambda entry points,
on moto (DynamoDB + SQS) and the Ollama emulator."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from hermes.service import get_service, host_pool, model_counter
from local.runner import ensure_queues
from local.template import load_template
from tests.support.lambda_calls import LambdaContext, event, load_function
from tests.support.models_file import use_models
from tests.support.ollama_emulator import OllamaEmulator


@pytest.fixture(autouse=True)
def env(aws: None, emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """moto tables (from the fixture) plus the template's queues, DLQ redrive included."""
    from hermes.idempotency import _persistence
    from hermes.jobs import get_jobs

    emulator.reset()
    # The runner's own queue setup, with the template's redrive after 3 deliveries.
    monkeypatch.setenv("HERMES_PARAMETERS", "JobMaxAttempts=3")
    urls = ensure_queues(load_template())
    monkeypatch.setenv("OLLAMA_URL", emulator.url)
    monkeypatch.setenv("HERMES_JOBS_QUEUE_URL", urls["JobsQueue"])
    monkeypatch.setenv("HERMES_JOBS_DLQ_URL", urls["JobsDLQ"])
    monkeypatch.setenv("HERMES_JOB_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("HERMES_JOB_RETRY_BASE_S", "0")
    for cached in (get_jobs, _persistence):
        cached.cache_clear()
    from hermes.aws import client

    client.cache_clear()  # clients bound to this test's moto
    return urls


def direct(payload: dict[str, Any], remaining_ms: int = 60_000) -> dict[str, Any]:
    return load_function("llm").handler(payload, LambdaContext(remaining_ms))  # type: ignore[no-any-return]


def calls(emulator: OllamaEmulator, tag: str = "gemma3:1b") -> int:
    return emulator.stats()["requests"].get(tag, 0)


# -- direct invocation ------------------------------------------------------------------


def test_a_direct_invoke_returns_the_result() -> None:
    response = direct(_direct_event())
    assert response["result"] and response["request_id"] == "order-42-summary"


def _direct_event() -> dict[str, Any]:
    from local.template import ROOT

    return json.loads((ROOT / "events" / "direct_generate.json").read_text())


def test_a_retried_direct_invoke_does_not_call_the_model_twice(emulator: OllamaEmulator) -> None:
    first = direct(_direct_event())
    second = direct(_direct_event())
    assert second["result"] == first["result"]
    assert calls(emulator) == 1


def test_a_reused_request_id_with_another_prompt_is_refused() -> None:
    direct(_direct_event())
    reused = direct({**_direct_event(), "prompt": "something else"})
    assert (reused["status"], reused["code"]) == (400, "invalid_request")


def test_a_busy_model_is_not_remembered_as_the_answer(emulator: OllamaEmulator) -> None:
    service = get_service()
    config = service.model("llama3")
    lease = service.limiter.acquire(
        host_pool("default"), service.counters("llama3", config), 60_000
    )
    payload = {"model": "llama3", "prompt": "hi", "request_id": "r-1"}
    busy = direct(payload)
    assert (busy["status"], busy["code"]) == (429, "model_busy")
    service.limiter.release(lease)
    assert direct(payload)["result"]
    assert calls(emulator, "llama3:8b") == 1


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"model": "gpt5", "prompt": "hi"}, "model_not_configured"),
        ({"model": "gemma"}, "invalid_request"),
        ({"model": "gemma", "prompt": "hi", "request_id": ""}, "invalid_request"),
        ({"model": "gemma", "prompt": "hi", "request_id": 7}, "invalid_request"),
    ],
)
def test_bad_direct_invokes_get_an_error_object(payload: dict[str, Any], code: str) -> None:
    assert direct(payload)["code"] == code


def test_an_unknown_event_shape_gets_a_clear_error_not_an_exception() -> None:
    from local.template import ROOT

    response = direct(json.loads((ROOT / "events" / "direct_unknown_event.json").read_text()))
    assert response["code"] == "invalid_request" and "direct" in response["error"]


# -- jobs API + worker ---------------------------------------------------------------------


def submit(
    model: str = "gemma", body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = event(
        "jobs_submit.json", path=f"/v1/jobs/{model}", body=json.dumps(body or {"prompt": "hi"})
    )
    request["headers"] = {**request["headers"], **(headers or {})}
    response = load_function("jobs").handler(request, LambdaContext())
    return response["statusCode"], json.loads(response["body"]), response["headers"]


def read(job_id: str, caller: str | None = None) -> tuple[int, dict[str, Any]]:
    """GET /v1/jobs/{job_id}, anonymously or as `caller` (its IAM principal)."""
    request = event("jobs_get.json", path=f"/v1/jobs/{job_id}", pathParameters={"job_id": job_id})
    if caller is not None:
        request["requestContext"]["authorizer"] = {"iam": {"userArn": caller}}
    response = load_function("jobs").handler(request, LambdaContext())
    return response["statusCode"], json.loads(response["body"])


def deliver(
    urls: dict[str, str], messages: list[dict[str, Any]] | None = None, context: Any = None
) -> dict[str, Any]:
    """One SQS batch to the worker, as the event source mapping would send it."""
    sqs = boto3.client("sqs")
    if messages is None:
        messages = sqs.receive_message(
            QueueUrl=urls["JobsQueue"], MaxNumberOfMessages=10, AttributeNames=["All"]
        ).get("Messages", [])
    template = event("sqs_job.json")["Records"][0]
    records = [
        {
            **template,
            "messageId": m["MessageId"],
            "receiptHandle": m["ReceiptHandle"],
            "body": m["Body"],
            "attributes": {**template["attributes"], **m.get("Attributes", {})},
        }
        for m in messages
    ]
    return load_function("worker").handler({"Records": records}, context or LambdaContext())  # type: ignore[no-any-return]


def test_a_job_is_queued_then_run_by_the_worker(env: dict[str, str]) -> None:
    status, job, headers = submit()
    assert status == 202 and job["status"] == "queued"
    assert headers["location"] == f"/v1/jobs/{job['job_id']}" == job["status_url"]
    assert read(job["job_id"]) == (200, {**read(job["job_id"])[1], "status": "queued"})
    assert deliver(env) == {"batchItemFailures": []}
    status, done = read(job["job_id"])
    assert (status, done["status"], done["attempts"]) == (200, "succeeded", 1)
    assert done["result"]["result"]


def test_bad_job_submissions_are_refused_before_queueing() -> None:
    assert submit("gpt5")[:2][0] == 404
    status, body, _ = submit(body={"prompt": ""})
    assert (status, body["code"]) == (400, "invalid_request")
    assert read("does-not-exist")[0] == 404


@pytest.mark.parametrize(
    ("header", "body", "expected"),
    [
        ("HIGH", {"prompt": "hi"}, "high"),  # the header, in any case
        ("high", {"prompt": "hi", "priority": "low"}, "low"),  # the body wins
        (None, {"prompt": "hi", "priority": "high"}, "high"),
        (None, {"prompt": "hi"}, "normal"),
    ],
)
def test_a_job_keeps_its_priority_until_the_worker_runs_it(
    env: dict[str, str],
    emulator: OllamaEmulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    header: str | None,
    body: dict[str, Any],
    expected: str,
) -> None:
    from tests.support.priority_probe import admitted_priority, probe_models

    probe_models(tmp_path, monkeypatch, "gemma")
    pool = host_pool("default")

    def send() -> None:
        # Given a job submitted with a priority in its header, its body, both or neither
        headers = {"x-hermes-priority": header} if header else {}
        calls = len(emulator.received())
        status, job, _ = submit(body=body, headers=headers)
        # Then the job shows the priority it will run with
        assert (status, job["priority"]) == (202, expected)
        assert read(job["job_id"])[1]["priority"] == expected
        # And nothing ran yet: no model call, no slot taken but the probe's held one
        assert len(emulator.received()) == calls
        assert get_service().limiter.usage([pool])[pool].get(model_counter("gemma")) == 1
        # When the worker runs it (a later invocation, from the stored request alone)
        worked = deliver(env, context=LambdaContext(remaining_ms=120_000))
        assert worked == {"batchItemFailures": []}
        assert read(job["job_id"])[1]["status"] == "succeeded"

    # Then it was admitted with that priority
    calls = len(emulator.received())
    assert admitted_priority(monkeypatch, "gemma", send) == expected
    assert len(emulator.received()) - calls == (1 if expected == "high" else 2)


def test_a_job_with_a_bad_priority_is_refused_before_queueing(env: dict[str, str]) -> None:
    status, body, _ = submit(body={"prompt": "hi", "priority": "urgent"})
    assert (status, body["code"], body["field"]) == (400, "invalid_request", "priority")
    status, body, _ = submit(headers={"x-hermes-priority": "urgent"})
    assert (status, body["code"], body["field"]) == (400, "invalid_request", "X-Hermes-Priority")
    queued = boto3.client("sqs").receive_message(QueueUrl=env["JobsQueue"]).get("Messages", [])
    assert queued == []


def test_a_redelivered_message_does_not_call_the_model_twice(
    env: dict[str, str], emulator: OllamaEmulator
) -> None:
    _, job, _ = submit()
    message = boto3.client("sqs").receive_message(
        QueueUrl=env["JobsQueue"], AttributeNames=["All"]
    )["Messages"]
    ddb = boto3.client("dynamodb")
    key = {"job_id": {"S": job["job_id"]}}
    queued = ddb.get_item(TableName="JobsTable", Key=key)["Item"]
    deliver(env, message)
    # The worker crashed after the model answered but before the job was marked: redelivery.
    ddb.put_item(TableName="JobsTable", Item=queued)
    deliver(env, message)
    assert read(job["job_id"])[1]["status"] == "succeeded"
    assert calls(emulator) == 1


def test_a_busy_model_delays_a_job_instead_of_failing_it(env: dict[str, str]) -> None:
    service = get_service()
    lease = service.limiter.acquire(
        host_pool("default"), service.counters("llama3", service.model("llama3")), 60_000
    )
    _, job, _ = submit("llama3")
    for _ in range(5):  # more rounds than the queue's 3 delivery attempts: waiting is free
        assert deliver(env) == {"batchItemFailures": []}
        view = read(job["job_id"])[1]
        assert (view["status"], view["code"]) == ("queued", "model_busy")
    service.limiter.release(lease)
    assert deliver(env) == {"batchItemFailures": []}
    assert read(job["job_id"])[1]["status"] == "succeeded"


def test_a_job_waiting_past_its_limit_fails_as_busy_and_is_dead_lettered(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given llama3's only slot is held and jobs may wait 1 s
    monkeypatch.setenv("HERMES_JOB_MAX_WAIT_S", "1")
    service = get_service()
    service.limiter.acquire(
        host_pool("default"), service.counters("llama3", service.model("llama3")), 60_000
    )
    _, job, _ = submit("llama3")
    time.sleep(1.1)
    # When the worker finds the model still busy after the wait
    assert deliver(env) == {"batchItemFailures": []}
    # Then the job reads failed, saying why, and its message sits in the dead-letter queue
    view = read(job["job_id"])[1]
    assert (view["status"], view["code"]) == ("failed", "model_busy")
    assert "for a free slot of model 'llama3'" in view["error"]
    assert "HERMES_JOB_MAX_WAIT_S" in view["error"] and "giving up" in view["error"]
    sqs = boto3.client("sqs")
    dlq = sqs.receive_message(QueueUrl=env["JobsDLQ"], MessageAttributeNames=["All"]).get(
        "Messages", []
    )
    assert [json.loads(m["Body"])["job_id"] for m in dlq] == [job["job_id"]]
    assert dlq[0]["MessageAttributes"]["code"]["StringValue"] == "model_busy"
    assert sqs.receive_message(QueueUrl=env["JobsQueue"]).get("Messages", []) == []


def test_the_worker_is_given_the_dead_letter_queue_as_the_runner_resolves_it(
    env: dict[str, str],
) -> None:
    from local.template import functions, resolve

    template = load_template()
    worker = functions(template)["WorkerFunction"].environment
    assert resolve(worker["HERMES_JOBS_DLQ_URL"], template, env) == env["JobsDLQ"]


def test_a_job_failing_every_attempt_is_marked_failed_and_dead_lettered(
    env: dict[str, str], emulator: OllamaEmulator
) -> None:
    emulator.set_behaviour(model="gemma3:1b", mode="error", status=500)
    _, job, _ = submit()
    for attempt in (1, 2, 3):
        assert len(deliver(env)["batchItemFailures"]) == 1
        assert read(job["job_id"])[1]["status"] == ("failed" if attempt == 3 else "queued")
    left = boto3.client("sqs").receive_message(QueueUrl=env["JobsQueue"]).get("Messages", [])
    assert left == []  # SQS moved it to the dead-letter queue
    dlq = boto3.client("sqs").receive_message(QueueUrl=env["JobsDLQ"])["Messages"]
    assert json.loads(dlq[0]["Body"]) == {"job_id": job["job_id"]}
    assert read(job["job_id"])[1]["code"] == "upstream_error"


def test_a_job_ollama_cannot_run_fails_at_once(
    env: dict[str, str], emulator: OllamaEmulator
) -> None:
    emulator.set_behaviour(model="gemma3:1b", mode="not_found")
    _, job, _ = submit()
    assert deliver(env) == {"batchItemFailures": []}
    assert read(job["job_id"])[1]["code"] == "model_not_found"


def test_one_bad_message_does_not_redo_the_batch(
    env: dict[str, str], emulator: OllamaEmulator
) -> None:
    _, job, _ = submit()
    sqs = boto3.client("sqs")
    sqs.send_message(QueueUrl=env["JobsQueue"], MessageBody="not json")
    messages = sqs.receive_message(
        QueueUrl=env["JobsQueue"], MaxNumberOfMessages=10, AttributeNames=["All"]
    )["Messages"]
    assert len(messages) == 2
    result = deliver(env, messages)
    bad = next(m["MessageId"] for m in messages if m["Body"] == "not json")
    assert result == {"batchItemFailures": [{"itemIdentifier": bad}]}
    assert read(job["job_id"])[1]["status"] == "succeeded"


def test_a_sync_request_longer_than_the_http_budget_points_to_the_jobs_api(
    emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERMES_SYNC_BUDGET_MS", "1000")
    emulator.set_behaviour(model="llama3:8b", mode="hang")
    response = load_function("llm").handler(
        event("llm_generate.json", path="/v1/llm/llama3"), LambdaContext()
    )
    body = json.loads(response["body"])
    assert (response["statusCode"], body["code"], body["jobs_url"]) == (
        504,
        "upstream_timeout",
        "/v1/jobs/llama3",
    )
    assert "POST /v1/jobs/llama3" in body["error"]


def test_the_worker_refuses_events_that_are_not_sqs_batches() -> None:
    assert (
        load_function("worker").handler({"hello": 1}, LambdaContext())["code"] == "invalid_request"
    )


# -- issue 10, items 5 and 6 ------------------------------------------------------------


class ClockContext(LambdaContext):
    """A Lambda context whose remaining time runs down with the wall clock, as Lambda's does."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))


def test_two_long_jobs_in_one_batch_each_get_their_model_s_whole_timeout(
    env: dict[str, str],
    emulator: OllamaEmulator,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The deployed case is llama3: 45 s jobs in a worker of 65 s. Scaled down here to a 6 s
    model, 1 s of job overhead and 3 s of start-up, i.e. a worker timeout of 10 s. (A loaded
    machine has 3 s to start the worker and 3 s more than the generation's 3 s to finish the
    first job; the second cannot get its 6 s however fast the first ran: 10 - 3 < 6 + 1.)"""
    import hermes.config
    import hermes.http

    monkeypatch.setattr(hermes.config, "JOB_OVERHEAD_S", 1, raising=False)
    monkeypatch.setattr(hermes.config, "WORKER_START_S", 3, raising=False)
    # The time kept back for the release, scaled down with the rest (it is part of the
    # overhead: 3.5 s of the deployed 15 s).
    monkeypatch.setattr(hermes.http, "LAMBDA_SAFETY_S", 0.5)
    models = json.loads(hermes.config.DEFAULT_MODELS_FILE.read_text())
    models["models"] = {"llama3": {**models["models"]["llama3"], "timeout": 6000}}
    models["models"]["llama3"]["max_concurrency"] = 2
    models["hosts"]["default"]["memory_budget"] = 16
    use_models(monkeypatch, tmp_path, models)
    monkeypatch.setenv("HERMES_WORKER_TIMEOUT_S", "10")
    # Given two llama3 jobs whose generations take 3 s of their 6 s, in one SQS batch
    emulator.set_behaviour(model="llama3:8b", delay_ms=3000)
    first, second = submit("llama3")[1]["job_id"], submit("llama3")[1]["job_id"]
    sqs = boto3.client("sqs")
    batch: list[dict[str, Any]] = []
    while len(batch) < 2:
        batch += sqs.receive_message(
            QueueUrl=env["JobsQueue"], MaxNumberOfMessages=10, AttributeNames=["All"]
        ).get("Messages", [])
    batch.sort(key=lambda m: json.loads(m["Body"])["job_id"] != first)
    # When one worker invocation with the worker's whole timeout gets both
    result = deliver(env, batch, ClockContext(10))
    # Then the first ran, and the second, which could no longer get its 6 s, was handed back
    # as a fresh message: no attempt used up, no failure reported, the model never called
    assert result == {"batchItemFailures": []}
    assert read(first)[1]["status"] == "succeeded"
    waiting = read(second)[1]
    assert (waiting["status"], waiting["attempts"], waiting.get("code")) == ("queued", 0, None)
    assert calls(emulator, "llama3:8b") == 1
    again = sqs.receive_message(QueueUrl=env["JobsQueue"], AttributeNames=["All"])["Messages"]
    assert [json.loads(m["Body"])["job_id"] for m in again] == [second]
    assert again[0]["Attributes"]["ApproximateReceiveCount"] == "1"
    # And the next invocation runs it with its whole timeout
    assert deliver(env, again, ClockContext(10)) == {"batchItemFailures": []}
    done = read(second)[1]
    assert (done["status"], done["attempts"]) == ("succeeded", 1)


def test_a_model_the_worker_cannot_serve_is_refused_at_load(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hermes.config import ConfigError
    from hermes.jobs import get_jobs

    # Given a worker of 60 s and llama3's 45 s timeout plus the jobs' overhead (65 s)
    monkeypatch.setenv("HERMES_WORKER_TIMEOUT_S", "60")
    with pytest.raises(ConfigError, match=r"models\.llama3\.timeout.*HERMES_WORKER_TIMEOUT_S"):
        get_jobs()
    with pytest.raises(ConfigError, match=r"models\.llama3\.timeout"):
        deliver(env, [{"MessageId": "m", "ReceiptHandle": "r", "Body": "{}"}])


def test_a_succeeded_job_shows_no_error_from_an_earlier_attempt(env: dict[str, str]) -> None:
    service = get_service()
    lease = service.limiter.acquire(
        host_pool("default"), service.counters("llama3", service.model("llama3")), 60_000
    )
    _, job, _ = submit("llama3")
    deliver(env)
    assert read(job["job_id"])[1]["code"] == "model_busy"
    service.limiter.release(lease)
    deliver(env)
    view = read(job["job_id"])[1]
    assert view["status"] == "succeeded"
    assert "error" not in view and "code" not in view


def test_a_non_ascii_prompt_the_llm_route_accepts_is_accepted_as_a_job(
    env: dict[str, str],
) -> None:
    # Given 100,000 '€' (300 KB of UTF-8): within HERMES_MAX_PROMPT_CHARS, as /v1/llm counts
    body = {"prompt": "€" * 100_000}
    sync = load_function("llm").handler(
        event("llm_generate.json", body=json.dumps(body)), LambdaContext()
    )
    assert sync["statusCode"] == 200
    # When it is submitted as a job, Then it is queued and runs like any other
    status, job, _ = submit("gemma", body)
    assert status == 202, job
    assert deliver(env) == {"batchItemFailures": []}
    done = read(job["job_id"])[1]
    assert done["status"] == "succeeded"
    assert done["result"]["result"].startswith("Echo: €€€")


def test_a_result_too_large_for_the_job_record_fails_the_job(
    env: dict[str, str], emulator: OllamaEmulator
) -> None:
    import random

    # Given a model that answers ~600 KB of text that does not compress (random words)
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    words = ["".join(rng.choices(alphabet, k=8)) for _ in range(11_000)]
    emulator.set_behaviour(model="gemma3:1b", tokens=6 * len(words))
    _, job, _ = submit("gemma", {"prompt": " ".join(words)})
    # When the worker runs it
    assert deliver(env) == {"batchItemFailures": []}
    # Then the job fails at once with result_too_large, never left running or retried
    view = read(job["job_id"])[1]
    assert (view["status"], view["code"]) == ("failed", "result_too_large")
    assert "result" not in view
    assert calls(emulator) == 1
    assert boto3.client("sqs").receive_message(QueueUrl=env["JobsQueue"]).get("Messages") is None


def test_queues_made_earlier_with_other_settings_take_the_template_s(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the queues exist with another redrive (JobMaxAttempts=3, from the fixture)
    monkeypatch.setenv("HERMES_PARAMETERS", "JobMaxAttempts=7")
    # When a runner (or sam local's wiring) sets them up again with other parameters
    urls = ensure_queues(load_template())
    # Then it reuses them and the template's settings win
    assert urls == {name: env[name] for name in urls}
    attributes = boto3.client("sqs").get_queue_attributes(
        QueueUrl=urls["JobsQueue"], AttributeNames=["RedrivePolicy"]
    )["Attributes"]
    assert json.loads(attributes["RedrivePolicy"])["maxReceiveCount"] == 7


def test_a_job_runs_as_its_submitter_under_its_limits(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The submitter (the IAM principal) is stored with the job and the worker runs the job as
    that caller: at its cap, the job stays queued (caller_busy) and runs once a slot frees."""
    from hermes.callers import caller_pool
    from hermes.config import DEFAULT_MODELS_FILE, get_settings
    from hermes.errors import CallerBusy
    from hermes.jobs import get_jobs
    from hermes.limiter import Counter
    from hermes.service import get_service

    alice = "arn:aws:iam::123456789012:user/alice"
    models = json.loads(DEFAULT_MODELS_FILE.read_text())
    models["callers"] = {alice: {"max_concurrency": 1}}
    use_models(monkeypatch, tmp_path, models)
    for cached in (get_settings, get_service, get_jobs):
        cached.cache_clear()
    request = event("jobs_submit.json", path="/v1/jobs/gemma", body=json.dumps({"prompt": "hi"}))
    request["requestContext"]["authorizer"] = {"iam": {"userArn": alice}}
    job = json.loads(load_function("jobs").handler(request, LambdaContext())["body"])
    assert read(job["job_id"], alice)[1]["caller"] == alice
    slot = Counter("inflight", 1, 1, CallerBusy, "alice")
    held = get_service().limiter.acquire(caller_pool(alice), [slot], 60_000)
    deliver(env)
    _, waiting = read(job["job_id"], alice)
    assert (waiting["status"], waiting["code"]) == ("queued", "caller_busy"), waiting
    get_service().limiter.release(held)
    message = boto3.client("sqs").receive_message(
        QueueUrl=env["JobsQueue"], WaitTimeSeconds=0, AttributeNames=["All"]
    )
    while not message.get("Messages"):  # the retry is a delayed message (moto honours delays)
        message = boto3.client("sqs").receive_message(
            QueueUrl=env["JobsQueue"], WaitTimeSeconds=1, AttributeNames=["All"]
        )
    deliver(env, message["Messages"])
    assert read(job["job_id"], alice)[1]["status"] == "succeeded"


def test_a_job_and_a_retried_direct_invoke_in_one_process_each_run_once(
    env: dict[str, str], emulator: OllamaEmulator
) -> None:
    """The local runner serves the worker and the LLM function in one process: a job's
    idempotency (job_id) must not take over the direct invokes' (request_id), whichever
    comes first (powertools configures a persistence layer once)."""
    _, job, _ = submit()
    deliver(env)
    assert read(job["job_id"])[1]["status"] == "succeeded"
    payload = {"model": "gemma", "prompt": "hi", "request_id": "r-after-a-job"}
    assert direct(payload)["result"] == direct(payload)["result"]
    assert calls(emulator) == 2  # the job's call, then one for both invokes


SECRET_URL = "http://ops:hunter2@127.0.0.1:9/t/s3cret-path/?token=s3cret-query"


def test_a_failed_jobs_record_never_shows_the_hosts_secrets(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host URL with a user, password, path token and query (an authenticating proxy's):
    the job fails as unreachable, and its record names the host without any of them."""
    monkeypatch.setenv("OLLAMA_URL", SECRET_URL)
    _, job, _ = submit()
    for _ in (1, 2, 3):
        deliver(env)
    _, record = read(job["job_id"])
    assert (record["status"], record["code"]) == ("failed", "upstream_unavailable"), record
    assert "http://127.0.0.1:9/…" in record["error"]
    for secret in ("ops", "hunter2", "s3cret"):
        assert secret not in json.dumps(record)


ALICE = "arn:aws:iam::123456789012:user/alice"
BOB = "arn:aws:iam::123456789012:user/bob"


def test_a_job_belongs_to_its_submitter(env: dict[str, str]) -> None:
    """Another caller reading a job gets the 404 of an unknown id: job ids cannot be probed."""
    request = event("jobs_submit.json", path="/v1/jobs/gemma", body=json.dumps({"prompt": "hi"}))
    request["requestContext"]["authorizer"] = {"iam": {"userArn": ALICE}}
    job = json.loads(load_function("jobs").handler(request, LambdaContext())["body"])
    deliver(env)
    assert read(job["job_id"], ALICE)[1]["status"] == "succeeded"
    for other in (BOB, None):
        status, answer = read(job["job_id"], other)
        assert (status, answer["code"]) == (404, "job_not_found"), answer
        assert "result" not in answer
    unknown = read("0" * 32, BOB)[1]
    assert answer["error"].replace(job["job_id"], "0" * 32) == unknown["error"]


def test_a_direct_invokes_request_id_is_scoped_to_its_caller(emulator: OllamaEmulator) -> None:
    """Bob reusing Alice's request_id runs his own request, and never gets her answer; each
    caller's retry still gets its own stored answer."""
    alice = direct({"model": "gemma", "prompt": "alice's", "request_id": "r1", "caller": ALICE})
    bob = direct({"model": "gemma", "prompt": "bob's", "request_id": "r1", "caller": BOB})
    assert "result" in alice and "result" in bob, (alice, bob)
    assert calls(emulator) == 2
    again = direct({"model": "gemma", "prompt": "alice's", "request_id": "r1", "caller": ALICE})
    assert again == alice and calls(emulator) == 2


def test_a_600_kb_direct_result_is_stored_compressed_and_replayed(
    emulator: OllamaEmulator,
) -> None:
    """Issue 22: a result over DynamoDB's 400 KB item fits its idempotency record
    compressed, and the retry gets it without a second model call."""
    emulator.set_behaviour(model="gemma3:1b", mode="ok", tokens=110_000)
    payload = {"model": "gemma", "prompt": "hello world", "request_id": "big-1"}
    first = direct(payload)
    assert len(first["result"]) > 600_000, first.get("error")
    assert direct(payload) == first and calls(emulator) == 1
    records = boto3.client("dynamodb").scan(TableName="IdempotencyTable")["Items"]
    assert len(records) == 1 and len(json.dumps(records[0])) < 50_000


def test_a_result_too_large_even_compressed_is_answered_with_a_note_naming_the_limit(
    emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10,000 random words echoed 60,000 times (~600 KB that zlib cannot shrink below the
    record's room): the caller that produced it gets it, with `stored: false` and why; a
    retry runs the model again rather than failing on a record it cannot have."""
    import random
    import string

    from hermes.config import get_settings
    from hermes.idempotency import MAX_RESULT_BYTES

    monkeypatch.setenv("HERMES_MAX_PROMPT_CHARS", "200000")
    get_settings.cache_clear()
    rng = random.Random(7)
    words = " ".join("".join(rng.choices(string.ascii_lowercase, k=9)) for _ in range(10_000))
    emulator.set_behaviour(model="gemma3:1b", mode="ok", tokens=60_000)
    payload = {"model": "gemma", "prompt": words, "request_id": "huge-1"}
    answer = direct(payload)
    assert len(answer["result"]) > 500_000 and answer["stored"] is False, answer.get("error")
    assert (
        f"at most {MAX_RESULT_BYTES}" in answer["note"] and "runs the model again" in answer["note"]
    )
    assert "result" in direct(payload) and calls(emulator) == 2
