"""Every events/ file through `sam local invoke` with the function it is for (HTTP API
events, the direct invokes, the SQS batch), each answer compared with what the Docker-free
runner gives for the same event against the same store, queues and emulator."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import pytest

from local.sam import api
from local.sam.docker_engine import Engine
from local.sam.events import function_for
from local.sam.wiring import Wiring, endpoints
from local.template import ROOT
from tests.sam_local.answers import (
    EVENTS,
    Answer,
    from_http,
    from_lambda,
    load,
    request_for,
)
from tests.sam_local.conftest import PARAMETERS, PARITY, timed
from tests.support.hermes_process import HermesProcess

# Generous: the first test also pays for the session (a cold stand-in image build: ~2 min).
pytestmark = [pytest.mark.sam_local, pytest.mark.timeout(900)]

SQS_EVENT = "sqs_job.json"
# The job the events name (jobs_get.json, sqs_job.json).
JOB_ID = json.loads(json.loads((ROOT / "events" / SQS_EVENT).read_text())["Records"][0]["body"])[
    "job_id"
]
PARALLEL = 3  # sam invokes at once: each is a sam process, an image build and a container


def seed_job(runner: HermesProcess, wiring: Wiring) -> None:
    """The events' job, queued: a job submitted through the API, copied under their id."""
    submitted = httpx.post(f"{runner.url}/v1/jobs/gemma", json={"prompt": "seeded"}, timeout=30)
    assert submitted.status_code == 202, submitted.text
    with endpoints(wiring.host_dynamodb, wiring.host_sqs):
        table = boto3.client("dynamodb")
        item = table.get_item(
            TableName="JobsTable",
            Key={"job_id": {"S": submitted.json()["job_id"]}},
            ConsistentRead=True,
        )["Item"]
        for finished in ("result", "error", "code", "waits"):
            item.pop(finished, None)
        item.update(job_id={"S": JOB_ID}, status={"S": "queued"}, attempts={"N": "0"})
        table.put_item(TableName="JobsTable", Item=item)


def runner_answers(
    names: list[str], runner: HermesProcess, env: dict[str, str]
) -> dict[str, Answer]:
    """HTTP events as requests to the runner; direct and SQS events through its handlers."""
    found: dict[str, Answer] = {}
    direct = []
    for name in names:
        event = load(ROOT / "events" / name)
        if "routeKey" in event:
            with httpx.Client(base_url=runner.url, timeout=60, trust_env=False) as client:
                found[name] = from_http(client.request(**request_for(event)))
        else:
            direct += [name]
    if direct:
        args = [
            arg
            for name in direct
            for arg in (function_for(load(ROOT / "events" / name)), f"events/{name}")
        ]
        result = subprocess.run(
            [sys.executable, "-m", "tests.sam_local.runner_invoke", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        lines = [line[7:] for line in result.stdout.splitlines() if line.startswith("ANSWER ")]
        found.update(
            {name: from_lambda(json.loads(line)) for name, line in zip(direct, lines, strict=True)}
        )
    return found


def sam_answers(
    names: list[str], engine: Engine, image: str | None, wiring: Wiring, template: Path
) -> dict[str, Answer]:
    def one(name: str) -> tuple[str, Answer]:
        path = ROOT / "events" / name
        function = function_for(load(path))
        answer, _ = api.invoke(engine, wiring, image, function, path, PARAMETERS, template=template)
        return name, from_lambda(answer)

    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(pool.map(one, names))


@pytest.fixture(scope="module")
def answers(
    engine: Engine,
    image: str | None,
    wiring: Wiring,
    built: Path,
    runner: HermesProcess,
    runner_subprocess_env: dict[str, str],
) -> Iterator[dict[str, tuple[Answer, Answer]]]:
    """(sam's, the runner's) answer per event. Each path sees the events' job queued when it
    reads it and when it runs it (running it marks it succeeded)."""
    names = [path.name for path in EVENTS if path.name != SQS_EVENT]
    seed_job(runner, wiring)
    runner_side = runner_answers(names, runner, runner_subprocess_env)
    seed_job(runner, wiring)
    runner_side |= runner_answers([SQS_EVENT], runner, runner_subprocess_env)
    seed_job(runner, wiring)
    with timed(f"sam local invoke: {len(names)} events, {PARALLEL} at a time"):
        sam_side = sam_answers(names, engine, image, wiring, built)
    seed_job(runner, wiring)
    with timed("sam local invoke: the SQS event"):
        sam_side |= sam_answers([SQS_EVENT], engine, image, wiring, built)
    yield {name: (sam_side[name], runner_side[name]) for name in sam_side}


@pytest.mark.parametrize("event", [path.name for path in EVENTS])
def test_sam_local_invoke_answers_as_the_runner_does(
    event: str, answers: dict[str, tuple[Answer, Answer]]
) -> None:
    sam, runner = answers[event]
    function = function_for(load(ROOT / "events" / event))
    PARITY.append((f"{event} -> {function}", "invoke", runner, sam))
    assert sam.comparable() == runner.comparable()
    assert sam.status is None or sam.status < 500, sam


def test_the_events_do_what_they_are_for(answers: dict[str, tuple[Answer, Answer]]) -> None:
    """Not 404s and no-ops: the job was there to read and to run, the direct invoke
    generated, the unknown event got a clear error."""
    sam = {name: pair[0] for name, pair in answers.items()}
    assert (sam["jobs_get.json"].status, sam["jobs_get.json"].body["status"]) == (200, "queued")
    assert sam[SQS_EVENT].body == {"batchItemFailures": []}
    assert sam["direct_generate.json"].body["result"].startswith("Echo:")
    assert sam["direct_generate.json"].body["request_id"] == "order-42-summary"
    assert sam["direct_unknown_event.json"].code == "invalid_request"
    assert sam["jobs_submit.json"].status == 202
