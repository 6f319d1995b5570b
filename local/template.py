"""Read template.yaml, the single source of truth for routes, tables and function settings,
so the local runner and the tests never repeat what the template declares."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader that keeps CloudFormation short-form tags (!Ref, !Sub...) as plain data."""


def _construct_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


_CfnLoader.add_multi_constructor("!", _construct_tag)


@lru_cache(maxsize=4)
def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_CfnLoader)  # noqa: S506 - SafeLoader subclass


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    function: str


@dataclass(frozen=True)
class Function:
    logical_id: str
    code_uri: Path
    handler: str
    timeout: int
    environment: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)


def resources(template: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {
        name: res.get("Properties", {})
        for name, res in template["Resources"].items()
        if res["Type"] == type_
    }


def functions(template: dict[str, Any] | None = None) -> dict[str, Function]:
    template = template or load_template()
    globals_ = template.get("Globals", {}).get("Function", {})
    found = {}
    for name, props in resources(template, "AWS::Serverless::Function").items():
        env = {
            **globals_.get("Environment", {}).get("Variables", {}),
            **props.get("Environment", {}).get("Variables", {}),
        }
        found[name] = Function(
            logical_id=name,
            code_uri=ROOT / props["CodeUri"],
            handler=props["Handler"],
            timeout=int(props.get("Timeout", globals_.get("Timeout", 3))),
            environment=env,
            properties=props,
        )
    return found


def http_routes(template: dict[str, Any] | None = None) -> list[Route]:
    template = template or load_template()
    routes = []
    for name, props in resources(template, "AWS::Serverless::Function").items():
        for event in props.get("Events", {}).values():
            if event["Type"] == "HttpApi":
                routes.append(
                    Route(event["Properties"]["Method"].upper(), event["Properties"]["Path"], name)
                )
    return routes


def table_definitions(template: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """create_table arguments for each AWS::DynamoDB::Table, named by its logical id."""
    template = template or load_template()
    tables = {}
    for name, props in resources(template, "AWS::DynamoDB::Table").items():
        args: dict[str, Any] = {
            "TableName": name,
            "AttributeDefinitions": props["AttributeDefinitions"],
            "KeySchema": props["KeySchema"],
            "BillingMode": props.get("BillingMode", "PROVISIONED"),
        }
        if "GlobalSecondaryIndexes" in props:
            args["GlobalSecondaryIndexes"] = props["GlobalSecondaryIndexes"]
        tables[name] = args
    return tables


@dataclass(frozen=True)
class Queue:
    name: str
    attributes: dict[str, str]
    dead_letter: str | None
    max_receive_count: int | None


@dataclass(frozen=True)
class QueueSource:
    function: str
    queue: str
    batch_size: int
    # ScalingConfig.MaximumConcurrency: batches the event source runs at once (instances).
    max_concurrency: int


def queue_definitions(template: dict[str, Any] | None = None) -> dict[str, Queue]:
    """The template's SQS queues, named by logical id; dead-letter queues first."""
    template = template or load_template()
    queues = {}
    for name, props in resources(template, "AWS::SQS::Queue").items():
        attributes = {
            key: str(resolve(props[key], template))
            for key in ("VisibilityTimeout", "MessageRetentionPeriod")
            if key in props
        }
        redrive = props.get("RedrivePolicy")
        queues[name] = Queue(
            name=name,
            attributes=attributes,
            dead_letter=redrive["deadLetterTargetArn"]["Fn::GetAtt"][0] if redrive else None,
            max_receive_count=int(resolve(redrive["maxReceiveCount"], template))
            if redrive
            else None,
        )
    return dict(sorted(queues.items(), key=lambda item: item[1].dead_letter is not None))


def queue_sources(template: dict[str, Any] | None = None) -> list[QueueSource]:
    template = template or load_template()
    found = []
    for name, props in resources(template, "AWS::Serverless::Function").items():
        for event in props.get("Events", {}).values():
            if event["Type"] == "SQS":
                properties = event["Properties"]
                queue = properties["Queue"]["Fn::GetAtt"][0]
                scaling = properties.get("ScalingConfig", {}).get("MaximumConcurrency")
                found.append(
                    QueueSource(
                        name,
                        queue,
                        int(properties.get("BatchSize", 10)),
                        # Lambda's default without a ScalingConfig is up to 1,000 instances;
                        # locally that many threads would only contend: one per host slot.
                        int(resolve(scaling, template)) if scaling is not None else 2,
                    )
                )
    return found


def parameter_overrides() -> dict[str, str]:
    """HERMES_PARAMETERS="Name=value Name2=value2", the format of sam's --parameter-overrides."""
    pairs = (item.split("=", 1) for item in os.environ.get("HERMES_PARAMETERS", "").split())
    return {name: value for name, value in pairs}


def resolve(value: Any, template: dict[str, Any], names: dict[str, str] | None = None) -> Any:
    """Resolve the intrinsics used in environment variables for a local run: a Ref to a
    parameter gives its default, a Ref to a resource gives its local name (`names`, e.g. a
    queue's URL) or else its logical id (the local table name)."""
    if isinstance(value, dict) and set(value) == {"Ref"}:
        ref = value["Ref"]
        params = template.get("Parameters", {})
        if ref in params:
            return parameter_overrides().get(ref, str(params[ref].get("Default", "")))
        return (names or {}).get(ref, ref)
    return value
