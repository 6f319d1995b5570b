"""What the lease table holds, read the way a test checks it: the live leases are ids in the
state items' expiry buckets (hermes/limiter/records.py)."""

from __future__ import annotations

from typing import Any

from hermes.limiter.records import buckets_of


def state_items(client: Any, table: str = "LeaseTable") -> list[dict[str, Any]]:
    """Every pool's state item, read consistently, all pages."""
    items: list[dict[str, Any]] = []
    request: dict[str, Any] = {"TableName": table, "ConsistentRead": True}
    while True:
        page = client.scan(**request)
        items += page["Items"]
        if "LastEvaluatedKey" not in page:
            break
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    return [item for item in items if item["sk"]["S"] == "state"]


def held_lease_ids(client: Any, table: str = "LeaseTable") -> list[str]:
    """The ids of every lease the table's state items hold, expired or not."""
    return [
        lease_id
        for item in state_items(client, table)
        for bucket in buckets_of(item).values()
        for lease_id in bucket.ids
    ]
