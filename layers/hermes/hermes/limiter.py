"""Cross-instance admission control on DynamoDB leases. The only code that touches the lease table.

A *pool* is one item (`pk`), e.g. an Ollama host. It holds counters: the host's
memory in use and the in-flight count of each model served there. Admission adds
the caller's weight to every counter it claims and records a lease attribute
`l_<id>` = {exp: expiry ms, w: {counter: weight}} in ONE conditional UpdateItem,
whose condition checks every counter against its capacity. So the model slot and
the memory budget are taken atomically, with no transaction, and no two writers
can overshoot. Release removes the caller's own lease attribute and subtracts its
weights, conditional on that attribute still existing, so a release can never
free somebody else's capacity.

A Lambda that crashes or times out never runs its `finally`, so its lease stays.
Whoever next finds the pool full reads the item (returned by the failed write),
removes the leases whose expiry has passed and tries again: recovery needs no
sweeper and never waits on DynamoDB TTL. Capacities come from the caller on every
write, so a changed `max_concurrency` or budget applies at once, with no migration.

Slow DynamoDB is safe because a lease carries the expiry it was *granted* with (read
back from the item), and the holder derives its run time from it (`time_left`), never
from when it asked. Every request the limiter builds stays within DynamoDB's bounds
whatever the number of leases: reaping goes in batches of REAP_BATCH, reads in batches
of BATCH_GET_MAX_KEYS.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from hermes.errors import HermesError, LimiterUnavailable

log = logging.getLogger(__name__)

LEASE_PREFIX = "l_"
# Bounded work per admission: each round is one write, plus the reaping writes when
# the failed write showed expired leases.
MAX_ROUNDS = 4
# Leases removed by one reaping write. Its expressions grow with the batch (about 27 bytes
# of ConditionExpression and 25 of UpdateExpression per lease and per counter), and real
# DynamoDB refuses any expression over 4 KB: in one write, ~150 leases broke it. 50 leases
# (and at most 51 counters) keep each expression under 1.5 KB.
REAP_BATCH = 50
# BatchGetItem takes at most 100 keys per call.
BATCH_GET_MAX_KEYS = 100


@dataclass(frozen=True)
class Counter:
    """Take `weight` of counter `name`, whose capacity is `capacity`; `busy` when it is full."""

    name: str
    capacity: int
    weight: int
    busy: type[HermesError]
    label: str


@dataclass(frozen=True)
class Lease:
    lease_id: str
    pool: str
    counters: tuple[Counter, ...]
    expires_at_ms: int
    # Each counter's value right after this admission (for in-flight metrics).
    counts: dict[str, int] = field(default_factory=dict, compare=False)


class Limiter:
    def __init__(self, client: Any, table: str, clock: Callable[[], float] = time.time) -> None:
        self._ddb = client
        self._table = table
        self._clock = clock

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- admission -------------------------------------------------------------

    def acquire(
        self, pool: str, counters: Sequence[Counter], lease_ms: int, retry_after_s: int = 1
    ) -> Lease:
        """Take every counter at once, or raise the `busy` error of the first full one.

        The returned lease's `expires_at_ms` is the expiry DynamoDB holds, however long the
        writes took: the caller must stop using the lease before it (`time_left`). When no
        answer comes back (LimiterUnavailable) although the write may have landed, the lease
        is removed again, best effort, so that it does not hold the slot until it expires."""
        lease = Lease(uuid.uuid4().hex, pool, tuple(counters), 0)
        for _ in range(MAX_ROUNDS):
            # A fresh expiry each round: reaping rounds must not eat into the lease.
            lease = replace(lease, expires_at_ms=self._now_ms() + lease_ms)
            try:
                updated = self._call("update_item", **self._acquire_update(lease))
            except _ConditionFailed as failed:
                item = failed.item
            except LimiterUnavailable:
                self._withdraw(lease)
                raise
            else:
                return _granted(lease, updated.get("Attributes", {}))
            if LEASE_PREFIX + lease.lease_id in item:
                # Our own write had already landed and a retry (after a timeout or a lost
                # answer) hit the lease-must-be-new condition: admitted, exactly once.
                return _granted(lease, item)
            if self._reap_expired(pool, item):
                continue  # capacity came back from crashed holders: try again
            full = next(
                (c for c in lease.counters if _value(item, c.name) + c.weight > c.capacity), None
            )
            if full is not None:
                raise full.busy(
                    f"{full.label} is at capacity ({full.capacity}); retry later",
                    retry_after=retry_after_s,
                )
            # The item changed between our write and its snapshot: simply try again.
        first = lease.counters[0]
        raise first.busy(f"{first.label} is contended; retry later", retry_after=retry_after_s)

    def time_left(self, lease: Lease) -> float:
        """Seconds until `lease` expires, by this limiter's clock (negative once expired)."""
        return (lease.expires_at_ms - self._now_ms()) / 1000

    def _acquire_update(self, lease: Lease) -> dict[str, Any]:
        names = {"#lease": LEASE_PREFIX + lease.lease_id}
        values: dict[str, Any] = {":zero": {"N": "0"}}
        sets, conditions = [], []
        for i, counter in enumerate(lease.counters):
            names[f"#c{i}"] = counter.name
            values[f":w{i}"] = {"N": str(counter.weight)}
            values[f":room{i}"] = {"N": str(counter.capacity - counter.weight)}
            sets.append(f"#c{i} = if_not_exists(#c{i}, :zero) + :w{i}")
            conditions.append(f"(attribute_not_exists(#c{i}) OR #c{i} <= :room{i})")
        weights = {c.name: {"N": str(c.weight)} for c in lease.counters}
        values[":lease"] = {"M": {"exp": {"N": str(lease.expires_at_ms)}, "w": {"M": weights}}}
        return {
            "TableName": self._table,
            "Key": {"pk": {"S": lease.pool}},
            "UpdateExpression": "SET " + ", ".join([*sets, "#lease = :lease"]),
            # attribute_not_exists(#lease) makes a retried admission idempotent: if the first
            # attempt was applied but its answer lost, the retry cannot count it twice.
            "ConditionExpression": " AND ".join(["attribute_not_exists(#lease)", *conditions]),
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            "ReturnValues": "UPDATED_NEW",
        }

    def _reap_expired(self, pool: str, item: dict[str, Any]) -> bool:
        """Remove leases past their expiry from `pool`, REAP_BATCH per write so that every
        expression stays small however many there are; True when something was freed."""
        now = self._now_ms()
        expired = [
            (name, _weights(value))
            for name, value in item.items()
            if name.startswith(LEASE_PREFIX) and int(value["M"]["exp"]["N"]) < now
        ]
        if not expired:
            return False
        reaped = 0
        for start in range(0, len(expired), REAP_BATCH):
            batch = expired[start : start + REAP_BATCH]
            try:
                self._call("update_item", **self._reap_update(pool, batch))
            except _ConditionFailed:
                # Another instance is reaping them or an owner released one: capacity moved
                # anyway, and the next round sees what is left.
                break
            reaped += len(batch)
        if reaped:
            log.warning("took over %d expired lease(s) in %s", reaped, pool)
        return True

    def _reap_update(self, pool: str, batch: list[tuple[str, dict[str, int]]]) -> dict[str, Any]:
        freed: dict[str, int] = {}
        for _, weights in batch:
            for counter, weight in weights.items():
                freed[counter] = freed.get(counter, 0) + weight
        names = {f"#l{i}": name for i, (name, _) in enumerate(batch)}
        names |= {f"#c{i}": counter for i, counter in enumerate(freed)}
        sets = [f"#c{i} = #c{i} - :f{i}" for i in range(len(freed))]
        return {
            "TableName": self._table,
            "Key": {"pk": {"S": pool}},
            "UpdateExpression": f"REMOVE {', '.join(f'#l{i}' for i in range(len(batch)))}"
            + (f" SET {', '.join(sets)}" if sets else ""),
            "ConditionExpression": " AND ".join(
                f"attribute_exists(#l{i})" for i in range(len(batch))
            ),
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": {
                f":f{i}": {"N": str(weight)} for i, weight in enumerate(freed.values())
            }
            or None,
        }

    # -- release -----------------------------------------------------------------

    def release(self, lease: Lease) -> bool:
        """Free the caller's own lease. False when it was already gone (expired and taken
        over) or DynamoDB failed; then the lease simply expires."""
        try:
            self._remove(lease)
        except _ConditionFailed:
            # Taken over after it expired, or freed by an earlier attempt whose answer was lost.
            log.warning("lease %s in %s was already gone", lease.lease_id, lease.pool)
            return False
        except LimiterUnavailable as exc:
            # The caller's answer must not depend on this write; the lease expires by itself.
            log.error("release of lease %s failed, it will expire: %s", lease.lease_id, exc)
            return False
        return True

    def _withdraw(self, lease: Lease) -> None:
        """Best effort, after an admission whose answer was lost: remove the lease if the
        write landed after all (if it did not, the condition makes this a no-op)."""
        try:
            self._remove(lease)
        except _ConditionFailed:
            return  # the write never landed: nothing was held
        except LimiterUnavailable as exc:
            log.error(
                "unanswered admission %s may hold its slot until it expires: %s",
                lease.lease_id,
                exc,
            )
            return
        log.warning(
            "admission %s in %s got no answer; its lease was removed", lease.lease_id, lease.pool
        )

    def _remove(self, lease: Lease) -> None:
        names = {"#lease": LEASE_PREFIX + lease.lease_id}
        names |= {f"#c{i}": c.name for i, c in enumerate(lease.counters)}
        sets = [f"#c{i} = #c{i} - :w{i}" for i in range(len(lease.counters))]
        self._call(
            "update_item",
            TableName=self._table,
            Key={"pk": {"S": lease.pool}},
            UpdateExpression=f"REMOVE #lease SET {', '.join(sets)}",
            ConditionExpression="attribute_exists(#lease)",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues={
                f":w{i}": {"N": str(c.weight)} for i, c in enumerate(lease.counters)
            },
        )

    # -- reading -----------------------------------------------------------------

    def usage(self, pools: Sequence[str]) -> dict[str, dict[str, int]]:
        """Per pool, the weight unexpired leases hold on each counter (one BatchGetItem per
        BATCH_GET_MAX_KEYS pools)."""
        unique = list(dict.fromkeys(pools))
        found: dict[str, dict[str, int]] = {pool: {} for pool in unique}
        now = self._now_ms()
        for start in range(0, len(unique), BATCH_GET_MAX_KEYS):
            for item in self._batch_get(unique[start : start + BATCH_GET_MAX_KEYS]):
                totals = found[item["pk"]["S"]]
                for name, value in item.items():
                    if name.startswith(LEASE_PREFIX) and int(value["M"]["exp"]["N"]) >= now:
                        for counter, weight in _weights(value).items():
                            totals[counter] = totals.get(counter, 0) + weight
        return found

    def _batch_get(self, pools: Sequence[str]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        request = {self._table: {"Keys": [{"pk": {"S": p}} for p in pools], "ConsistentRead": True}}
        for _ in range(3):
            response = self._call("batch_get_item", RequestItems=request)
            items += response.get("Responses", {}).get(self._table, [])
            request = response.get("UnprocessedKeys") or {}
            if not request:
                return items
        raise LimiterUnavailable("the lease table did not answer every key; retry later")

    # -- DynamoDB adapter: ClientError codes become domain outcomes ----------------

    def _call(self, operation: str, **kwargs: Any) -> Any:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            return getattr(self._ddb, operation)(**kwargs)
        except ClientError as exc:
            response: dict[str, Any] = dict(exc.response)  # loosen botocore's TypedDict
            code = response.get("Error", {}).get("Code", "")
            if code == "ConditionalCheckFailedException":
                raise _ConditionFailed(response.get("Item", {})) from None
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


def _granted(lease: Lease, item: dict[str, Any]) -> Lease:
    """`lease` as DynamoDB holds it: the expiry of the write that landed (a retry of an
    earlier round may have carried another), and each counter's value after it."""
    stored = item.get(LEASE_PREFIX + lease.lease_id)
    expires_at_ms = int(stored["M"]["exp"]["N"]) if stored else lease.expires_at_ms
    counts = {c.name: _value(item, c.name) for c in lease.counters}
    return replace(lease, expires_at_ms=expires_at_ms, counts=counts)


def _value(item: dict[str, Any], name: str) -> int:
    return int(item[name]["N"]) if name in item else 0


def _weights(lease_value: dict[str, Any]) -> dict[str, int]:
    return {k: int(v["N"]) for k, v in lease_value["M"]["w"]["M"].items()}


class _ConditionFailed(Exception):
    def __init__(self, item: dict[str, Any]) -> None:
        self.item = item
