"""Structured logs and EMF metrics: what an operator sees per request, and what never
appears in them (prompt and completion text, unless explicitly enabled)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

from hermes import observability
from tests.support.ollama_emulator import OllamaEmulator
from tests.unit.test_handlers import LambdaContext, event, load_function

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
    for line in capsys.readouterr().out.splitlines():
        if '"_aws"' in line:
            blob = json.loads(line)
            for definition in blob["_aws"]["CloudWatchMetrics"]:
                assert definition["Namespace"] == "Hermes"
                for metric in definition["Metrics"]:
                    metrics[metric["Name"]] = blob
    assert {"Requests", "Latency", "SlotTime", "WaitTime"} <= set(metrics)
    assert metrics["Requests"]["outcome"] == "ok" and metrics["Requests"]["model"] == "gemma"
    # The slot was busy for the call: at least the emulator's answer, at most the request.
    assert 0 < metrics["SlotTime"]["SlotTime"][0] <= metrics["Latency"]["Latency"][0]
    assert metrics["SlotTime"]["model"] == "gemma"


def test_a_grant_from_the_queue_reports_in_flight_and_utilization(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direct admission is a transaction (no values returned); a grant knows the count."""
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
