"""What the template does to limit harm: API throttling, reserved concurrency, least-privilege
SQS, log retention, record retention, parameter patterns, no async retries, the VPC rule."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from local.template import functions, load_template, queue_definitions, resources
from tests.support.template_reading import (
    as_list,
    parameters,
    role_of,
    sam_environments,
    statements_of,
    transformed,
)

pytestmark = pytest.mark.template

# CloudWatch Logs' RetentionInDays values.
LOG_RETENTION_DAYS = {1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827,
                      2192, 2557, 2922, 3288, 3653}  # fmt: skip
# What SAM gives a role it generates; none of them grants an SQS action.
NO_SQS_MANAGED_POLICIES = {
    "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
    "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
    "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole",
}
VPC = {"VpcSubnetIds": "subnet-a,subnet-b", "VpcSecurityGroupIds": "sg-1"}


def ref(name: str) -> dict[str, str]:
    return {"Ref": name}


# -- A: the HTTP API throttles every route ---------------------------------------------------
def test_the_api_stage_throttles_every_route_from_two_parameters() -> None:
    settings = load_template()["Resources"]["HermesApi"]["Properties"]["DefaultRouteSettings"]
    assert settings == {
        "ThrottlingBurstLimit": ref("ApiThrottleBurst"),
        "ThrottlingRateLimit": ref("ApiThrottleRate"),
    }
    rate, burst = parameters()["ApiThrottleRate"], parameters()["ApiThrottleBurst"]
    assert rate["Type"] == burst["Type"] == "Number"
    assert int(rate["MinValue"]) >= 1 and int(burst["MinValue"]) >= 1
    # A burst below the rate would refuse a second's worth of requests arriving together.
    assert int(burst["Default"]) >= int(rate["Default"])
    stage = transformed({"ApiThrottleRate": "7", "ApiThrottleBurst": "9"})["Resources"][
        "HermesApiApiGatewayDefaultStage"
    ]
    assert stage["Properties"]["StageName"] == "$default"
    settings = stage["Properties"]["DefaultRouteSettings"]
    assert {key: int(value) for key, value in settings.items()} == {
        "ThrottlingRateLimit": 7,
        "ThrottlingBurstLimit": 9,
    }


# -- B: every function but the worker has reserved concurrency ---------------------------------
def test_every_http_function_has_reserved_concurrency_from_a_parameter() -> None:
    template = load_template()
    for name, fn in functions().items():
        skips = [
            s["id"]
            for s in template["Resources"][name]
            .get("Metadata", {})
            .get("checkov", {})
            .get("skip", [])
        ]
        if name == "WorkerFunction":
            # Capped by its event source mapping instead (a reservation below it throttles
            # batches back into the queue).
            [source] = [e for e in fn.properties["Events"].values() if e["Type"] == "SQS"]
            assert source["Properties"]["ScalingConfig"]["MaximumConcurrency"] == ref(
                "WorkerMaxConcurrency"
            )
            continue
        reserved = fn.properties["ReservedConcurrentExecutions"]
        param = parameters()[reserved["Ref"]]
        assert param["Type"] == "Number" and int(param["MinValue"]) >= 1, name
        assert "CKV_AWS_115" not in skips, name
    assert functions()["StatusFunction"].properties["ReservedConcurrentExecutions"] == ref(
        "StatusReservedConcurrency"
    )
    assert functions()["JobsFunction"].properties["ReservedConcurrentExecutions"] == ref(
        "JobsReservedConcurrency"
    )


# -- C: no function may use every SQS queue -------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, VPC], ids=["no-vpc", "vpc"])
def test_no_function_role_grants_sqs_on_every_queue(overrides: dict[str, str]) -> None:
    """Given the template as SAM expands it, then every function's role grants SQS actions
    on named queues only: in particular SAM's AWSLambdaSQSQueueExecutionRole (sqs:* on "*"),
    which it adds for an SQS event to a role it generates, is on no role."""
    template = transformed(overrides)
    lambdas = resources(template, "AWS::Lambda::Function")
    assert set(lambdas) == set(functions())
    for name in lambdas:
        role = role_of(name, template)
        managed = [a for a in role.get("ManagedPolicyArns", []) if isinstance(a, str)]
        assert set(managed) <= NO_SQS_MANAGED_POLICIES, (name, managed)
        for statement in statements_of(role):
            if any(str(a).startswith("sqs:") for a in as_list(statement["Action"])):
                for resource in as_list(statement["Resource"]):
                    assert "*" not in str(resource), (name, statement)
                    assert resource in (
                        {"Fn::GetAtt": ["JobsQueue", "Arn"]},
                        {"Fn::GetAtt": ["JobsDLQ", "Arn"]},
                    ), (name, statement)


def test_the_worker_may_poll_its_own_queue() -> None:
    """What Lambda checks on the role when it creates the SQS event source mapping, and what
    the worker does itself (retry backoff, re-queueing), on JobsQueue."""
    template = transformed()
    role = role_of("WorkerFunction", template)
    queue = {"Fn::GetAtt": ["JobsQueue", "Arn"]}
    actions = {
        a for s in statements_of(role) if s["Resource"] == queue for a in as_list(s["Action"])
    }
    assert actions == {
        "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes",
        "sqs:ChangeMessageVisibility", "sqs:SendMessage",
    }  # fmt: skip
    [mapping] = resources(template, "AWS::Lambda::EventSourceMapping").values()
    assert mapping["EventSourceArn"] == queue
    managed = role["ManagedPolicyArns"]
    assert "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess" in managed  # Tracing: Active
    vpc_role = role_of("WorkerFunction", transformed(VPC))
    assert (
        "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole"
        in vpc_role["ManagedPolicyArns"]
    )


# -- D: every function's logs are kept LogRetentionDays --------------------------------------
def test_every_function_has_a_log_group_with_retention() -> None:
    groups = resources(load_template(), "AWS::Logs::LogGroup")
    by_name = {g["LogGroupName"]["Fn::Sub"]: g for g in groups.values() if "LogGroupName" in g}
    for name in functions():
        group = by_name.get(f"/aws/lambda/${{{name}}}")
        assert group is not None, f"{name} has no log group /aws/lambda/<its name>"
        assert group["RetentionInDays"] == ref("LogRetentionDays")
    assert groups["ApiAccessLogs"]["RetentionInDays"] == ref("LogRetentionDays")
    param = parameters()["LogRetentionDays"]
    assert set(param["AllowedValues"]) <= LOG_RETENTION_DAYS
    assert param["Default"] in param["AllowedValues"]


# -- E: idempotency records are kept as long as the template says --------------------------
def test_records_are_kept_as_long_as_the_template_says(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given each function's environment as SAM resolves it, when a request runs under
    idempotency, then its record expires JobRetentionSeconds later."""

    default = int(parameters()["JobRetentionSeconds"]["Default"])
    environments = sam_environments({})
    assert {str(env["HERMES_JOB_RETENTION_S"]) for env in environments.values()} == {str(default)}
    overridden = sam_environments({"JobRetentionSeconds": "400000"})
    assert {str(env["HERMES_JOB_RETENTION_S"]) for env in overridden.values()} == {"400000"}

    import boto3

    from hermes.config import get_settings
    from hermes.idempotency import _persistence, once

    monkeypatch.setenv(
        "HERMES_JOB_RETENTION_S", environments["LlmFunction"]["HERMES_JOB_RETENTION_S"]
    )
    get_settings.cache_clear()
    _persistence.cache_clear()
    try:
        before = time.time()
        assert once(lambda d: {"ok": d["request_id"]}, {"request_id": "r-1"}, key="request_id") == {
            "ok": "r-1"
        }
        [record] = boto3.client("dynamodb").scan(TableName="IdempotencyTable")["Items"]
    finally:
        _persistence.cache_clear()
    assert before + default - 1 <= int(record["expiration"]["N"]) <= time.time() + default + 1


