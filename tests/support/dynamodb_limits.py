"""DynamoDB's documented request limits, checked on what Hermes really sends.

DynamoDB Local and moto do not enforce them (DynamoDB Local reaped 200 leases in one write
whose condition was 5 KB), so the tests check every request themselves: through a botocore
hook on an in-process client (`watch`), or in the delaying proxy for runner processes.

From the Developer Guide, "Service, account, and table quotas" → Expression parameters and
API-specific limits:
- any expression string (Update, Condition, Projection, Filter, KeyCondition) is at most 4 KB;
- any single expression attribute name or value placeholder (#name, :val) is at most 255 bytes;
- all substitution variables (ExpressionAttributeNames and ExpressionAttributeValues) together
  are at most 2 MB;
- an UpdateExpression has at most 300 operators or functions;
- a BatchGetItem reads at most 100 items;
- a TransactWriteItems holds at most 100 actions, each of which has the same expression
  limits as a request of its own (checked action by action);
and, from "Item sizes and formats", an item is at most 400 KB (`item_size`).
"""

from __future__ import annotations

import json
import re
from typing import Any

KB = 1024
MAX_EXPRESSION_BYTES = 4 * KB
MAX_PLACEHOLDER_BYTES = 255
MAX_SUBSTITUTION_BYTES = 2 * KB * KB
MAX_UPDATE_OPERATORS = 300
MAX_BATCH_GET_KEYS = 100
MAX_TRANSACT_ITEMS = 100
MAX_ITEM_BYTES = 400 * KB
EXPRESSIONS = (
    "UpdateExpression",
    "ConditionExpression",
    "ProjectionExpression",
    "FilterExpression",
    "KeyConditionExpression",
)
# Functions (name followed by "(") and the arithmetic operators of SET.
_UPDATE_OPERATOR = re.compile(r"\b[a-z_]+\s*\(|[+-]")


def violations(operation: str, params: dict[str, Any]) -> list[str]:
    """Every documented limit that the request `operation(**params)` breaks."""
    found = []
    for key in EXPRESSIONS:
        expression = params.get(key)
        if expression is not None and len(expression.encode()) > MAX_EXPRESSION_BYTES:
            found.append(f"{operation} {key} is {len(expression.encode())} bytes (max 4 KB)")
    update = params.get("UpdateExpression") or ""
    operators = len(_UPDATE_OPERATOR.findall(update))
    if operators > MAX_UPDATE_OPERATORS:
        found.append(f"{operation} UpdateExpression has {operators} operators (max 300)")
    names = params.get("ExpressionAttributeNames") or {}
    values = params.get("ExpressionAttributeValues") or {}
    for placeholder in [*names, *values]:
        if len(placeholder.encode()) > MAX_PLACEHOLDER_BYTES:
            found.append(f"{operation} placeholder {placeholder[:20]}... is over 255 bytes")
    substitutions = len(json.dumps(names).encode()) + len(json.dumps(values).encode())
    if substitutions > MAX_SUBSTITUTION_BYTES:
        found.append(f"{operation} substitution variables are {substitutions} bytes (max 2 MB)")
    if operation == "TransactWriteItems":
        actions = params.get("TransactItems") or []
        if len(actions) > MAX_TRANSACT_ITEMS:
            found.append(f"TransactWriteItems has {len(actions)} actions (max 100)")
        for action in actions:
            for kind, request in action.items():
                found += violations(f"TransactWriteItems {kind}", request)
    if operation == "BatchGetItem":
        keys = sum(len(t.get("Keys", [])) for t in (params.get("RequestItems") or {}).values())
        if keys > MAX_BATCH_GET_KEYS:
            found.append(f"BatchGetItem asks for {keys} keys (max 100)")
    return found


class ExpressionWatch:
    """A botocore hook on DynamoDB clients: every request is checked before it is sent;
    one that breaks a limit fails at once (AssertionError, which no Hermes code catches)
    and stays listed in `found` for a check at the end of the test."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.checked = 0

    def watch(self, client: Any) -> Any:
        client.meta.events.register(
            "provide-client-params.dynamodb.*", self._check, unique_id=f"dynamodb-limits-{id(self)}"
        )
        return client

    def _check(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.checked += 1
        broken = violations(model.name, params)
        if broken:
            self.found += broken
            raise AssertionError("; ".join(broken))


def item_size(item: dict[str, Any]) -> int:
    """An item's size by DynamoDB's documented rules (attribute names + values; maps 3 bytes
    plus 1 per element; numbers 1 byte per two significant digits plus 1; string sets the
    sum of their strings)."""
    return sum(len(name.encode()) + _value_size(value) for name, value in item.items())


def _value_size(value: dict[str, Any]) -> int:
    ((kind, data),) = value.items()
    if kind == "S":
        return len(data.encode())
    if kind == "N":
        digits = data.lstrip("-").replace(".", "").strip("0") or "0"
        return (len(digits) + 1) // 2 + 1
    if kind == "M":
        return 3 + sum(len(k.encode()) + _value_size(v) + 1 for k, v in data.items())
    if kind == "L":
        return 3 + sum(_value_size(v) + 1 for v in data)
    if kind == "SS":
        return sum(len(text.encode()) for text in data)
    if kind in ("BOOL", "NULL"):
        return 1
    raise ValueError(f"no size rule for {kind}")
