"""The writes the limiter makes (no I/O here): single-item updates of a pool's state item
and the TransactWriteItems items of the queue.

Invariants every write keeps (docs in README "How the limits hold"):
- a lease id enters its bucket's id set in the same write that adds exactly its weights to
  the counters and to the bucket, conditional on not being there yet, and leaves it in the
  same write that subtracts them, conditional on being there; a reap takes a whole expired
  bucket, conditional on its weights and id count being what it read (I1: counters = sum of
  the buckets' weights, each lease counted once);
- every update that *increases* a counter is conditional on the result staying within the
  capacity the writer was configured with (I2);
- every queue entry put or delete goes with q_waiting ± 1, and the same on the count of its
  model's waiters, q_waiting#<digest of its first counter> (I4).
Expressions stay far under DynamoDB's 4 KB: about 40 bytes per attribute touched.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from hermes.limiter.records import (
    ANY,
    BLOCKED,
    STATE_SK,
    VT,
    WAITING,
    Bucket,
    Entry,
    Lease,
    Ticket,
    bucket_of,
    ids_attr,
    key,
    n,
    s,
    waiting_attr,
    weight_attr,
)

# A grant notice is deleted by its lease's release; one whose holder crashed is left to the
# table's TTL this long after the lease's expiry.
NOTICE_TTL_S = 3600


class Update:
    """An UpdateItem of one item, composed clause by clause (placeholders are numbered, and
    an attribute named twice keeps its placeholder)."""

    def __init__(self, table: str, pk: str, sk: str = STATE_SK) -> None:
        self.table, self.key = table, key(pk, sk)
        self.names: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        self.adds: list[str] = []
        self.deletes: list[str] = []
        self.removes: list[str] = []
        self.sets: list[str] = []
        self.conditions: list[str] = []

    def name(self, attr: str) -> str:
        for placeholder, known in self.names.items():
            if known == attr:
                return placeholder
        placeholder = f"#a{len(self.names)}"
        self.names[placeholder] = attr
        return placeholder

    def value(self, value: Any) -> str:
        placeholder = f":v{len(self.values)}"
        self.values[placeholder] = value
        return placeholder

    def add(self, attr: str, number: int) -> None:
        if number:
            self.adds.append(f"{self.name(attr)} {self.value(n(number))}")

    def add_id(self, bucket: int, ids: set[str]) -> None:
        self.adds.append(f"{self.name(ids_attr(bucket))} {self.value({'SS': sorted(ids)})}")

    def delete_id(self, bucket: int, lease_id: str) -> None:
        self.deletes.append(f"{self.name(ids_attr(bucket))} {self.value({'SS': [lease_id]})}")

    def remove(self, attr: str) -> None:
        self.removes.append(self.name(attr))

    def set(self, attr: str, value: Any) -> None:
        self.sets.append(f"{self.name(attr)} = {self.value(value)}")

    def when(self, condition: str) -> None:
        self.conditions.append(condition)

    def within(self, counter: str, capacity: int, delta: int) -> None:
        """Conditional on `counter` staying within `capacity` once `delta` is added."""
        attr = self.name(counter)
        self.when(f"(attribute_not_exists({attr}) OR {attr} <= {self.value(n(capacity - delta))})")

    def holds(self, bucket: int, lease_id: str) -> None:
        self.when(f"contains({self.name(ids_attr(bucket))}, {self.value(s(lease_id))})")

    def lacks(self, bucket: int, lease_id: str) -> None:
        attr = self.name(ids_attr(bucket))
        self.when(
            f"(attribute_not_exists({attr}) OR NOT contains({attr}, {self.value(s(lease_id))}))"
        )

    def unwait(self, waits_for: Sequence[str]) -> None:
        """Waiters leave the queue: one for each counter in `waits_for` (their first)."""
        self.add(WAITING, -len(waits_for))
        for counter, count in collections.Counter(waits_for).items():
            self.add(waiting_attr(counter), -count)

    def nobody_waits(self) -> None:
        attr = self.name(WAITING)
        self.when(f"(attribute_not_exists({attr}) OR {attr} = {self.value(n(0))})")

    def take(self, lease: Lease) -> None:
        for counter in lease.counters:
            self.add(counter.name, counter.weight)
            self.add(weight_attr(lease.bucket, counter.name), counter.weight)
        self.add_id(lease.bucket, {lease.lease_id})

    def give_back(self, lease: Lease) -> None:
        for counter in lease.counters:
            self.add(counter.name, -counter.weight)
            self.add(weight_attr(lease.bucket, counter.name), -counter.weight)
        self.delete_id(lease.bucket, lease.lease_id)

    def reap(self, bucket: Bucket) -> None:
        """Remove a whole expired bucket, conditional on it being exactly as read (no release
        or late admission meanwhile). Its weights come off the counters in the caller's
        delta (an update names each counter once)."""
        ids = self.name(ids_attr(bucket.end))
        self.remove(ids_attr(bucket.end))
        if bucket.ids:
            # (attribute_exists first: moto fails size() of a missing attribute)
            self.when(f"attribute_exists({ids}) AND size({ids}) = {self.value(n(len(bucket.ids)))}")
        else:
            self.when(f"attribute_not_exists({ids})")
        for counter, weight in bucket.weights.items():
            attr = weight_attr(bucket.end, counter)
            self.remove(attr)
            self.when(f"{self.name(attr)} = {self.value(n(weight))}")

    def request(self, return_old: bool = True) -> dict[str, Any]:
        """The UpdateItem's arguments (also a transaction's "Update" item)."""
        clauses = [
            ("SET", self.sets),
            ("ADD", self.adds),
            ("DELETE", self.deletes),
            ("REMOVE", self.removes),
        ]
        request: dict[str, Any] = {
            "TableName": self.table,
            "Key": self.key,
            "UpdateExpression": " ".join(f"{word} {', '.join(c)}" for word, c in clauses if c),
        }
        if self.conditions:
            request["ConditionExpression"] = " AND ".join(self.conditions)
        if self.names:
            request["ExpressionAttributeNames"] = self.names
        if self.values:  # DynamoDB refuses empty maps
            request["ExpressionAttributeValues"] = self.values
        if return_old:
            request["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        return request


def admit(table: str, lease: Lease) -> dict[str, Any]:
    """Direct admission, one UpdateItem: add the weights (within capacity, and only if no
    waiter is short of these counters) and the lease's id to its bucket (only if not there:
    a retry whose first attempt landed is recognized, not applied twice). ALL_OLD says why
    on a refusal; the new counts come back on success."""
    update = Update(table, lease.pool)
    update.take(lease)
    waiting, blocked = update.name(WAITING), update.name(BLOCKED)
    zero, any_ = update.value(n(0)), update.value(s(ANY))
    open_ = [f"NOT contains({blocked}, {any_})"]
    open_ += [f"NOT contains({blocked}, {update.value(s(c.name))})" for c in lease.counters]
    # Nobody waits, or nobody waits for these counters (q_blocked: see grant_pass_state).
    update.when(
        f"(attribute_not_exists({waiting}) OR {waiting} = {zero} OR ({' AND '.join(open_)}))"
    )
    for counter in lease.counters:
        update.within(counter.name, counter.capacity, counter.weight)
    update.lacks(lease.bucket, lease.lease_id)
    return update.request() | {"ReturnValues": "UPDATED_NEW"}


def release(table: str, lease: Lease, only_if_nobody_waits: bool) -> dict[str, Any]:
    """Subtract the lease's weights and drop its id, one UpdateItem, conditional on the id
    being there (else it expired and was reaped); `only_if_nobody_waits` makes it fail too
    when somebody waits, so that the releaser hands over instead. ALL_OLD says which; the
    whole new state comes back on success (for tidying empty buckets)."""
    update = Update(table, lease.pool)
    update.give_back(lease)
    update.holds(lease.bucket, lease.lease_id)
    if only_if_nobody_waits:
        update.nobody_waits()
    return update.request() | {"ReturnValues": "ALL_NEW"}


def tidy(table: str, pool: str, buckets: list[Bucket]) -> dict[str, Any]:
    """Remove buckets that hold nothing (every lease in them released), conditional on them
    still holding nothing: without this the state item would keep one empty bucket per
    BUCKET_MS of traffic."""
    update = Update(table, pool)
    for bucket in buckets:
        update.remove(ids_attr(bucket.end))
        update.when(f"attribute_not_exists({update.name(ids_attr(bucket.end))})")
        for counter in bucket.weights:
            update.remove(weight_attr(bucket.end, counter))
            update.when(f"{update.name(weight_attr(bucket.end, counter))} = {update.value(n(0))}")
    return update.request(return_old=False)


def delete_notice(table: str, ticket_id: str) -> dict[str, Any]:
    return {"TableName": table, "Key": key(f"grant#{ticket_id}", "grant")}


def enqueue(
    table: str, ticket: Ticket, full: list[str], max_waiting: int | None = None
) -> list[dict[str, Any]]:
    """Count the waiter and put its queue entry, only if it is still not admissible (waiters
    hold one of its counters, or one is full: else ALL_OLD says so) and fewer than
    `max_waiting` wait for its first counter; `full`: the counters it cannot have now, which
    newcomers must not take (q_blocked)."""
    update = Update(table, ticket.pool)
    update.add(WAITING, 1)
    mine = waiting_attr(ticket.counters[0].name)
    update.add(mine, 1)
    if max_waiting is not None:
        update.when(
            f"(attribute_not_exists({update.name(mine)}) OR "
            f"{update.name(mine)} < {update.value(n(max_waiting))})"
        )
    waiting, blocked = update.name(WAITING), update.name(BLOCKED)
    held = [f"contains({blocked}, {update.value(s(ANY))})"]
    busy = []
    for counter in ticket.counters:
        held.append(f"contains({blocked}, {update.value(s(counter.name))})")
        room = update.value(n(counter.capacity - counter.weight))
        busy.append(f"{update.name(counter.name)} > {room}")
    if full:
        update.adds.append(f"{blocked} {update.value({'SS': full})}")
    zero = update.value(n(0))
    gated = f"({waiting} > {zero} AND ({' OR '.join(held)}))"
    update.when(f"({' OR '.join([gated, *busy])})")
    entry = {
        **key(f"{ticket.pool}#queue", ticket.sk),
        "t": s(ticket.ticket_id),
        "c": {"L": [{"L": [s(c.name), n(c.capacity), n(c.weight)]} for c in ticket.counters]},
        "wu": n(ticket.wait_until_ms),
        "ru": n(ticket.run_until_ms),
        "lm": n(ticket.lease_ms),
    }
    if ticket.start is not None:
        entry["vs"] = n(ticket.start)
    return [
        {"Update": update.request()},
        {
            "Put": {
                "TableName": table,
                "Item": entry,
                "ConditionExpression": "attribute_not_exists(pk)",
            }
        },
    ]


def abandon(table: str, ticket: Ticket) -> list[dict[str, Any]]:
    update = Update(table, ticket.pool)
    update.unwait([ticket.counters[0].name])
    return [
        {
            "Delete": {
                "TableName": table,
                "Key": key(f"{ticket.pool}#queue", ticket.sk),
                "ConditionExpression": "attribute_exists(pk)",
            }
        },
        {"Update": update.request(return_old=False)},
    ]


def grant(
    table: str, pool: str, entry: Entry, expires: int, bucket: int, counts: dict[str, int]
) -> list[dict[str, Any]]:
    """Hand a lease to a waiter: its entry goes (it must still be there: not abandoned) and
    its notice comes. Its weights and id go into the state item in the same transaction."""
    notice = {
        **key(f"grant#{entry.ticket_id}", "grant"),
        "exp": n(expires),
        "b": n(bucket),
        "n": {"M": {k: n(v) for k, v in counts.items()}},
        "ttl": n(expires // 1000 + NOTICE_TTL_S),
    }
    return [
        {
            "Delete": {
                "TableName": table,
                "Key": key(f"{pool}#queue", entry.sk),
                "ConditionExpression": "attribute_exists(pk)",
            }
        },
        {
            "Put": {
                "TableName": table,
                "Item": notice,
                "ConditionExpression": "attribute_not_exists(pk)",
            }
        },
    ]


def drop_entry(table: str, pool: str, sk: str, now: int) -> dict[str, Any]:
    """A lapsed waiter's entry (a crashed waiter's), only once its wait deadline has passed."""
    return {
        "Delete": {
            "TableName": table,
            "Key": key(f"{pool}#queue", sk),
            "ConditionExpression": "attribute_exists(pk) AND #wu <= :now",
            "ExpressionAttributeNames": {"#wu": "wu"},
            "ExpressionAttributeValues": {":now": n(now)},
        }
    }


def grant_bucket(expires: int, lease_ms: int, taken: int | None) -> int:
    """The bucket a grant's lease goes in: its expiry's, or the next one if that is `taken`
    (the releaser's: one update may not both add to and delete from an id set; a later
    bucket only means a later reap if the holder crashes)."""
    bucket = bucket_of(expires, lease_ms)
    if bucket == taken:
        bucket += 1
    return bucket


def pass_on_state(
    table: str, releasing: Lease, head: Entry, bucket: int, dropped: list[Entry]
) -> dict[str, Any]:
    """The state update of a pass-on handoff: the releaser's weights and id go, the head's
    come (in `bucket`), conditional on the releaser's id being there and on each of the
    head's counters staying within its capacity (a lowered limit or a full budget stops the
    handoff; ALL_OLD then tells the full pass the state)."""
    update = Update(table, releasing.pool)
    update.unwait([entry.waits_for for entry in (*dropped, head)])
    freed = {c.name: c.weight for c in releasing.counters}
    for name, capacity, weight in head.counters:
        delta = weight - freed.pop(name, 0)
        update.add(name, delta)
        update.add(weight_attr(bucket, name), weight)
        update.within(name, capacity, delta)
    for name, weight in freed.items():
        update.add(name, -weight)
    for counter in releasing.counters:
        update.add(weight_attr(releasing.bucket, counter.name), -counter.weight)
    update.delete_id(releasing.bucket, releasing.lease_id)
    update.add_id(bucket, {head.ticket_id})
    if head.start is not None:
        update.set(VT, n(head.start))  # the pool's virtual time (fair share)
    update.holds(releasing.bucket, releasing.lease_id)
    return update.request()


def grant_pass_state(
    table: str,
    pool: str,
    state: dict[str, Any],
    *,
    releasing: Lease | None,
    reaped: list[Bucket],
    granted: dict[int, dict[str, Any]],
    delta: dict[str, int],
    caps: dict[str, int],
    removed: list[Entry],
    blocked: set[str],
    served: int | None = None,
) -> dict[str, Any]:
    """A grant pass's state update: release `releasing` (conditional on its id being
    there), reap the expired buckets `reaped`, add the grants (`granted`: bucket -> {"ids",
    "weights"}), apply `delta` to the counters, take `removed` entries off q_waiting and set
    q_blocked (the counters live entries are short of: newcomers must not take them) and, with
    `served` (the last granted entry's virtual start), q_vt.
    Conditional on capacity for every counter a grant adds to, and, when it changes
    q_blocked, on q_blocked being what the pass read: a waiter that enqueued meanwhile with
    counters of its own is never unblocked (enqueues that add nothing new do not fail it)."""
    update = Update(table, pool)
    if releasing is not None:
        for counter in releasing.counters:
            update.add(weight_attr(releasing.bucket, counter.name), -counter.weight)
        update.delete_id(releasing.bucket, releasing.lease_id)
        update.holds(releasing.bucket, releasing.lease_id)
    for bucket in reaped:
        update.reap(bucket)  # its weights are in `delta`
    for number, grants in granted.items():
        for name, weight in grants["weights"].items():
            update.add(weight_attr(number, name), weight)
        update.add_id(number, grants["ids"])
    for name, d in delta.items():
        update.add(name, d)
        if name in caps:
            update.within(name, caps[name], d)
    update.unwait([entry.waits_for for entry in removed])
    if served is not None:
        update.set(VT, n(served))  # the last granted order: the pool's virtual time
    seen = set(state.get(BLOCKED, {}).get("SS", []))
    if blocked != seen:
        attr = update.name(BLOCKED)
        if seen:
            update.when(f"{attr} = {update.value({'SS': sorted(seen)})}")
        else:
            update.when(f"attribute_not_exists({attr})")
        if blocked:
            update.set(BLOCKED, {"SS": sorted(blocked)})
        else:
            update.remove(BLOCKED)
    return update.request()
