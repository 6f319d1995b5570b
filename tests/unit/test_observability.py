"""Structured logs and EMF metrics: what an operator sees per request, and what never
appears in them (prompt and completion text, unless explicitly enabled)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

from hermes import observability
from tests.support.lambda_calls import LambdaContext, event, load_function, logged
from tests.support.ollama_emulator import OllamaEmulator

PROMPT = "Explain quantum computing"  # the prompt in events/llm_generate.json


@pytest.fixture
def logs(
    aws: None, emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch
) -> Iterator[io.StringIO]:
    emulator.reset()
    monkeypatch.setenv("OLLAMA_URL", emulator.url)
    stream = io.StringIO()
    old = observability.logger.registered_handler.setStream(stream)  # type: ignore[attr-defined]
    yield stream
    observability.logger.registered_handler.setStream(old)  # type: ignore[attr-defined]


def request_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("message") == "request finished"]


def test_every_request_logs_one_structured_line_without_the_prompt(logs: io.StringIO) -> None:
    load_function("llm").handler(event("llm_generate.json"), LambdaContext())
    [line] = request_lines(logs)
    assert line["model"] == "gemma" and line["outcome"] == "ok" and line["status"] == 200
    assert line["completion_tokens"] == 5 and line["latency_ms"] > 0
    assert line["function_request_id"] == "test-request"
    assert line["correlation_id"] == event("llm_generate.json")["requestContext"]["requestId"]
    assert PROMPT not in logs.getvalue() and "Echo" not in logs.getvalue()


def test_failures_are_logged_with_their_code(logs: io.StringIO, emulator: OllamaEmulator) -> None:
    emulator.set_behaviour(model="gemma3:1b", mode="error", status=500)
    load_function("llm").handler(event("llm_generate.json"), LambdaContext())
    emulator.reset()
    [line] = request_lines(logs)
    assert (line["outcome"], line["status"]) == ("upstream_error", 502)


def test_prompt_logging_is_opt_in(logs: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMES_LOG_PROMPTS", "1")
    load_function("llm").handler(event("llm_generate.json"), LambdaContext())
    [line] = request_lines(logs)
    assert line["prompt"] == PROMPT and line["completion"].startswith("Echo")


def test_metrics_are_emitted_as_emf(
    logs: io.StringIO, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    load_function("llm").handler(event("llm_generate.json"), LambdaContext())
    metrics = {}
    requests = []
    for line in capsys.readouterr().out.splitlines():
        if '"_aws"' in line:
            blob = json.loads(line)
            for definition in blob["_aws"]["CloudWatchMetrics"]:
                assert definition["Namespace"] == "Hermes"
                for metric in definition["Metrics"]:
                    metrics[metric["Name"]] = blob
                    if metric["Name"] == "Requests":
                        requests.append(({d for ds in definition["Dimensions"] for d in ds}, blob))
    assert {"Requests", "Latency", "SlotTime", "WaitTime"} <= set(metrics)
    # Requests by model and outcome, and by caller and outcome (a caller the models file
    # does not name is "*": the dimension stays bounded).
    by_model = next(blob for names, blob in requests if "model" in names)
    assert by_model["outcome"] == "ok" and by_model["model"] == "gemma"
    by_caller = next(blob for names, blob in requests if "caller" in names)
    assert by_caller["outcome"] == "ok" and by_caller["caller"] == "*"
    # The slot was busy for the call: at least the emulator's answer, at most the request.
    assert 0 < metrics["SlotTime"]["SlotTime"][0] <= metrics["Latency"]["Latency"][0]
    assert metrics["SlotTime"]["model"] == "gemma"


def test_a_grant_from_the_queue_reports_in_flight_and_utilization(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admission that knows no count reports none; one that knows it (its write returned
    it) reports in flight and utilization."""
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    observability.admitted("gemma", None, 2, 3.0)
    assert '"InFlight"' not in capsys.readouterr().out
    observability.admitted("gemma", 1, 2, 3.0)
    blobs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "_aws" in line]
    by_name = {
        m["Name"]: b for b in blobs for d in b["_aws"]["CloudWatchMetrics"] for m in d["Metrics"]
    }
    assert by_name["InFlight"]["InFlight"] == [1.0]
    assert by_name["SlotUtilization"]["SlotUtilization"] == [50.0]  # 1 of gemma's 2 slots


def emitted(out: str) -> list[tuple[str, dict[str, str], list[float]]]:
    """Each EMF line as (metric name, its dimensions and their values, its values)."""
    found = []
    for line in out.splitlines():
        if '"_aws"' not in line:
            continue
        blob = json.loads(line)
        [definition] = blob["_aws"]["CloudWatchMetrics"]
        assert definition["Namespace"] == "Hermes"
        [dimensions] = definition["Dimensions"]
        for metric in definition["Metrics"]:
            name = metric["Name"]
            found.append((name, {d: blob[d] for d in dimensions}, blob[name]))
    return found


