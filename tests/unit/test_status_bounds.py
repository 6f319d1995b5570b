"""/v1/status stays bounded: it answers within ~2 s even when Ollama accepts connections and
never answers, and it reads the usage of any number of hosts."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hermes.aws import client
from hermes.service import get_service, host_pool
from tests.support.dynamodb_limits import ExpressionWatch
from tests.support.lambda_calls import LambdaContext, event, load_function
from tests.support.models_file import use_models
from tests.support.ollama_emulator import OllamaEmulator


def a_model_per_host(n: int, max_concurrency: int, cost: str) -> dict[str, Any]:
    """A models file of `n` hosts gpu0… with one model m0… each."""
    models = {
        f"m{i}": {
            "max_concurrency": max_concurrency,
            "memory_cost": cost,
            "timeout": 1000,
            "backend_model": "gemma3:1b",
            "host": f"gpu{i}",
        }
        for i in range(n)
    }
    return {"models": models, "hosts": {f"gpu{i}": {"memory_budget": 8} for i in range(n)}}


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts and then says nothing, like a wedged Ollama."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def test_status_stays_fast_when_ollama_hangs(
    aws: None, silent_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_URL", silent_server)
    started = time.monotonic()
    response = load_function("status").handler(event("status.json"), LambdaContext())
    elapsed = time.monotonic() - started
    body = json.loads(response["body"])
    # Ollama is the one host of every model: nothing can be served.
    assert (response["statusCode"], body["status"], body["checks"]["ollama"]["status"]) == (
        503,
        "unhealthy",
        "error",
    )
    assert body["checks"]["dynamodb"]["status"] == "ok"
    assert elapsed < 5, elapsed  # probes stop at 1.5 s; a wedged Ollama must not hold it


def test_status_reports_usage_of_more_hosts_than_one_batch_get_can_read(
    aws: None,
    emulator: OllamaEmulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dynamodb_limits: ExpressionWatch,
) -> None:
    """BatchGetItem reads at most 100 keys per call: 150 hosts take two."""
    use_models(monkeypatch, tmp_path, a_model_per_host(150, max_concurrency=2, cost="medium"))
    monkeypatch.setenv("OLLAMA_URL", emulator.url)
    # What is tested here is the usage of 150 hosts, not how fast a loaded machine probes
    # them (that bound has its own tests above and below): probes time out at 45 s here.
    monkeypatch.setenv("HERMES_PROBE_TIMEOUT_S", "30")
    emulator.reset()
    client.cache_clear()
    service = get_service()
    dynamodb_limits.watch(service.limiter._ddb)
    # gpu99 sorts last of the 150 hosts: its key is in the second BatchGetItem.
    m99 = service.model("m99")
    service.limiter.acquire(host_pool("gpu99"), service.counters("m99", m99), 60_000)

    status = load_function("status").handler
    response = status(event("status.json"), LambdaContext())
    body = json.loads(response["body"])
    assert body["checks"]["dynamodb"]["status"] == "ok", body["checks"]
    assert body["checks"]["ollama"]["status"] == "ok", body["checks"]
    assert emulator.stats()["meta_calls"]["/api/ps"] == 150  # every host probed, once
    in_flight = {m["name"]: m["in_flight"] for m in body["models"]}
    assert len(in_flight) == 150 and in_flight["m99"] == 1
    assert sum(in_flight.values()) == 1
    memory = {h["name"]: h["memory_in_use"] for h in body["hosts"]}
    assert memory["gpu99"] == 2 and sum(memory.values()) == 2
    client.cache_clear()


def test_the_probes_of_many_hosts_run_at_once(
    aws: None, silent_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hosts are probed concurrently: 20 wedged hosts cost one probe's wait, not 20. A host
    that never answers holds its probe for HERMES_PROBE_TIMEOUT_S at least, so a serial
    status could not answer before 20 x 0.5 s = 10 s however fast the machine: answering
    sooner proves the concurrency (a loaded machine only adds to the concurrent time)."""
    use_models(monkeypatch, tmp_path, a_model_per_host(20, max_concurrency=1, cost="low"))
    monkeypatch.setenv("OLLAMA_URL", silent_server)  # every host: accepts, never answers
    probe_s = 0.5
    monkeypatch.setenv("HERMES_PROBE_TIMEOUT_S", str(probe_s))
    status = load_function("status").handler
    started = time.monotonic()
    response = status(event("status.json"), LambdaContext())
    elapsed = time.monotonic() - started
    body = json.loads(response["body"])
    assert (response["statusCode"], body["status"]) == (503, "unhealthy")
    assert len(body["failing"]["hosts"]) == 20  # every host probed, and each probe cut
    assert elapsed >= probe_s  # the probes were waited for
    assert elapsed < 20 * probe_s, elapsed  # and all at once, not one after the other