def test_records_outlive_a_job_s_message() -> None:
    """A job's message may wait in JobsQueue for its whole retention: its job record and
    idempotency record must still be there when it is delivered."""
    retention = int(queue_definitions()["JobsQueue"].attributes["MessageRetentionPeriod"])
    assert int(parameters()["JobRetentionSeconds"]["MinValue"]) >= retention
    properties = load_template()["Resources"]["IdempotencyTable"]["Properties"]
    assert properties["TimeToLiveSpecification"]["AttributeName"] == "expiration"  # powertools'


# -- F: the local endpoints are empty or a URL -----------------------------------------------
@pytest.mark.parametrize("name", ["LocalDynamoDbEndpoint", "LocalSqsEndpoint"])
@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        ("", True),
        ("http://172.17.0.1:8000", True),
        ("https://dynamodb.local.example:8443/", True),
        ("172.17.0.1:8000", False),
        ("ftp://host", False),
        ("http://a b", False),
        ("http://", False),
        (" http://host", False),
    ],
)
def test_local_endpoints_are_empty_or_an_http_url(name: str, value: str, allowed: bool) -> None:
    """CloudFormation matches AllowedPattern against the whole value."""
    pattern = parameters()[name]["AllowedPattern"]
    assert bool(re.fullmatch(pattern, value)) is allowed


