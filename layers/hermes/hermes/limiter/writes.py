"""The TransactWriteItems items the limiter writes (no I/O here).

Invariants every composition keeps (docs in README "How the limits hold"):
- a lease item is created or deleted only in one transaction with the state update that adds
  or subtracts exactly its weights; creation is conditional on non-existence, deletion on
  existence, so each happens once (I1: counters = sum of live lease items);
- every update that *increases* a counter is conditional on the result staying within the
  capacity the writer was configured with (I2);
- every queue entry put or delete goes with q_waiting ± 1 (I4).
Expressions stay far under DynamoDB's 4 KB: about 75 bytes per counter touched.
"""

from __future__ import annotations

from typing import Any

from hermes.limiter.records import (
    ANY,
    BLOCKED,
    STATE_SK,
    WAITING,
    Entry,
    Lease,
    Ticket,
    key,
    n,
    s,
)


def admit(table: str, lease: Lease) -> list[dict[str, Any]]:
    """Direct admission: add the weights (within capacity, and only if no waiter is short of
    these counters) and put the lease. ALL_OLD of the state item says why on a refusal."""
    names = {"#waiting": WAITING, "#blocked": BLOCKED}
    values: dict[str, Any] = {":zero": n(0), ":any": s(ANY)}
    sets, fits, open_ = [], [], ["NOT contains(#blocked, :any)"]
    for i, counter in enumerate(lease.counters):
        names[f"#c{i}"] = counter.name
        values |= {
            f":w{i}": n(counter.weight),
            f":room{i}": n(counter.capacity - counter.weight),
            f":name{i}": s(counter.name),
        }
        sets.append(f"#c{i} = if_not_exists(#c{i}, :zero) + :w{i}")
        fits.append(f"(attribute_not_exists(#c{i}) OR #c{i} <= :room{i})")
        open_.append(f"NOT contains(#blocked, :name{i})")
    # Nobody waits, or nobody waits for these counters (q_blocked: see grant_pass_state).
    gate = f"(attribute_not_exists(#waiting) OR #waiting = :zero OR ({' AND '.join(open_)}))"
    return [
        {
            "Update": {
                "TableName": table,
                "Key": key(lease.pool, STATE_SK),
                "UpdateExpression": "SET " + ", ".join(sets),
                "ConditionExpression": " AND ".join([gate, *fits]),
                "ExpressionAttributeNames": names,
                "ExpressionAttributeValues": values,
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }
        },
        put_lease(table, lease.pool, lease.sk, {c.name: c.weight for c in lease.counters}),
    ]


def put_lease(
    table: str, pool: str, sk: str, weights: dict[str, int], ticket_id: str | None = None
) -> dict[str, Any]:
    item = {**key(f"{pool}#lease", sk), "w": {"M": {k: n(v) for k, v in weights.items()}}}
    if ticket_id is not None:
        item["t"] = s(ticket_id)  # its grant notice goes when the lease goes
    return {
        "Put": {"TableName": table, "Item": item, "ConditionExpression": "attribute_not_exists(pk)"}
    }


def delete_lease(table: str, pool: str, sk: str, ticket_id: str | None) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [
        {
            "Delete": {
                "TableName": table,
                "Key": key(f"{pool}#lease", sk),
                "ConditionExpression": "attribute_exists(pk)",
            }
        }
    ]
    if ticket_id is not None:
        items.append({"Delete": {"TableName": table, "Key": key(f"grant#{ticket_id}", "grant")}})
    return items


