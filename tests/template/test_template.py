"""The template is the source of truth: it must lint clean and agree with the models file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hermes.config import DEFAULT_MODELS_FILE, load_models, reserved_concurrency
from local.template import (
    ROOT,
    functions,
    http_routes,
    load_template,
    queue_definitions,
    queue_sources,
)
from tests.support.template_reading import sam_environments

pytestmark = pytest.mark.template
BIN = Path(sys.executable).parent
ENV = {**os.environ, "SAM_CLI_TELEMETRY": "0"}


def test_cfn_lint_is_clean() -> None:
    result = subprocess.run(
        [BIN / "cfn-lint", "template.yaml"], cwd=ROOT, capture_output=True, text=True, env=ENV
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sam_validate_lint_is_clean() -> None:
    result = subprocess.run(
        [BIN / "sam", "validate", "--lint"], cwd=ROOT, capture_output=True, text=True, env=ENV
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is a valid SAM Template" in result.stdout + result.stderr


def test_reserved_concurrency_is_the_models_slots_plus_their_waiting() -> None:
    """Each generating function can be sent every request: it needs an instance for every
    slot and every waiting place of the shipped models file, which `make concurrency`
    prints; the template's default is exactly that."""
    models = load_models(DEFAULT_MODELS_FILE)
    derived = sum(len(m.pool) * (m.max_concurrency + m.waiting_limit) for m in models.values())
    assert reserved_concurrency(models) == derived
    default = load_template()["Parameters"]["LlmReservedConcurrency"]
    assert int(default["Default"]) == derived
    generating = ["LlmFunction", "OllamaApiFunction", "OpenAiApiFunction"]
    for name in generating:
        properties = load_template()["Resources"][name]["Properties"]
        assert properties["ReservedConcurrentExecutions"] == {"Ref": "LlmReservedConcurrency"}
    printed = subprocess.run(
        [sys.executable, "-m", "local.reserved_concurrency"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HERMES_MODELS_FILE": str(DEFAULT_MODELS_FILE)},
    )
    assert printed.stdout.strip() == f"LlmReservedConcurrency={derived}", printed.stderr


def test_waiting_places_count_toward_reserved_concurrency(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text(
        json.dumps(
            {
                "models": {
                    "gemma": {
                        "max_concurrency": 2,
                        "memory_cost": "medium",
                        "timeout": 10_000,
                        "backend_model": "g",
                        "queue_timeout_ms": 5_000,
                        "hosts": ["a", "b"],
                    },
                    "llama3": {
                        "max_concurrency": 1,
                        "memory_cost": "high",
                        "timeout": 10_000,
                        "backend_model": "l",
                        "max_waiting": 3,
                        "host": "a",
                    },
                },
                "hosts": {"a": {"memory_budget": 8}, "b": {"memory_budget": 8}},
            }
        )
    )
    # gemma: 2 hosts x (2 slots + 4 waiting); llama3: 1 slot + 3 waiting.
    assert reserved_concurrency(load_models(path)) == 2 * (2 + 4) + (1 + 3)


def test_llm_function_outlives_the_slowest_model() -> None:
    models = load_models(DEFAULT_MODELS_FILE)
    assert functions()["LlmFunction"].timeout * 1000 > max(m.timeout for m in models.values())


def test_every_job_gets_its_model_s_whole_timeout_in_the_worker() -> None:
    """One record per invocation, and a worker Timeout covering the slowest model's timeout
    and admission wait plus the jobs' overhead (what the worker itself checks at load)."""
    from hermes.config import JOB_OVERHEAD_S, WORKER_START_S

    models = load_models(DEFAULT_MODELS_FILE)
    worker = functions()["WorkerFunction"]
    slowest_s = max((m.timeout + m.queue_timeout_ms) / 1000 for m in models.values())
    assert worker.timeout >= slowest_s + JOB_OVERHEAD_S + WORKER_START_S
    assert int(worker.environment["HERMES_WORKER_TIMEOUT_S"]) == worker.timeout
    assert [s.batch_size for s in queue_sources() if s.function == "WorkerFunction"] == [1]


def test_the_jobs_queue_hides_a_message_six_worker_timeouts() -> None:
    """AWS: a source queue's visibility timeout at least 6 times the function's timeout."""
    worker = functions()["WorkerFunction"]
    visibility = int(queue_definitions()["JobsQueue"].attributes["VisibilityTimeout"])
    assert visibility >= 6 * worker.timeout


def policy_statements(name: str) -> list[dict[str, Any]]:
    """A function's own IAM statements: its Policies, or those of the role it names."""
    properties = functions()[name].properties
    if "Role" in properties:
        role = load_template()["Resources"][properties["Role"]["Fn::GetAtt"][0]]
        return [s for p in role["Properties"]["Policies"] for s in p["PolicyDocument"]["Statement"]]
    return [s for p in properties["Policies"] if "Statement" in p for s in p["Statement"]]


def test_the_worker_can_dead_letter_a_job_itself() -> None:
    worker = functions()["WorkerFunction"]
    assert worker.environment["HERMES_JOBS_DLQ_URL"] == {"Ref": "JobsDLQ"}
    statements = policy_statements("WorkerFunction")
    assert {"Effect": "Allow", "Action": "sqs:SendMessage",
            "Resource": {"Fn::GetAtt": ["JobsDLQ", "Arn"]}} in statements  # fmt: skip


def test_every_route_has_an_event_and_every_event_a_route() -> None:
    routes = {f"{r.method} {r.path}" for r in http_routes()}
    events = {
        json.loads(p.read_text())["routeKey"]
        for p in (ROOT / "events").glob("*.json")
        if "routeKey" in p.read_text()
    }
    assert routes == events


def test_layer_requirements_match_the_project_pins() -> None:
    layer = {
        line.split("==")[0].lower(): line.strip()
        for line in (ROOT / "layers/hermes/requirements.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {re.split(r"[=<>\[]", d)[0].lower(): d for d in project if not d.startswith("boto3")}
    assert layer == pinned


def test_checkov_finds_nothing_unjustified() -> None:
    """Every suppression sits in the template's Metadata with its reason."""
    checkov = ROOT / ".tools" / "checkov" / "bin" / "checkov"
    result = subprocess.run(
        [checkov, "-f", "template.yaml", "--framework", "cloudformation", "--compact", "--quiet",
         "--skip-download"],  # no calls home: the machine reaches package registries only
        cwd=ROOT, capture_output=True, text=True, env={**ENV, "BC_SKIP_MAPPING": "TRUE"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = load_template_text().count("- id: CKV_")
    assert skipped and all(
        "comment:" in block for block in load_template_text().split("- id: CKV_")[1:]
    )


def load_template_text() -> str:
    return (ROOT / "template.yaml").read_text()


def test_the_api_requires_iam_by_default_and_offers_jwt() -> None:
    template = load_template()
    auth = template["Resources"]["HermesApi"]["Properties"]["Auth"]
    assert auth["DefaultAuthorizer"] == {"Fn::If": ["UseJwt", "JwtAuthorizer", "AWS_IAM"]}
    assert template["Parameters"]["AuthMode"]["Default"] == "IAM"
    assert "JwtAuthorizer" in auth["Authorizers"]


def test_functions_get_only_the_actions_they_use() -> None:
    """No broad policy templates: each function lists its DynamoDB and SQS actions."""
    text = load_template_text()
    assert "CrudPolicy" not in text and "PollerPolicy" not in text
    status = functions()["StatusFunction"].properties["Policies"]
    assert status == [
        {"Statement": [{"Effect": "Allow", "Action": ["dynamodb:BatchGetItem", "dynamodb:Query"],
                        "Resource": {"Fn::GetAtt": ["LeaseTable", "Arn"]}}]},
        {"Statement": [{"Effect": "Allow", "Action": ["dynamodb:Query", "dynamodb:Scan"],
                        "Resource": {"Fn::GetAtt": ["UsageTable", "Arn"]}}]},
        # The hosts' probes carry their bearer tokens (none unless a token prefix is given).
        {"Fn::If": ["HasBackendTokens", {"Ref": "BackendTokenReadPolicy"},
                    {"Ref": "AWS::NoValue"}]},
    ]  # fmt: skip


# What hermes.limiter sends: TransactWriteItems is authorized per item (Put, Update, Delete).
LIMITER_ACTIONS = {
    "dynamodb:UpdateItem", "dynamodb:PutItem", "dynamodb:DeleteItem", "dynamodb:GetItem",
    "dynamodb:BatchGetItem", "dynamodb:Query",
}  # fmt: skip


@pytest.mark.parametrize(
    "name", ["LlmFunction", "OllamaApiFunction", "OpenAiApiFunction", "WorkerFunction"]
)
def test_every_admitting_function_may_do_what_the_limiter_does_and_write_usage(
    name: str,
) -> None:
    """Admission, queueing, handoff, reaping and polling: a missing action would be an
    AccessDenied in AWS, i.e. 503 limiter_unavailable on every request."""
    lease = {"Fn::GetAtt": ["LeaseTable", "Arn"]}
    actions = {
        action
        for statement in policy_statements(name)
        if statement["Resource"] == lease
        for action in (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
    }
    assert actions == LIMITER_ACTIONS
    usage = [
        statement["Action"]
        for statement in policy_statements(name)
        if statement["Resource"] == {"Fn::GetAtt": ["UsageTable", "Arn"]}
    ]
    assert usage == [["dynamodb:UpdateItem"]]  # hermes.usage: one ADD per request


LOCAL_ENDPOINTS = {
    "LocalDynamoDbEndpoint": "AWS_ENDPOINT_URL_DYNAMODB",
    "LocalSqsEndpoint": "AWS_ENDPOINT_URL_SQS",
}


def test_a_default_deploy_carries_no_local_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given the local-run parameters at their defaults, when the template is resolved, then
    every endpoint variable is empty, and an empty one leaves the SDK on AWS's endpoint."""
    params = load_template()["Parameters"]
    assert all(params[name]["Default"] == "" for name in LOCAL_ENDPOINTS)
    for env in sam_environments({}).values():
        assert all(env[variable] == "" for variable in LOCAL_ENDPOINTS.values())
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", "")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", "")
    region = "eu-west-1"
    assert boto3.client("dynamodb", region_name=region).meta.endpoint_url == (
        f"https://dynamodb.{region}.amazonaws.com"
    )
    assert boto3.client("sqs", region_name=region).meta.endpoint_url == (
        f"https://sqs.{region}.amazonaws.com"
    )
    # The parameters feed these variables and nothing else.
    text = load_template_text()
    assert all(text.count(f"!Ref {name}") == 1 for name in LOCAL_ENDPOINTS)


def test_sam_local_passes_the_local_endpoints_to_every_function() -> None:
    overrides = {name: f"http://172.17.0.1:{port}" for port, name in enumerate(LOCAL_ENDPOINTS)}
    for env in sam_environments(overrides).values():
        assert {env[variable] for variable in LOCAL_ENDPOINTS.values()} == set(overrides.values())


# -- the dashboard -----------------------------------------------------------------------------
# A SEARCH's schema {Namespace,dim,...} matches only metrics with exactly those dimensions.
SEARCH = re.compile(r"SEARCH\('\{(?P<schema>[^}]*)\}(?P<term>[^']*)', '(?P<stat>[^']+)', 60\)")


def dashboard_body() -> dict[str, Any]:
    """The DashboardBody as CloudFormation renders it: ${AWS::Region} substituted and each
    ${!...} (a CloudWatch dynamic label) left as ${...}."""
    resource = load_template()["Resources"]["HermesDashboard"]
    assert resource["Type"] == "AWS::CloudWatch::Dashboard"
    body = resource["Properties"]["DashboardBody"]["Fn::Sub"]
    assert isinstance(body, str)
    # Any other ${...} would be a CloudFormation variable, and a typo in a dynamic label.
    assert set(re.findall(r"\$\{(?!!)[^}]*\}", body)) == {"${AWS::Region}"}
    rendered = body.replace("${AWS::Region}", "eu-west-1").replace("${AWS::StackName}", "hermes")
    parsed: dict[str, Any] = json.loads(rendered.replace("${!", "${"))
    return parsed


def dashboard_searches() -> list[tuple[str, frozenset[str], str, str]]:
    """Each SEARCH in the dashboard as (metric name, dimension names, search term, stat)."""
    found = []
    for widget in dashboard_body()["widgets"]:
        for row in widget["properties"]["metrics"]:
            for item in row:
                if not isinstance(item, dict) or "expression" not in item:
                    raise AssertionError(f"not a SEARCH expression: {item}")
                matches = list(SEARCH.finditer(item["expression"]))
                assert matches, item["expression"]
                for match in matches:
                    namespace, *dimensions = [p.strip() for p in match["schema"].split(",")]
                    assert namespace == "Hermes"
                    [name] = re.findall(r'MetricName="(\w+)"', match["term"])
                    found.append((name, frozenset(dimensions), match["term"], match["stat"]))
    return found


def emitted_metrics(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> set[tuple[str, frozenset[str]]]:
    """Every (metric, dimension set) hermes.observability emits, as it emits them on Lambda
    (POWERTOOLS_SERVICE_NAME from the template's Globals)."""
    from hermes import observability

    service = load_template()["Globals"]["Function"]["Environment"]["Variables"]
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", service["POWERTOOLS_SERVICE_NAME"])
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    capsys.readouterr()
    observability.admitted("m", 1, 2, 3.0, host="h")
    observability.held("m", 1.0, host="h")
    observability.finished("m", "limiter_unavailable", 503, 1.0)
    observability.model_loaded("m", "h", 1.0)
    observability.circuit_opened("h", "down")
    observability.circuit_closed("h")
    observability.retried("m", "h", "down")
    found = set()
    for line in capsys.readouterr().out.splitlines():
        if '"_aws"' in line:
            for definition in json.loads(line)["_aws"]["CloudWatchMetrics"]:
                assert definition["Namespace"] == "Hermes"
                for metric in definition["Metrics"]:
                    found |= {(metric["Name"], frozenset(d)) for d in definition["Dimensions"]}
    # The calls above reach every metric the module names.
    source = (ROOT / "layers/hermes/hermes/observability.py").read_text()
    assert {name for name, _ in found} == set(re.findall(r'_metric\(\s*"(\w+)"', source))
    return found


def test_the_dashboard_graphs_only_metrics_hermes_emits_with_their_dimensions(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renamed metric or dimension, or a lost `service`, leaves a graph empty: fail here."""
    emitted = emitted_metrics(capsys, monkeypatch)
    for name, dimensions, _, _ in dashboard_searches():
        assert (name, dimensions) in emitted, (name, sorted(dimensions))


def test_the_dashboard_covers_requests_errors_429s_hosts_loads_and_circuits() -> None:
    graphed = {(name, dimensions - {"service"}) for name, dimensions, _, _ in dashboard_searches()}
    by_model, by_host = frozenset({"model"}), frozenset({"model", "host"})
    assert {
        ("Requests", frozenset({"model", "outcome"})), ("Latency", by_model),
        ("InFlight", by_model), ("InFlight", by_host),
        ("SlotUtilization", by_model), ("SlotUtilization", by_host),
        ("SlotTime", by_model), ("SlotTime", by_host),
        ("ModelLoads", by_host), ("LoadTime", by_host),
        ("CircuitOpened", frozenset({"host"})), ("HostRetries", by_host),
        ("LimiterErrors", frozenset()),
    } <= graphed  # fmt: skip
    assert {"p50", "p95"} <= {
        stat for name, _, _, stat in dashboard_searches() if name == "Latency"
    }


def test_the_dashboard_s_error_and_429_graphs_name_every_such_code() -> None:
    """From hermes.errors, so a new 5xx or 429 code cannot be missing from its graph."""
    from hermes import errors

    kinds, todo = set(), [errors.HermesError]
    while todo:
        kind = todo.pop()
        kinds.add(kind)
        todo += kind.__subclasses__()
    filters = [
        set(re.findall(r'outcome="(\w+)"', term))
        for name, _, term, _ in dashboard_searches()
        if name == "Requests"
    ]
    assert {k.code for k in kinds if k.status >= 500} in filters
    busy = {"model_busy", "host_busy", "queue_full", "caller_busy", "quota_exceeded"}
    assert {k.code for k in kinds if k.status == 429} == busy
    assert busy in filters
    assert {"caller_busy", "quota_exceeded"} in filters  # by caller too


def test_the_dashboard_is_named_per_stack_and_region_and_linked_from_the_outputs() -> None:
    template = load_template()
    properties = template["Resources"]["HermesDashboard"]["Properties"]
    assert properties["DashboardName"] == {"Fn::Sub": "${AWS::StackName}-${AWS::Region}"}
    assert "${HermesDashboard}" in template["Outputs"]["DashboardUrl"]["Value"]["Fn::Sub"]
    widgets = dashboard_body()["widgets"]
    assert all(w["properties"]["region"] == "eu-west-1" for w in widgets)
    cells = [
        (x, y)
        for w in widgets
        for x in range(w["x"], w["x"] + w["width"])
        for y in range(w["y"], w["y"] + w["height"])
    ]
    assert len(cells) == len(set(cells)) and max(x for x, _ in cells) < 24  # no overlap
