"""The stack's CloudWatch alarms watch metrics that exist, with the exact dimensions they are
published with: a CloudWatch alarm matches one metric (namespace, name and the whole set of
dimensions with their values), so an alarm off by one dimension never fires, and says so
nowhere. Hermes' own metrics are compared with the EMF a real request emits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import boto3
import pytest

from hermes.service import get_service
from local.template import load_template
from tests.support.lambda_calls import LambdaContext, event, load_function
from tests.support.ollama_emulator import OllamaEmulator
from tests.support.template_reading import sam_environments

Metric = tuple[str, str, frozenset[tuple[str, str]]]  # namespace, name, {(dimension, value)}


def alarms() -> dict[str, dict[str, Any]]:
    resources = load_template()["Resources"]
    return {
        name: resource["Properties"]
        for name, resource in resources.items()
        if resource["Type"] == "AWS::CloudWatch::Alarm"
    }


def watched(properties: dict[str, Any]) -> Metric:
    dimensions = frozenset((d["Name"], d["Value"]) for d in properties.get("Dimensions", []))
    return properties["Namespace"], properties["MetricName"], dimensions


def emf(out: str) -> set[Metric]:
    """Every metric in the EMF lines of `out`, once per dimension set it is published with."""
    found = set()
    for line in out.splitlines():
        if '"_aws"' not in line:
            continue
        blob = json.loads(line)
        for definition in blob["_aws"]["CloudWatchMetrics"]:
            for metric in definition["Metrics"]:
                for names in definition["Dimensions"]:
                    dimensions = frozenset((n, str(blob[n])) for n in names)
                    found.add((definition["Namespace"], metric["Name"], dimensions))
    return found


@lru_cache(maxsize=1)
def services() -> dict[str, str]:
    """Each function's POWERTOOLS_SERVICE_NAME as SAM deploys it: powertools adds it to every
    metric as the `service` dimension."""
    return {
        name: environment["POWERTOOLS_SERVICE_NAME"]
        for name, environment in sam_environments({}).items()
    }


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaEmulator]:
    with OllamaEmulator() as emulator:
        yield emulator


@pytest.fixture
def emulator(aws: None, ollama: OllamaEmulator, monkeypatch: pytest.MonkeyPatch) -> OllamaEmulator:
    """The functions' host, and their metrics on."""
    ollama.reset()
    monkeypatch.setenv("OLLAMA_URL", ollama.url)
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    return ollama


# The functions that admit requests of API callers, and a request of each.
ADMITTING = [
    ("LlmFunction", "llm", "llm_generate.json"),
    ("OllamaApiFunction", "ollama_api", "ollama_generate.json"),
    ("OpenAiApiFunction", "openai_api", "openai_chat.json"),
]


@pytest.mark.parametrize(("resource", "function", "request_file"), ADMITTING)
def test_the_limiter_error_alarm_watches_the_metric_a_refused_request_emits(
    emulator: OllamaEmulator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    resource: str,
    function: str,
    request_file: str,
) -> None:
    """docs/operations.md, Logs and metrics: "CloudWatch metrics (namespace `Hermes`,
    EMF): … `LimiterErrors` … Alarms (to `AlarmTopicArn` if set): … limiter errors." and
    "503 `limiter_unavailable` at DynamoDB or IAM (nothing is admitted blindly;
    alarmed)". Every alarm on Hermes' namespace is checked against a real request's EMF,
    from each function that admits requests, with the environment SAM gives it."""
    [(name, properties)] = [(n, p) for n, p in alarms().items() if p["Namespace"] == "Hermes"]
    assert properties["MetricName"] == "LimiterErrors", name
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", services()[resource])
    handler = load_function(function).handler
    # A request that succeeds emits no limiter error
    capsys.readouterr()
    ok = handler(event(request_file), LambdaContext())
    assert ok["statusCode"] == 200, ok
    healthy = emf(capsys.readouterr().out)
    assert healthy and not any(metric == "LimiterErrors" for _, metric, _ in healthy), healthy
    # When the lease table fails, the function refuses the request
    boto3.client("dynamodb").delete_table(TableName=get_service().settings.lease_table)
    refused = handler(event(request_file), LambdaContext())
    assert refused["statusCode"] == 503 and "limiter_unavailable" in refused["body"], refused
    # Then the alarm's metric is among what it emitted: namespace, name, and exactly the
    # dimensions (names and values) it was published with
    emitted = emf(capsys.readouterr().out)
    limiter_errors = {m for m in emitted if m[1] == "LimiterErrors"}
    assert watched(properties) in limiter_errors, (watched(properties), limiter_errors)
    # And one refusal is enough to count: a Sum of 1 reaches the threshold
    assert properties["Statistic"] == "Sum" and properties["Threshold"] <= 1


def test_every_alarm_on_an_aws_namespace_names_the_resource_that_publishes_its_metric() -> None:
    """docs/operations.md: "Alarms (to `AlarmTopicArn` if set): sustained API 5xx, LLM
    function throttles, limiter errors." API Gateway publishes an HTTP API's `5xx` by
    `ApiId` (a REST API's would be `5XXError` by `ApiName`), Lambda its `Throttles` by
    `FunctionName`: each alarm names its metric by the dimension its publisher uses."""
    resources = load_template()["Resources"]
    by_metric = {
        (p["Namespace"], p["MetricName"]): [(d["Name"], d["Value"]) for d in p["Dimensions"]]
        for p in alarms().values()
        if p["Namespace"] != "Hermes"
    }
    assert set(by_metric) == {("AWS/ApiGateway", "5xx"), ("AWS/Lambda", "Throttles")}
    [(dimension, api)] = by_metric["AWS/ApiGateway", "5xx"]
    assert dimension == "ApiId"
    assert resources[api["Ref"]]["Type"] == "AWS::Serverless::HttpApi"
    [(dimension, function)] = by_metric["AWS/Lambda", "Throttles"]
    assert (dimension, function) == ("FunctionName", {"Ref": "LlmFunction"})