@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        ("http://localhost:11434", True),
        ("http://10.0.1.20:11434", True),
        ("https://ollama.example.com/base", True),
        ("10.0.1.20:11434", False),
        ("", False),
        ("http://host name", False),
    ],
)
def test_ollama_url_is_an_http_url(value: str, allowed: bool) -> None:
    assert bool(re.fullmatch(parameters()["OllamaUrl"]["AllowedPattern"], value)) is allowed


# -- G: Lambda does not retry a failed asynchronous invoke -----------------------------------
def test_the_llm_function_is_not_retried_by_lambda() -> None:
    llm = functions()["LlmFunction"].properties
    assert llm["EventInvokeConfig"] == {"MaximumRetryAttempts": 0}
    configs = resources(transformed(), "AWS::Lambda::EventInvokeConfig")
    assert [(c["FunctionName"], c["MaximumRetryAttempts"]) for c in configs.values()] == [
        (ref("LlmFunction"), 0)
    ]


# -- H: a private Ollama needs the VPC -------------------------------------------------------
def evaluate(expression: Any, values: dict[str, Any]) -> Any:
    """CloudFormation's rule functions over parameter values (a CommaDelimitedList is a
    list; an empty one is [""])."""
    if isinstance(expression, dict) and len(expression) == 1:
        [(name, args)] = expression.items()
        if name == "Ref":
            return values[args]
        if name == "Fn::Equals":
            left, right = (evaluate(a, values) for a in args)
            return left == right
        if name == "Fn::Not":
            return not evaluate(args[0], values)
        if name == "Fn::And":
            return all(evaluate(a, values) for a in args)
        if name == "Fn::Or":
            return any(evaluate(a, values) for a in args)
        if name == "Fn::Contains":
            return evaluate(args[1], values) in evaluate(args[0], values)
        if name == "Fn::EachMemberEquals":
            return all(v == evaluate(args[1], values) for v in evaluate(args[0], values))
        if name == "Fn::EachMemberIn":
            return set(evaluate(args[0], values)) <= set(evaluate(args[1], values))
        raise AssertionError(f"not a rule function: {name}")
    if isinstance(expression, list):
        return [evaluate(e, values) for e in expression]
    return expression


def rule_failures(overrides: dict[str, str]) -> list[str]:
    """The AssertDescriptions of every failing assertion of the template's rules."""
    params = parameters()
    values: dict[str, Any] = {}
    for name, param in params.items():
        raw = overrides.get(name, str(param.get("Default", "")))
        values[name] = raw.split(",") if param["Type"] == "CommaDelimitedList" else raw
    failures = []
    for rule in load_template()["Rules"].values():
        if "RuleCondition" in rule and not evaluate(rule["RuleCondition"], values):
            continue
        failures += [
            a["AssertDescription"] for a in rule["Assertions"] if not evaluate(a["Assert"], values)
        ]
    return failures


@pytest.mark.parametrize(
    ("overrides", "fails"),
    [
        ({}, 0),  # the default: localhost, no VPC
        ({"OllamaUrl": "http://10.0.1.20:11434", "OllamaUrlIsPrivate": "true"}, 2),
        ({"OllamaUrl": "http://10.0.1.20:11434", "OllamaUrlIsPrivate": "true", **VPC}, 0),
        ({"OllamaUrlIsPrivate": "true", "VpcSubnetIds": "subnet-a"}, 1),  # no security group
        (
            {
                "OllamaUrlIsPrivate": "true",
                "VpcSubnetIds": "subnet-a,",
                "VpcSecurityGroupIds": "sg",
            },
            1,
        ),
        ({"OllamaUrl": "https://ollama.example.com", "OllamaUrlIsPrivate": "false"}, 0),
    ],
)
def test_a_private_ollama_requires_the_vpc_parameters(
    overrides: dict[str, str], fails: int
) -> None:
    failures = rule_failures(overrides)
    assert len(failures) == fails, failures
    assert all("OllamaUrlIsPrivate=true" in f for f in failures)


def test_the_vpc_rule_uses_only_rule_functions() -> None:
    """CloudFormation refuses other functions in a rule (cfn-lint checks it too); the
    evaluator above knows exactly the allowed ones."""
    allowed = {"Ref", "Fn::Equals", "Fn::Not", "Fn::And", "Fn::Or", "Fn::Contains",
               "Fn::EachMemberEquals", "Fn::EachMemberIn"}  # fmt: skip
    used: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            used.update(k for k in node if k == "Ref" or k.startswith("Fn::"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    rule = load_template()["Rules"]["PrivateOllamaNeedsVpc"]
    walk([rule["RuleCondition"], [a["Assert"] for a in rule["Assertions"]]])
    assert used <= allowed
    assert parameters()["OllamaUrlIsPrivate"]["AllowedValues"] == ["true", "false"]
