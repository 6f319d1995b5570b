"""The lease table's items, as the limiter reads and writes them (pk S + sk S).

  pk                 sk                          holds
  <pool>             state                       counters, q_waiting, q_blocked
  <pool>#lease       <expiry ms:013d>#<id>       a live lease: its weights (+ ticket id)
  <pool>#queue       w#<order>#<seq>#<ticket>    a waiting request: counters, deadlines
  <pool>#seq         seq                         the ticket counter
  grant#<ticket id>  grant                       the notice that hands a lease to a waiter

Every item stays under 1 KB whatever the number of leases or waiters: a lease, a waiter and
a grant are items of their own. A lease's sort key *starts with its expiry*, so expired
leases are one range query away and a reap is conditional on the very key that says when.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hermes.errors import HermesError

STATE_SK = "state"
WAITING, BLOCKED = "q_waiting", "q_blocked"  # state attributes, not counters
ANY = "*"  # in q_blocked: the queue is longer than one grant pass reads; every counter waits
NOT_COUNTERS = (WAITING,)
PRIORITIES = {"high": 0, "normal": 1, "low": 2}
# Priority with aging, in tickets: a request of rank r (high 0, normal 1, low 2) is ordered as
# if it had arrived r * AGING_TICKETS tickets later. So a normal request is passed by at most
# AGING_TICKETS - 1 later arrivals, a low one by at most 2 * AGING_TICKETS - 1: never starved.
AGING_TICKETS = 64
# While waiting, a ticket polls its notice this often near the head of the queue (and behind
# it). Reads only; a process polls all of its tickets in one BatchGetItem.
POLL_FAST_S = 0.005
POLL_NEAR_S = 0.025
POLL_SLOW_S = 0.1


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
    # The expiry DynamoDB holds (it is in the key): the holder stops before it (`time_left`).
    expires_at_ms: int
    # Handed over from the queue: its grant notice goes with it on release.
    granted: bool = False
    # Each counter's value right after a grant (for in-flight metrics); a direct admission is
    # a transaction, which returns no values, so it leaves this empty.
    counts: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def sk(self) -> str:
        return f"{self.expires_at_ms:013d}#{self.lease_id}"


@dataclass
class Ticket:
    """A waiting request: its place in the queue of `pool` and how to poll it."""

    ticket_id: str
    pool: str
    counters: tuple[Counter, ...]
    seq: int  # arrival: the ticket counter's value
    order: int  # seq, moved back by priority
    lease_ms: int
    wait_until_ms: int
    run_until_ms: int  # 0: no limit beyond lease_ms
    priority: str
    poll_after_s: float = POLL_FAST_S
    next_check_ms: int = 0
    passes_left: int = 3
    short: str | None = None  # the counter it waited for at the last check

    @property
    def sk(self) -> str:
        # Ordered by priority-adjusted arrival, then by arrival itself.
        return f"w#{self.order:020d}#{self.seq:020d}#{self.ticket_id}"


@dataclass
class Entry:
    """A queue entry as a grant pass reads it."""

    sk: str
    ticket_id: str
    counters: list[tuple[str, int, int]]  # (name, capacity, weight)
    wait_until_ms: int
    run_until_ms: int
    lease_ms: int

    @classmethod
    def of(cls, item: dict[str, Any]) -> Entry:
        return cls(
            sk=item["sk"]["S"],
            ticket_id=item["t"]["S"],
            counters=[
                (c["L"][0]["S"], int(c["L"][1]["N"]), int(c["L"][2]["N"])) for c in item["c"]["L"]
            ],
            wait_until_ms=int(item["wu"]["N"]),
            run_until_ms=int(item["ru"]["N"]),
            lease_ms=int(item["lm"]["N"]),
        )

    def expiry(self, now_ms: int) -> int:
        """A grant's lease expiry: the whole lease, but never past the waiter's deadline."""
        expires = now_ms + self.lease_ms
        return min(expires, self.run_until_ms) if self.run_until_ms else expires


@dataclass(frozen=True)
class Refusal:
    """Why the direct path said no: `counter` is full, or (`gated`) waiters hold it."""

    counter: Counter
    gated: bool
    state: dict[str, Any]
    full: bool = False

    @classmethod
    def of(cls, state: dict[str, Any], counters: tuple[Counter, ...]) -> Refusal:
        blocked = set(state.get(BLOCKED, {}).get("SS", []))
        if value(state, WAITING) > 0:
            held = [c for c in counters if ANY in blocked or c.name in blocked]
            if held:
                return cls(held[0], True, state)
        full = [c for c in counters if value(state, c.name) + c.weight > c.capacity]
        if full:
            return cls(full[0], False, state, full=True)
        return cls(counters[0], False, state)

    def error(self, retry_after_s: int) -> HermesError:
        counter = self.counter
        if self.gated:
            message = f"{counter.label} has requests waiting; retry later"
        elif self.full:
            message = f"{counter.label} is at capacity ({counter.capacity}); retry later"
        else:
            message = f"{counter.label} is contended; retry later"
        return counter.busy(message, retry_after=retry_after_s)


def key(pk: str, sk: str) -> dict[str, Any]:
    return {"pk": s(pk), "sk": s(sk)}


def s(text: str) -> dict[str, str]:
    return {"S": text}


def n(number: int) -> dict[str, str]:
    return {"N": str(number)}


def value(item: dict[str, Any], name: str) -> int:
    return int(item[name]["N"]) if name in item else 0


def counters_of(state: dict[str, Any]) -> dict[str, int]:
    return {k: int(v["N"]) for k, v in state.items() if "N" in v and k not in NOT_COUNTERS}


def lease_table_definition(name: str) -> dict[str, Any]:
    """create_table arguments of the lease table (as template.yaml declares it)."""
    return {
        "TableName": name,
        "AttributeDefinitions": [
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        "KeySchema": [
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        "BillingMode": "PAY_PER_REQUEST",
    }