@pytest.fixture
def metrics_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    monkeypatch.delenv("POWERTOOLS_SERVICE_NAME", raising=False)


def test_a_grant_on_a_host_reports_in_flight_and_utilization_per_model_and_host(
    metrics_on: None, capsys: pytest.CaptureFixture[str]
) -> None:
    observability.admitted("gemma", 1, 4, 3.0, host="gpu-a")
    found = emitted(capsys.readouterr().out)
    assert ("InFlight", {"model": "gemma"}, [1.0]) in found
    assert ("InFlight", {"model": "gemma", "host": "gpu-a"}, [1.0]) in found
    assert ("SlotUtilization", {"model": "gemma"}, [25.0]) in found
    assert ("SlotUtilization", {"model": "gemma", "host": "gpu-a"}, [25.0]) in found
    assert ("WaitTime", {"model": "gemma"}, [3.0]) in found
    # A direct admission (no count) on a host: only the wait.
    observability.admitted("gemma", None, 4, 2.0, host="gpu-a")
    assert emitted(capsys.readouterr().out) == [("WaitTime", {"model": "gemma"}, [2.0])]


def test_slot_time_is_counted_per_model_and_per_model_and_host(
    metrics_on: None, capsys: pytest.CaptureFixture[str]
) -> None:
    observability.held("gemma", 1.5, host="gpu-a")
    assert emitted(capsys.readouterr().out) == [
        ("SlotTime", {"model": "gemma"}, [1500.0]),
        ("SlotTime", {"model": "gemma", "host": "gpu-a"}, [1500.0]),
    ]
    observability.held("gemma", 0.5)
    assert emitted(capsys.readouterr().out) == [("SlotTime", {"model": "gemma"}, [500.0])]


def test_a_model_load_is_counted_timed_and_logged(
    metrics_on: None, capsys: pytest.CaptureFixture[str], log_lines: io.StringIO
) -> None:
    observability.model_loaded("gemma", "gpu-a", 2345.67)
    assert emitted(capsys.readouterr().out) == [
        ("ModelLoads", {"model": "gemma", "host": "gpu-a"}, [1.0]),
        ("LoadTime", {"model": "gemma", "host": "gpu-a"}, [2345.67]),
    ]
    [line] = logged(log_lines, "model loaded")
    assert (line["level"], line["model"], line["host"], line["load_ms"]) == (
        "INFO", "gemma", "gpu-a", 2345.7
    )  # fmt: skip


def test_circuit_openings_and_closings_are_counted_per_host_and_logged(
    metrics_on: None, capsys: pytest.CaptureFixture[str], log_lines: io.StringIO
) -> None:
    observability.circuit_opened("gpu-a", "connection refused")
    observability.circuit_closed("gpu-a")
    assert emitted(capsys.readouterr().out) == [
        ("CircuitOpened", {"host": "gpu-a"}, [1.0]),
        ("CircuitClosed", {"host": "gpu-a"}, [1.0]),
    ]
    [opened] = logged(log_lines, "circuit opened")
    assert (opened["level"], opened["host"], opened["reason"]) == (
        "WARNING", "gpu-a", "connection refused"
    )  # fmt: skip
    [closed] = logged(log_lines, "circuit closed")
    assert (closed["level"], closed["host"]) == ("INFO", "gpu-a")


def test_a_retry_is_counted_against_the_host_that_failed(
    metrics_on: None, capsys: pytest.CaptureFixture[str], log_lines: io.StringIO
) -> None:
    observability.retried("gemma", "gpu-a", "read timed out")
    assert emitted(capsys.readouterr().out) == [
        ("HostRetries", {"model": "gemma", "host": "gpu-a"}, [1.0])
    ]
    [line] = logged(log_lines, "retrying on another host")
    assert (line["level"], line["model"], line["host"], line["reason"]) == (
        "WARNING", "gemma", "gpu-a", "read timed out"
    )  # fmt: skip


def test_disabled_metrics_emit_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    observability.admitted("gemma", 1, 2, 3.0, host="gpu-a")
    observability.held("gemma", 1.0, host="gpu-a")
    observability.model_loaded("gemma", "gpu-a", 10.0)
    observability.circuit_opened("gpu-a", "down")
    observability.circuit_closed("gpu-a")
    observability.retried("gemma", "gpu-a", "down")
    assert '"_aws"' not in capsys.readouterr().out