def release(table: str, lease: Lease, only_if_nobody_waits: bool) -> list[dict[str, Any]]:
    """Delete the lease and subtract its weights; `only_if_nobody_waits` makes it fail (with
    ALL_OLD) when somebody waits, so that the releaser hands over instead."""
    names = {f"#c{i}": c.name for i, c in enumerate(lease.counters)}
    values = {f":w{i}": n(-c.weight) for i, c in enumerate(lease.counters)}
    update: dict[str, Any] = {
        "TableName": table,
        "Key": key(lease.pool, STATE_SK),
        "UpdateExpression": "ADD " + ", ".join(f"#c{i} :w{i}" for i in range(len(names))),
    }
    if only_if_nobody_waits:
        names["#waiting"] = WAITING
        values[":zero"] = n(0)
        update["ConditionExpression"] = "attribute_not_exists(#waiting) OR #waiting = :zero"
        update["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
    update |= {"ExpressionAttributeNames": names, "ExpressionAttributeValues": values}
    ticket_id = lease.lease_id if lease.granted else None
    return [*delete_lease(table, lease.pool, lease.sk, ticket_id), {"Update": update}]


def enqueue(table: str, ticket: Ticket, full: list[str]) -> list[dict[str, Any]]:
    """Count the waiter and put its queue entry, only if it is still not admissible (waiters
    hold one of its counters, or one is full: else ALL_OLD says so); `full`: the counters it
    cannot have now, which newcomers must not take (q_blocked)."""
    update = "ADD #waiting :one"
    values: dict[str, Any] = {":one": n(1), ":zero": n(0), ":any": s(ANY)}
    names = {"#waiting": WAITING, "#blocked": BLOCKED}
    held, busy = ["contains(#blocked, :any)"], []
    for i, counter in enumerate(ticket.counters):
        names[f"#c{i}"] = counter.name
        values[f":name{i}"] = s(counter.name)
        values[f":room{i}"] = n(counter.capacity - counter.weight)
        held.append(f"contains(#blocked, :name{i})")
        busy.append(f"#c{i} > :room{i}")
    if full:
        update += ", #blocked :full"
        values[":full"] = {"SS": full}
    condition = " OR ".join([f"(#waiting > :zero AND ({' OR '.join(held)}))", *busy])
    entry = {
        **key(f"{ticket.pool}#queue", ticket.sk),
        "t": s(ticket.ticket_id),
        "c": {"L": [{"L": [s(c.name), n(c.capacity), n(c.weight)]} for c in ticket.counters]},
        "wu": n(ticket.wait_until_ms),
        "ru": n(ticket.run_until_ms),
        "lm": n(ticket.lease_ms),
    }
    return [
        {
            "Update": {
                "TableName": table,
                "Key": key(ticket.pool, STATE_SK),
                "UpdateExpression": update,
                "ConditionExpression": condition,
                "ExpressionAttributeNames": names,
                "ExpressionAttributeValues": values,
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }
        },
        {
            "Put": {
                "TableName": table,
                "Item": entry,
                "ConditionExpression": "attribute_not_exists(pk)",
            }
        },
    ]


def abandon(table: str, ticket: Ticket) -> list[dict[str, Any]]:
    return [
        {
            "Delete": {
                "TableName": table,
                "Key": key(f"{ticket.pool}#queue", ticket.sk),
                "ConditionExpression": "attribute_exists(pk)",
            }
        },
        {
            "Update": {
                "TableName": table,
                "Key": key(ticket.pool, STATE_SK),
                "UpdateExpression": "ADD #waiting :minus",
                "ExpressionAttributeNames": {"#waiting": WAITING},
                "ExpressionAttributeValues": {":minus": n(-1)},
            }
        },
    ]


def grant(
    table: str, pool: str, entry: Entry, expires: int, counts: dict[str, int]
) -> list[dict[str, Any]]:
    """Hand a lease to a waiter: its entry goes (it must still be there: not abandoned), its
    lease and its notice come."""
    weights = {name: weight for name, _, weight in entry.counters}
    notice = {
        **key(f"grant#{entry.ticket_id}", "grant"),
        "exp": n(expires),
        "n": {"M": {k: n(v) for k, v in counts.items()}},
    }
    return [
        {
            "Delete": {
                "TableName": table,
                "Key": key(f"{pool}#queue", entry.sk),
                "ConditionExpression": "attribute_exists(pk)",
            }
        },
        put_lease(table, pool, f"{expires:013d}#{entry.ticket_id}", weights, entry.ticket_id),
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


def pass_on_state(
    table: str, pool: str, head: Entry, freed: dict[str, int], dropped: int
) -> dict[str, Any]:
    """The state update of a pass-on handoff: the releaser's weights go, the head's come,
    conditional on each of the head's counters staying within its capacity (a lowered limit
    or a full budget stops the handoff; ALL_OLD then tells the full pass the state)."""
    names = {"#waiting": WAITING}
    values: dict[str, Any] = {":removed": n(-(dropped + 1))}
    adds, conditions = ["#waiting :removed"], []
    wanted = {name for name, _, _ in head.counters}
    for i, (name, capacity, weight) in enumerate(head.counters):
        delta = weight - freed.get(name, 0)
        names[f"#c{i}"] = name
        values[f":d{i}"] = n(delta)
        values[f":r{i}"] = n(capacity - delta)
        adds.append(f"#c{i} :d{i}")
        conditions.append(f"(attribute_not_exists(#c{i}) OR #c{i} <= :r{i})")
    for i, name in enumerate(name for name in freed if name not in wanted):
        names[f"#x{i}"] = name
        values[f":x{i}"] = n(-freed[name])
        adds.append(f"#x{i} :x{i}")
    return {
        "Update": {
            "TableName": table,
            "Key": key(pool, STATE_SK),
            "UpdateExpression": "ADD " + ", ".join(adds),
            "ConditionExpression": " AND ".join(conditions),
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }
    }


def grant_pass_state(
    table: str,
    pool: str,
    state: dict[str, Any],
    delta: dict[str, int],
    caps: dict[str, int],
    removed: int,
    blocked: set[str],
) -> dict[str, Any]:
    """A grant pass's state update: apply `delta`, take `removed` entries off q_waiting and
    set q_blocked (the counters live entries are short of: newcomers must not take them).
    Conditional on capacity for every counter a grant adds to, and, when it changes q_blocked,
    on q_blocked being what the pass read: a waiter that enqueued meanwhile with counters of
    its own is never unblocked (enqueues that add nothing new do not fail the pass)."""
    names: dict[str, str] = {}
    values: dict[str, Any] = {":zero": n(0)} if delta else {}
    sets, conditions, removes = [], [], []
    for i, (name, d) in enumerate(delta.items()):
        names[f"#c{i}"] = name
        values[f":d{i}"] = n(d)
        sets.append(f"#c{i} = if_not_exists(#c{i}, :zero) + :d{i}")
        if name in caps:
            values[f":r{i}"] = n(caps[name] - d)
            conditions.append(f"(attribute_not_exists(#c{i}) OR #c{i} <= :r{i})")
    if removed:
        names["#waiting"] = WAITING
        values[":removed"] = n(removed)
        sets.append("#waiting = #waiting - :removed")
    seen = set(state.get(BLOCKED, {}).get("SS", []))
    if blocked != seen:
        names["#blocked"] = BLOCKED
        if seen:
            values[":seen"] = {"SS": sorted(seen)}
            conditions.append("#blocked = :seen")
        else:
            conditions.append("attribute_not_exists(#blocked)")
        if blocked:
            values[":blocked"] = {"SS": sorted(blocked)}
            sets.append("#blocked = :blocked")
        else:
            removes.append("#blocked")
    expression = " ".join(
        part
        for part in (
            "SET " + ", ".join(sets) if sets else "",
            "REMOVE " + ", ".join(removes) if removes else "",
        )
        if part
    )
    update: dict[str, Any] = {
        "TableName": table,
        "Key": key(pool, STATE_SK),
        "UpdateExpression": expression,
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }
    if conditions:
        update["ConditionExpression"] = " AND ".join(conditions)
    if names:
        update["ExpressionAttributeNames"] = names
    if values:  # DynamoDB refuses empty maps
        update["ExpressionAttributeValues"] = values
    return {"Update": update}
