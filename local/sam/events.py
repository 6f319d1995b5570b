"""Which function an events/ file is for, read from the template (so `make sam-invoke`
needs only EVENT, and the tests invoke every event with the right function)."""

from __future__ import annotations

from typing import Any

from local.template import http_routes, load_template, queue_sources, resources


def function_for(event: dict[str, Any]) -> str:
    """The route's function for an HTTP API event, the queue's consumer for an SQS batch,
    else the function callers may invoke directly (the one the template's
    lambda:InvokeFunction policy names)."""
    template = load_template()
    if "routeKey" in event:
        method, path = event["routeKey"].split(" ", 1)
        for route in http_routes(template):
            if (route.method, route.path) == (method, path):
                return route.function
        raise LookupError(f"no function serves {event['routeKey']}")
    records = event.get("Records") or []
    if records and records[0].get("eventSource") == "aws:sqs":
        return queue_sources(template)[0].function
    for policy in resources(template, "AWS::IAM::ManagedPolicy").values():
        for statement in policy["PolicyDocument"]["Statement"]:
            if statement["Action"] == "lambda:InvokeFunction":
                return str(statement["Resource"]["Fn::GetAtt"][0])
    raise LookupError("no function is invoked directly")
