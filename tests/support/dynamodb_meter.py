"""Counts what a boto3 DynamoDB client sends: every call by operation and thread, with the
capacity it consumed. A hook adds ReturnConsumedCapacity=TOTAL to every request, and
`after-call` records cancelled transactions too. Shared by the limiter's integration tests
and the benchmark (bench/lease_cost.py)."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from typing import Any

WRITES = {"TransactWriteItems", "UpdateItem", "PutItem", "DeleteItem", "BatchWriteItem"}
READS = {"GetItem", "BatchGetItem", "Query", "Scan", "TransactGetItems"}


class Meter:
    def __init__(self, client: Any) -> None:
        self.calls: list[tuple[str, str, float]] = []  # (operation, thread, capacity units)
        self._lock = threading.Lock()
        client.meta.events.register("provide-client-params.dynamodb.*", self._ask)
        client.meta.events.register("after-call.dynamodb.*", self._record)

    def _ask(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        if model.name in WRITES | READS:
            params.setdefault("ReturnConsumedCapacity", "TOTAL")

    def _record(self, parsed: dict[str, Any], model: Any, **_: Any) -> None:
        consumed = parsed.get("ConsumedCapacity") or []
        if isinstance(consumed, dict):
            consumed = [consumed]
        units = sum(c.get("CapacityUnits", 0.0) for c in consumed)
        with self._lock:
            self.calls.append((model.name, threading.current_thread().name, units))

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()

    def ops(self, thread: str | None = None) -> Tally[str]:
        with self._lock:
            return Tally(op for op, t, _ in self.calls if thread in (None, t))

    def writes(self, thread: str | None = None) -> int:
        return sum(n for op, n in self.ops(thread).items() if op in WRITES)

    def reads(self, thread: str | None = None) -> int:
        return sum(n for op, n in self.ops(thread).items() if op in READS)

    def units(self, operations: set[str]) -> float:
        with self._lock:
            return sum(u for op, _, u in self.calls if op in operations)
