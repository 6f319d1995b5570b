"""/v1/status does not cascade: one backend down of several answers 200 `degraded`, naming the
failing hosts and the models left without a backend; 503 `unhealthy` only when nothing can be
admitted (the lease table fails, or no model has a backend). A load balancer or a readiness
probe that reads 503 takes the whole sidecar out of service."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from hermes.service import get_service, host_pool
from local import runner
from local.process import free_port
from local.template import ROOT
from tests.support.lambda_calls import invoke
from tests.support.models_file import use_models
from tests.support.ollama_emulator import OllamaEmulator

MODELS = ("gemma", "llama3", "mistral")


@pytest.fixture(autouse=True)
def env(aws: None, emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    emulator.reset()
    monkeypatch.setenv("OLLAMA_URL", emulator.url)


@pytest.fixture
def down_url() -> str:
    """A loopback address where nothing listens: a host that is down."""
    return f"http://127.0.0.1:{free_port()}"


def models_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hosts: dict[str, str], **pools: list[str]
) -> None:
    """The shipped models file with extra hosts (name → URL) and the given models moved onto
    pools of them; `default` stays on OLLAMA_URL."""
    config = json.loads((ROOT / "layers/hermes/hermes/models.json").read_text())
    for name, url in hosts.items():
        config["hosts"][name] = {"memory_budget": 8, "url": url}
    for model, pool in pools.items():
        config["models"][model]["hosts"] = pool
    use_models(monkeypatch, tmp_path, config)


def by_name(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in entries}


def test_one_model_whose_host_is_down_leaves_status_200_degraded_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, down_url: str
) -> None:
    # Given llama3 alone on a host that is down, gemma and mistral on one that answers
    models_file(tmp_path, monkeypatch, {"gpu2": down_url}, llama3=["gpu2"])
    # When status is read
    status, body, _ = invoke("status", "status.json")
    # Then Hermes stays in service: 200 degraded, naming the host and the model
    assert (status, body["status"]) == (200, "degraded"), body
    assert body["failing"]["models"] == ["llama3"]
    [failing_host] = body["failing"]["hosts"]
    assert failing_host["name"] == "gpu2" and "unreachable" in failing_host["error"]
    models = by_name(body["models"])
    assert models["llama3"]["state"] == "no_backend"
    assert models["llama3"]["failing_hosts"] == ["gpu2"]
    assert {models[m]["state"] for m in ("gemma", "mistral")} == {"ok"}
    hosts = by_name(body["hosts"])
    assert (hosts["gpu2"]["available"], hosts["gpu2"]["status"]) == (False, "error")
    assert (hosts["default"]["available"], hosts["default"]["error"]) == (True, None)


def test_a_pool_with_one_host_down_keeps_its_model_served_and_names_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, down_url: str
) -> None:
    # Given gemma on a pool of two hosts, one of them down
    models_file(tmp_path, monkeypatch, {"gpu2": down_url}, gemma=["default", "gpu2"])
    # When status is read
    status, body, _ = invoke("status", "status.json")
    # Then gemma is degraded but served; no model is without a backend
    assert (status, body["status"]) == (200, "degraded"), body
    assert body["failing"]["models"] == []
    assert [h["name"] for h in body["failing"]["hosts"]] == ["gpu2"]
    gemma = by_name(body["models"])["gemma"]
    assert (gemma["state"], gemma["failing_hosts"]) == ("degraded", ["gpu2"])


def test_no_model_with_a_backend_is_503_unhealthy_naming_them_all(
    monkeypatch: pytest.MonkeyPatch, down_url: str
) -> None:
    # Given the one host of every model down
    monkeypatch.setenv("OLLAMA_URL", down_url)
    # When status is read
    status, body, _ = invoke("status", "status.json")
    # Then nothing can be served: 503 unhealthy, every model shown without a backend
    assert (status, body["status"]) == (503, "unhealthy"), body
    assert body["failing"]["models"] == list(MODELS)
    assert {m["state"] for m in body["models"]} == {"no_backend"}
    assert body["checks"]["dynamodb"]["status"] == "ok"


def test_a_failing_lease_table_is_503_unhealthy_while_the_backends_answer() -> None:
    # Given the lease table gone (nothing can be admitted) and Ollama answering
    boto3.client("dynamodb").delete_table(TableName=get_service().settings.lease_table)
    # When status is read
    status, body, _ = invoke("status", "status.json")
    # Then 503 unhealthy for the table, while every model's backend is shown as fine
    assert (status, body["status"]) == (503, "unhealthy"), body
    assert body["checks"]["dynamodb"]["status"] == "error"
    assert {m["state"] for m in body["models"]} == {"ok"}
    assert body["failing"] == {"hosts": [], "models": []}


def test_an_open_circuit_takes_its_host_out_and_a_half_open_one_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two hosts that both answer: gpu2's circuit open (cooldown running), gpu3's
    # half-open (cooldown over: the next request probes it)
    models_file(
        tmp_path, monkeypatch, {"gpu2": os.environ["OLLAMA_URL"], "gpu3": os.environ["OLLAMA_URL"]},
        llama3=["gpu2"], mistral=["gpu3"],
    )  # fmt: skip
    book = get_service().limiter.hosts
    now = int(time.time() * 1000)
    book.open_circuit(host_pool("gpu2"), now, now + 60_000)
    book.open_circuit(host_pool("gpu3"), now - 20_000, now - 10_000)
    # When status is read
    status, body, _ = invoke("status", "status.json")
    # Then llama3 has no backend until gpu2's cooldown ends; mistral stays served: a half-open
    # host counted out would never get the request that closes its circuit
    assert (status, body["status"]) == (200, "degraded"), body
    assert body["failing"]["models"] == ["llama3"]
    hosts = by_name(body["hosts"])
    assert (hosts["gpu2"]["circuit"], hosts["gpu2"]["available"]) == ("open", False)
    assert (hosts["gpu3"]["circuit"], hosts["gpu3"]["available"]) == ("half_open", True)
    assert [h["name"] for h in body["failing"]["hosts"]] == ["gpu2", "gpu3"]
    models = by_name(body["models"])
    assert (models["llama3"]["state"], models["mistral"]["state"]) == ("no_backend", "degraded")


def test_the_runner_names_at_start_the_models_without_a_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, down_url: str
) -> None:
    # Given `make run` without Ollama: gemma on the embedded model's host, the others on the
    # default host, where nothing answers
    models_file(tmp_path, monkeypatch, {"embedded": os.environ["OLLAMA_URL"]}, gemma=["embedded"])
    monkeypatch.setenv("OLLAMA_URL", down_url)
    # When the runner checks its backends at start
    line = runner.backends_line()
    # Then one line names llama3 and mistral and why, and not gemma
    assert line is not None and "\n" not in line
    assert "llama3, mistral" in line and "gemma" not in line
    assert f"host default: Ollama is unreachable at {down_url}" in line


def test_the_runner_says_nothing_at_start_when_every_model_has_a_backend() -> None:
    assert runner.backends_line() is None
