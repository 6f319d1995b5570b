"""The lease table's items, as the limiter reads and writes them (pk S + sk S).

  pk                 sk                          holds
  <pool>             state                       counters, q_waiting, q_blocked, leases
  <pool>#queue       w#<order>#<seq>#<ticket>    a waiting request: counters, deadlines
  <pool>#seq         seq                         the ticket counter
  grant#<ticket id>  grant                       the notice that hands a lease to a waiter

Leases live in the state item, grouped by when they expire: bucket `b` (the end of a
BUCKET_MS slice of time) holds `@<b>#<counter>` = the weight its leases hold on each counter
and `@<b>` = the string set of their ids. So a direct admission and a release are one
single-item conditional write each (a transaction would hold the item for its commit and
cancel every other write to it: docs/design/conflicts.md), and a crashed holder's weights are
found by time: a bucket whose end has passed holds only expired leases and is reaped whole.
The item grows with the leases alive: about 17 bytes per lease (its id) plus ~25 per counter
of each live bucket (README "How the limits hold" gives the cost).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from hermes.errors import HermesError

STATE_SK = "state"
WAITING, BLOCKED = "q_waiting", "q_blocked"  # state attributes, not counters
# Waiters per model (by their first counter, the model's slot), "q_waiting#<digest>": bounded
# by the model's max_waiting when it enqueues, so that the pool's q_waiting is their sum.
ANY = "*"  # in q_blocked: the queue is longer than one grant pass reads; every counter waits
# Fair share between callers (models files with a `callers` section): the queue is ordered by
# each request's virtual start, max(the pool's virtual time, its caller's last finish), and a
# request of weight w moves its caller's finish on by FAIR_UNIT / w. The pool's virtual time
# is the virtual start of the last entry granted (state attribute q_vt: a start, without the
# priority's offset that its order adds); each caller's finish is an
# item of its own ("<pool>#fair" / caller). So a caller with many requests queued spreads them
# out, and another caller's request starts at the pool's present, ahead of that backlog.
VT = "q_vt"
FAIR_UNIT = 840  # divisible by 1-8, 10, 12, 14, 15...: exact steps for small weights
NOT_COUNTERS = (WAITING, VT)
# Leases are grouped by expiry into buckets of BUCKET_MS, or of the power of two times it
# nearest below lease / BUCKETS_PER_LEASE for longer leases: a crashed holder's capacity comes
# back at most one bucket (≤ 1/16 of its lease, or 1 s) after its expiry, and a model's live
# leases fill at most ~16 buckets, each costing the state item one attribute per counter.
BUCKET_MS = 1000
BUCKETS_PER_LEASE = 16
BUCKET_PREFIX = "@"  # counters are never named so (placement: "memory", "inflight_<model>")
PRIORITIES = {"high": 0, "normal": 1, "low": 2}
# Priority with aging, in tickets: a request of rank r (high 0, normal 1, low 2) is ordered as
# if it had arrived r * AGING_TICKETS tickets later. So a normal request is passed by at most
# AGING_TICKETS - 1 later arrivals, a low one by at most 2 * AGING_TICKETS - 1: never starved.
AGING_TICKETS = 64
# While waiting, a ticket polls its notice this often next in line, near the head, and behind
# it. Reads only; a process polls all of its tickets in one BatchGetItem. Sized for a waiting
# Lambda instance (one ticket, ~0.15 vCPU): next in line it makes ~17 reads/s with its checks
# (a handoff is seen ~35 ms after its commit on average) for ~16 ms of CPU a second
# (bench/waiting_cost.py; the reads are light_reads', boto3 would cost 3 times that).
POLL_FAST_S = 0.07
POLL_NEAR_S = 0.1
POLL_SLOW_S = 0.25


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
    # The expiry written: the holder stops before it (`time_left`).
    expires_at_ms: int
    # The expiry bucket that holds its id and weights (0: the 1 s one its expiry falls in;
    # admissions and grants choose by lease length, never one that ends before the expiry).
    bucket: int = 0
    # Handed over from the queue: its grant notice goes when it is released.
    granted: bool = False
    # Each counter's value right after the admission or grant (for in-flight metrics).
    counts: dict[str, int] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.bucket:
            object.__setattr__(self, "bucket", bucket_of(self.expires_at_ms))


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
    start: int | None = None  # its virtual start (fair share between callers), if any
    ahead: int | None = None  # live entries ahead of it at the last check (None: not counted)

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
    start: int | None = None  # its virtual start (fair share), without its priority's offset

    @property
    def waits_for(self) -> str:
        """Its first counter (the model's slot): the count of waiters it is in."""
        return self.counters[0][0]

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
            start=int(item["vs"]["N"]) if "vs" in item else None,
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
    freed: bool = False  # not final: the round reaped expired leases, capacity came back

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


def new_id() -> str:
    """A lease or ticket id: 64 random bits (the state item holds one per live lease)."""
    return uuid.uuid4().hex[:16]


def bucket_of(expires_at_ms: int, lease_ms: int = 0) -> int:
    """The bucket a lease of `lease_ms` expiring then goes in: the first end at or after it
    of buckets as long as the lease length calls for; a bucket is named by its end, in
    BUCKET_MS units."""
    width = 1
    while width * 2 * BUCKET_MS * BUCKETS_PER_LEASE <= lease_ms:
        width *= 2
    return -(-expires_at_ms // (width * BUCKET_MS)) * width


def ids_attr(bucket: int) -> str:
    return f"{BUCKET_PREFIX}{bucket}"


def weight_attr(bucket: int, counter: str) -> str:
    """A bucket's weight on `counter`, named by a short digest of the counter's name (names
    run to 100+ characters; the state item carries one of these per live bucket)."""
    return f"{BUCKET_PREFIX}{bucket}#{digest(counter)}"


def digest(counter: str) -> str:
    return hashlib.blake2b(counter.encode(), digest_size=4).hexdigest()


@dataclass
class Bucket:
    """What the leases of one expiry bucket hold, as the state item says."""

    end: int  # bucket number: its leases expire by end * BUCKET_MS
    ids: set[str] = field(default_factory=set)
    weights: dict[str, int] = field(default_factory=dict)

    def expired(self, now_ms: int) -> bool:
        return self.end * BUCKET_MS < now_ms

    @property
    def empty(self) -> bool:
        return not self.ids and not any(self.weights.values())


def buckets_of(state: dict[str, Any]) -> dict[int, Bucket]:
    """The state item's lease buckets, by bucket number (weights by counter name: a bucket
    weighs only on counters the item holds)."""
    names = {digest(counter): counter for counter in counters_of(state)}
    found: dict[int, Bucket] = {}
    for name, attr in state.items():
        if not name.startswith(BUCKET_PREFIX):
            continue
        number, _, short = name[len(BUCKET_PREFIX) :].partition("#")
        bucket = found.setdefault(int(number), Bucket(int(number)))
        if short:
            bucket.weights[names.get(short, short)] = int(attr["N"])
        else:
            bucket.ids = set(attr.get("SS", []))
    return found


def key(pk: str, sk: str) -> dict[str, Any]:
    return {"pk": s(pk), "sk": s(sk)}


def s(text: str) -> dict[str, str]:
    return {"S": text}


def n(number: int) -> dict[str, str]:
    return {"N": str(number)}


def value(item: dict[str, Any], name: str) -> int:
    return int(item[name]["N"]) if name in item else 0


def counters_of(state: dict[str, Any]) -> dict[str, int]:
    return {
        k: int(v["N"])
        for k, v in state.items()
        if "N" in v and k not in NOT_COUNTERS and not k.startswith((BUCKET_PREFIX, WAITING))
    }


def waiting_attr(counter: str) -> str:
    """The state attribute counting the waiters whose first counter is `counter`."""
    return f"{WAITING}#{digest(counter)}"


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
