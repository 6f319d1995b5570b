"""Cross-instance admission control on DynamoDB leases. The only code that touches the lease table.

A *pool* is one item (`pk`) with a capacity: a model's slots, or later a host's
memory budget. Admission adds the caller's weight to `used` and records a lease
attribute `l_<id>` = {w: weight, exp: expiry ms} in one conditional write, so no
two writers can overshoot the capacity. Release removes the caller's own lease
attribute and subtracts its weight, conditional on that attribute still existing,
so a release can never free somebody else's slot.

A Lambda that crashes or times out never runs its `finally`, so its lease stays.
Whoever next finds the pool full reads the item (returned by the failed write),
removes the leases whose expiry has passed and tries again: recovery needs no
sweeper and never waits on DynamoDB TTL. Capacity comes from the caller on every
write, so a changed `max_concurrency` applies at once, with no migration.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from hermes.errors import HermesError, LimiterUnavailable

log = logging.getLogger(__name__)

LEASE_PREFIX = "l_"
# Bounded work per admission: each round is one write, plus one reaping write when
# the failed write showed expired leases.
MAX_ROUNDS = 4


@dataclass(frozen=True)
class Claim:
    """Take `weight` units of `pool`, whose capacity is `capacity`; `busy` is raised when full."""

    pool: str
    capacity: int
    weight: int
    busy: type[HermesError]


@dataclass(frozen=True)
class Lease:
    lease_id: str
    claims: tuple[Claim, ...]
    expires_at_ms: int


class Full(Exception):
    def __init__(self, claim: Claim) -> None:
        self.claim = claim


class Limiter:
    def __init__(self, client: Any, table: str, clock: Callable[[], float] = time.time) -> None:
        self._ddb = client
        self._table = table
        self._clock = clock

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- admission -------------------------------------------------------------

    def acquire(self, claims: Sequence[Claim], lease_ms: int, retry_after_s: int = 1) -> Lease:
        """Admit all claims atomically or raise the first full claim's `busy` error."""
        lease = Lease(uuid.uuid4().hex, tuple(claims), self._now_ms() + lease_ms)
        for round_ in range(MAX_ROUNDS):
            full_items = self._try_acquire(lease)
            if not full_items:
                return lease
            reaped = False
            for claim, item in full_items:
                reaped |= self._reap_expired(claim.pool, item)
            if not reaped:
                claim = full_items[0][0]
                raise claim.busy(
                    f"'{claim.pool.split('#', 1)[-1]}' is at capacity ({claim.capacity}); "
                    "retry later",
                    retry_after=retry_after_s,
                )
            log.info("reaped expired leases, retrying admission (round %d)", round_ + 1)
        claim = lease.claims[0]
        raise claim.busy(
            "capacity still contended after reaping; retry later", retry_after=retry_after_s
        )

    def _try_acquire(self, lease: Lease) -> list[tuple[Claim, dict[str, Any]]]:
        """One conditional write; returns the (claim, current item) pairs that were full."""
        expires = {"N": str(lease.expires_at_ms)}
        updates = []
        for claim in lease.claims:
            updates.append(
                {
                    "TableName": self._table,
                    "Key": {"pk": {"S": claim.pool}},
                    "UpdateExpression": (
                        "SET #used = if_not_exists(#used, :zero) + :w, #lease = :lease"
                    ),
                    "ConditionExpression": "attribute_not_exists(#used) OR #used <= :room",
                    "ExpressionAttributeNames": {
                        "#used": "used",
                        "#lease": LEASE_PREFIX + lease.lease_id,
                    },
                    "ExpressionAttributeValues": {
                        ":zero": {"N": "0"},
                        ":w": {"N": str(claim.weight)},
                        ":room": {"N": str(claim.capacity - claim.weight)},
                        ":lease": {"M": {"w": {"N": str(claim.weight)}, "exp": expires}},
                    },
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            )
        if len(updates) == 1:
            try:
                self._call("update_item", **updates[0])
            except _ConditionFailed as failed:
                return [(lease.claims[0], failed.item)]
            return []
        return self._transact_acquire(lease, updates)

    def _transact_acquire(
        self, lease: Lease, updates: list[dict[str, Any]]
    ) -> list[tuple[Claim, dict[str, Any]]]:
        for attempt in range(5):
            try:
                self._call("transact_write_items", TransactItems=[{"Update": u} for u in updates])
                return []
            except _TransactionCancelled as cancelled:
                full = [
                    (claim, reason.get("Item", {}))
                    for claim, reason in zip(lease.claims, cancelled.reasons, strict=False)
                    if reason.get("Code") == "ConditionalCheckFailed"
                ]
                if full:
                    return full
                # Only conflicts with concurrent transactions: back off briefly and retry.
                time.sleep(random.uniform(0.002, 0.01) * (attempt + 1))
        raise LimiterUnavailable("the lease table stayed contended; retry later", retry_after=1)

    def _reap_expired(self, pool: str, item: dict[str, Any]) -> bool:
        """Remove leases past their expiry from `pool`; True when something was freed."""
        now = self._now_ms()
        expired = {
            name: int(value["M"]["w"]["N"])
            for name, value in item.items()
            if name.startswith(LEASE_PREFIX) and int(value["M"]["exp"]["N"]) < now
        }
        if not expired:
            return False
        names = {f"#l{i}": name for i, name in enumerate(expired)}
        try:
            self._call(
                "update_item",
                TableName=self._table,
                Key={"pk": {"S": pool}},
                UpdateExpression=f"REMOVE {', '.join(names)} SET #used = #used - :freed",
                ConditionExpression=" AND ".join(f"attribute_exists({n})" for n in names),
                ExpressionAttributeNames={**names, "#used": "used"},
                ExpressionAttributeValues={":freed": {"N": str(sum(expired.values()))}},
            )
        except _ConditionFailed:
            # Another instance reaped or the owner released first: capacity moved anyway.
            return True
        log.warning("took over %d expired lease(s) in %s", len(expired), pool)
        return True

    # -- release -----------------------------------------------------------------

    def release(self, lease: Lease) -> bool:
        """Free the caller's own lease. False when it was already gone (expired and taken over)."""
        try:
            if len(lease.claims) == 1:
                return self._release_one(lease, lease.claims[0])
            try:
                self._call(
                    "transact_write_items",
                    TransactItems=[
                        {"Update": self._release_update(lease, c)} for c in lease.claims
                    ],
                )
                return True
            except _TransactionCancelled:
                # Part of the lease was taken over: free whatever is still ours, item by item.
                return all([self._release_one(lease, c) for c in lease.claims])
        except LimiterUnavailable as exc:
            # The lease expires by itself; the caller's answer must not depend on this write.
            log.error("release of lease %s failed, it will expire: %s", lease.lease_id, exc)
            return False

    def _release_update(self, lease: Lease, claim: Claim) -> dict[str, Any]:
        return {
            "TableName": self._table,
            "Key": {"pk": {"S": claim.pool}},
            "UpdateExpression": "REMOVE #lease SET #used = #used - :w",
            "ConditionExpression": "attribute_exists(#lease)",
            "ExpressionAttributeNames": {"#lease": LEASE_PREFIX + lease.lease_id, "#used": "used"},
            "ExpressionAttributeValues": {":w": {"N": str(claim.weight)}},
        }

    def _release_one(self, lease: Lease, claim: Claim) -> bool:
        try:
            self._call("update_item", **self._release_update(lease, claim))
        except _ConditionFailed:
            log.warning("lease %s in %s had expired and was taken over", lease.lease_id, claim.pool)
            return False
        return True

    # -- reading -----------------------------------------------------------------

    def usage(self, pools: Sequence[str]) -> dict[str, int]:
        """Weight held by unexpired leases per pool (one BatchGetItem)."""
        keys = [{"pk": {"S": pool}} for pool in pools]
        found: dict[str, int] = dict.fromkeys(pools, 0)
        if not keys:
            return found
        request = {self._table: {"Keys": keys, "ConsistentRead": True}}
        now = self._now_ms()
        for _ in range(3):
            response = self._call("batch_get_item", RequestItems=request)
            for item in response.get("Responses", {}).get(self._table, []):
                found[item["pk"]["S"]] = sum(
                    int(value["M"]["w"]["N"])
                    for name, value in item.items()
                    if name.startswith(LEASE_PREFIX) and int(value["M"]["exp"]["N"]) >= now
                )
            request = response.get("UnprocessedKeys") or {}
            if not request:
                return found
        raise LimiterUnavailable("the lease table did not answer every key; retry later")

    # -- DynamoDB adapter: ClientError codes become domain outcomes ----------------

    def _call(self, operation: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._ddb, operation)(**kwargs)
        except ClientError as exc:
            response: dict[str, Any] = dict(exc.response)  # loosen botocore's TypedDict
            code = response.get("Error", {}).get("Code", "")
            if code == "ConditionalCheckFailedException":
                raise _ConditionFailed(response.get("Item", {})) from None
            if code == "TransactionCanceledException":
                raise _TransactionCancelled(response.get("CancellationReasons", [])) from None
            log.error("DynamoDB %s failed: %s", operation, code)
            raise LimiterUnavailable(
                f"the lease table is unavailable ({code or 'error'}); no request is admitted",
                retry_after=1,
            ) from None
        except BotoCoreError as exc:
            log.error("DynamoDB %s failed: %s", operation, exc)
            raise LimiterUnavailable(
                "the lease table is unreachable; no request is admitted", retry_after=1
            ) from None


class _ConditionFailed(Exception):
    def __init__(self, item: dict[str, Any]) -> None:
        self.item = item


class _TransactionCancelled(Exception):
    def __init__(self, reasons: list[dict[str, Any]]) -> None:
        self.reasons = reasons
