"""Fair cross-instance admission on DynamoDB: FIFO tickets, handoff on release, constant cost.
The only code that touches the lease table (pk S + sk S).

A *pool* is an Ollama host. Its capacity is a set of counters (`memory`, `inflight_<model>`)
held in one small item; every lease and every waiting request is an item of its own, so no
write ever grows with the number of leases or waiters:

  pk                 sk                          holds
  <pool>             state                       counters, q_waiting, q_enq, q_blocked
  <pool>#lease       <expiry ms:013d>#<id>       a live lease: its weights (+ ticket id)
  <pool>#queue       w#<order>#<seq>#<ticket>    a waiting request: counters, deadlines
  <pool>#seq         seq                         the ticket counter
  grant#<ticket id>  grant                       the notice that hands a lease to a waiter

Admission is one TransactWriteItems: add the weights to the state item, conditional on
every counter staying within its capacity (and on no waiter being blocked on those
counters), and put the lease item. Release is the mirror transaction, conditional on
nobody waiting; when somebody waits, the releaser hands capacity over in the same
transaction as its release (a *grant pass*): it reads the queue in ticket order and, for
each waiter that fits, deletes its queue entry and writes its lease and its grant notice.
Waiters poll their own notice with reads. Expired leases (crashed holders) are removed by
grant passes, conditional on the key that carries the expiry: never before it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from hermes.errors import HermesError, LimiterUnavailable

log = logging.getLogger(__name__)

STATE_SK = "state"
WAITING, ENQUEUED, BLOCKED = "q_waiting", "q_enq", "q_blocked"  # state attributes, not counters
ANY = "*"  # in q_blocked: the queue is longer than one grant pass reads; every counter waits
PRIORITIES = {"high": 0, "normal": 1, "low": 2}

# Bounded work: optimistic rounds per operation (a round fails only when another writer
# changed the state item in between, or on a transaction conflict).
MAX_ROUNDS = 4
RELEASE_ROUNDS = 6
# A grant pass reads this many queue entries from the head; entries beyond it wait for the next
# pass. Each grant is 3 transaction items, a reaped lease 1-2, a lapsed entry 1, plus the state
# item and the releaser's 1-2: a pass stops adding before TransactWriteItems' 100 items.
GRANT_WINDOW = 32
REAP_BATCH = 30
MAX_TRANSACT_ITEMS = 100
# Priority with aging, in tickets: a request of rank r (high 0, normal 1, low 2) is ordered as
# if it had arrived r * AGING_TICKETS tickets later. So at most 2 * AGING_TICKETS requests that
# arrive after a low one are admitted before it: low priority is never starved.
AGING_TICKETS = 64
# Waiting: a waiter polls its own grant notice (a read on its own partition key): fast near the
# head of the queue, slowly behind it. Every CHECK_S (more with many waiters, so that the state
# item's partition stays far below 3,000 RCU/s) it also reads the state item and the entries
# ahead of it; if capacity sits free or a lease has expired with nobody handing over, it runs
# a grant pass itself, at most WAITER_PASSES times: the writes of a waiter are bounded.
HEAD_WINDOW = 8
# A process polls the notices of all its waiting tickets in one BatchGetItem (at most 100 keys).
POLL_BATCH = 100
# After seeing waiters on a pool, a release goes straight to a grant pass for this long.
CONTENDED_S = 1.0
POLL_FAST_S = 0.01
POLL_SLOW_S = 0.1
CHECK_S = 0.25
CHECKS_PER_S_PER_POOL = 1000
WAITER_PASSES = 3


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
    # Handed over from the queue: its grant notice goes with it on release.
    granted: bool = False
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
    passes_left: int = WAITER_PASSES
    short: str | None = None  # the counter it waited for at the last check

    @property
    def sk(self) -> str:
        # Ordered by priority-adjusted arrival, then by arrival itself.
        return f"w#{self.order:020d}#{self.seq:020d}#{self.ticket_id}"


@dataclass
class _Pass:
    """What a grant pass did: `written` when its transaction committed; the grants it made
    ({ticket id: (expiry ms, counts)}); `lease_gone` when the lease it was releasing was
    already gone (expired and reaped)."""

    written: bool = False
    grants: dict[str, tuple[int, dict[str, int]]] = field(default_factory=dict)
    lease_gone: bool = False
    # Expired leases and lapsed entries it removed: work done for crashed requests.
    cleaned: int = 0
    more: bool = False  # it left some for the next pass


@dataclass
class _Entry:
    """A queue entry as a grant pass reads it."""

    sk: str
    ticket_id: str
    counters: list[tuple[str, int, int]]  # (name, capacity, weight)
    wait_until_ms: int
    run_until_ms: int
    lease_ms: int


class _Mailbox:
    """This process's waiting tickets. One BatchGetItem polls the notices of all of them, and a
    grant made by this process reaches its local grantee at once (no poll)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._callbacks: dict[str, Callable[[], None]] = {}
        self._handed: dict[str, dict[str, Any]] = {}
        self._polled_at = 0.0

    def register(self, ticket_id: str) -> None:
        with self._lock:
            self._events[ticket_id] = threading.Event()

    def forget(self, ticket_id: str) -> None:
        with self._lock:
            self._events.pop(ticket_id, None)
            self._callbacks.pop(ticket_id, None)
            self._handed.pop(ticket_id, None)

    def notify(self, ticket_id: str, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks[ticket_id] = callback

    def hand(self, notices: dict[str, dict[str, Any]]) -> None:
        """Notices found by a poll, or written by this process: wake their tickets."""
        callbacks = []
        with self._lock:
            for ticket_id, notice in notices.items():
                event = self._events.get(ticket_id)
                if event is not None:
                    self._handed[ticket_id] = notice
                    event.set()
                    if ticket_id in self._callbacks:
                        callbacks.append(self._callbacks[ticket_id])
        for callback in callbacks:
            callback()

    def take(self, ticket_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._handed.get(ticket_id)

    def due(self, every_s: float) -> list[str]:
        """The tickets to poll now, if this caller is the one to do it (else [])."""
        now = time.monotonic()
        with self._lock:
            if now - self._polled_at < every_s:
                return []
            self._polled_at = now
            return list(self._events)[:POLL_BATCH]

    def event(self, ticket_id: str) -> threading.Event | None:
        with self._lock:
            return self._events.get(ticket_id)


class FairLimiter:
    def __init__(
        self,
        client: Any,
        table: str,
        clock: Callable[[], float] = time.time,
        aging_tickets: int = AGING_TICKETS,
    ) -> None:
        self._ddb = client
        self._table = table
        self._clock = clock
        self._aging = aging_tickets
        self._mailbox = _Mailbox()
        self._contended_until: dict[str, float] = {}

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _observe(self, pool: str, state: dict[str, Any]) -> None:
        """Remember that `pool` has waiters: this process's releases there hand over at once."""
        if _value(state, WAITING) > 0:
            self._contended_until[pool] = time.monotonic() + CONTENDED_S

    def _contended(self, pool: str) -> bool:
        return self._contended_until.get(pool, 0.0) > time.monotonic()

    def time_left(self, lease: Lease) -> float:
        """Seconds until `lease` expires, by this limiter's clock (negative once expired)."""
        return (lease.expires_at_ms - self._now_ms()) / 1000

    # -- admission without waiting -------------------------------------------------------

    def acquire(
        self, pool: str, counters: Sequence[Counter], lease_ms: int, retry_after_s: int = 1
    ) -> Lease:
        """Take every counter at once, or raise the `busy` error of the first full counter (or
        of the first one that queued requests are waiting for: nobody jumps the queue)."""
        outcome = self._admit_now(pool, tuple(counters), lease_ms, 0)
        if isinstance(outcome, Lease):
            return outcome
        raise _busy(outcome, retry_after_s)

    def _admit_now(
        self, pool: str, counters: tuple[Counter, ...], lease_ms: int, run_until_ms: int
    ) -> Lease | _Refusal:
        """The direct path: one transaction; on a full pool with expired leases, a grant pass
        (which reaps them) and another try. A refusal says why, with the state item."""
        refusal = _Refusal(counters[0], False, {})
        for _ in range(MAX_ROUNDS):
            now = self._now_ms()
            expires = now + lease_ms if not run_until_ms else min(now + lease_ms, run_until_ms)
            lease = Lease(uuid.uuid4().hex, pool, counters, expires)
            try:
                self._transact(self._admit_items(lease))
            except _Cancelled as cancelled:
                if cancelled.conflict:
                    _pause()
                    continue
                state = cancelled.item(0)
                self._observe(pool, state)
                refusal = _refusal(state, counters)
                if refusal.gated:
                    return refusal
                if refusal.full and not (
                    self._has_expired(pool) and self._grant_pass(pool).written
                ):
                    return refusal
                continue  # capacity came back, or the state changed meanwhile: try again
            except LimiterUnavailable:
                self._withdraw(lease)
                raise
            return lease
        return refusal

    def _admit_items(self, lease: Lease) -> list[dict[str, Any]]:
        names = {"#waiting": WAITING, "#blocked": BLOCKED}
        values: dict[str, Any] = {":zero": _n(0), ":any": _s(ANY)}
        sets, fits, open_ = [], [], ["NOT contains(#blocked, :any)"]
        for i, counter in enumerate(lease.counters):
            names[f"#c{i}"] = counter.name
            values |= {
                f":w{i}": _n(counter.weight),
                f":room{i}": _n(counter.capacity - counter.weight),
                f":name{i}": _s(counter.name),
            }
            sets.append(f"#c{i} = if_not_exists(#c{i}, :zero) + :w{i}")
            fits.append(f"(attribute_not_exists(#c{i}) OR #c{i} <= :room{i})")
            open_.append(f"NOT contains(#blocked, :name{i})")
        # Nobody waits, or nobody waits for these counters (see _grant_pass for q_blocked).
        gate = f"(attribute_not_exists(#waiting) OR #waiting = :zero OR ({' AND '.join(open_)}))"
        return [
            {
                "Update": {
                    "TableName": self._table,
                    "Key": _key(lease.pool, STATE_SK),
                    "UpdateExpression": "SET " + ", ".join(sets),
                    "ConditionExpression": " AND ".join([gate, *fits]),
                    "ExpressionAttributeNames": names,
                    "ExpressionAttributeValues": values,
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
            self._put_lease(lease.pool, lease.sk, {c.name: c.weight for c in lease.counters}),
        ]

    def _put_lease(
        self, pool: str, sk: str, weights: dict[str, int], ticket_id: str | None = None
    ) -> dict[str, Any]:
        item = {**_key(f"{pool}#lease", sk), "w": {"M": {k: _n(v) for k, v in weights.items()}}}
        if ticket_id is not None:
            item["t"] = _s(ticket_id)  # its grant notice goes when the lease goes
        return {
            "Put": {
                "TableName": self._table,
                "Item": item,
                "ConditionExpression": "attribute_not_exists(pk)",
            }
        }

    # -- admission with waiting ----------------------------------------------------------

    def enqueue(
        self,
        pool: str,
        counters: Sequence[Counter],
        lease_ms: int,
        *,
        wait_until_ms: int,
        run_until_ms: int = 0,
        priority: str = "normal",
    ) -> Lease | Ticket:
        """Admit now if the pool has room and nobody waits for these counters; otherwise take
        a ticket and a place in the pool's queue. Poll the ticket (`poll`) until it turns
        into a lease, and `abandon` it when the caller stops waiting.

        `lease_ms` is the lease a grant gives (run time plus margins), never past
        `run_until_ms` (epoch ms; 0 for none); `wait_until_ms` is when the place lapses."""
        counters = tuple(counters)
        outcome = self._admit_now(pool, counters, lease_ms, run_until_ms)
        if isinstance(outcome, Lease):
            return outcome
        seq = self._next_seq(pool)
        ticket = Ticket(
            ticket_id=uuid.uuid4().hex,
            pool=pool,
            counters=counters,
            seq=seq,
            order=seq + PRIORITIES[priority] * self._aging,
            lease_ms=lease_ms,
            wait_until_ms=wait_until_ms,
            run_until_ms=run_until_ms,
            priority=priority,
        )
        full = [c.name for c in counters if _value(outcome.state, c.name) + c.weight > c.capacity]
        self._mailbox.register(ticket.ticket_id)
        for _ in range(MAX_ROUNDS):
            try:
                self._transact(self._enqueue_items(ticket, full))
                break
            except _Cancelled as cancelled:
                if not cancelled.conflict:
                    raise AssertionError("a new queue entry cannot exist already") from None
                _pause()
            except LimiterUnavailable:
                # The write may have landed: take the place back (and a lease, had it one).
                granted = self.abandon(ticket)
                if granted is not None:
                    self.release(granted)
                raise
        else:
            raise LimiterUnavailable("the lease table stayed contended; retry later", retry_after=1)
        # A release between our refusal and our enqueue saw nobody waiting: look once now.
        try:
            lease = self._check(ticket, force=True)
        except LimiterUnavailable:
            return ticket  # the caller holds a place: its polls (or abandon) carry on
        if lease is not None:
            self._mailbox.forget(ticket.ticket_id)
            return lease
        return ticket

    def _next_seq(self, pool: str) -> int:
        answer = self._call(
            "update_item",
            TableName=self._table,
            Key=_key(f"{pool}#seq", "seq"),
            UpdateExpression="ADD n :one",
            ExpressionAttributeValues={":one": _n(1)},
            ReturnValues="UPDATED_NEW",
        )
        return int(answer["Attributes"]["n"]["N"])

    def _enqueue_items(self, ticket: Ticket, full: list[str]) -> list[dict[str, Any]]:
        update = "ADD #waiting :one, #enq :one"
        values: dict[str, Any] = {":one": _n(1)}
        names = {"#waiting": WAITING, "#enq": ENQUEUED}
        if full:  # the counters this waiter cannot have now: newcomers must not take them
            update += ", #blocked :full"
            names["#blocked"] = BLOCKED
            values[":full"] = {"SS": full}
        entry = {
            **_key(f"{ticket.pool}#queue", ticket.sk),
            "t": _s(ticket.ticket_id),
            "c": {
                "L": [{"L": [_s(c.name), _n(c.capacity), _n(c.weight)]} for c in ticket.counters]
            },
            "wu": _n(ticket.wait_until_ms),
            "ru": _n(ticket.run_until_ms),
            "lm": _n(ticket.lease_ms),
        }
        return [
            {
                "Update": {
                    "TableName": self._table,
                    "Key": _key(ticket.pool, STATE_SK),
                    "UpdateExpression": update,
                    "ExpressionAttributeNames": names,
                    "ExpressionAttributeValues": values,
                }
            },
            {
                "Put": {
                    "TableName": self._table,
                    "Item": entry,
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            },
        ]

    def poll(self, ticket: Ticket) -> Lease | None:
        """The lease handed to `ticket`, if any yet: reads only (the notices of all of this
        process's tickets in one BatchGetItem, at most every POLL_FAST_S); now and then a
        check of the queue's head, which may run a grant pass (bounded per ticket). Wait
        `ticket.poll_after_s` between polls (or on `wakeup(ticket)`)."""
        lease = self._handed(ticket)
        if lease is not None:
            return lease
        due = self._mailbox.due(min(POLL_FAST_S, ticket.poll_after_s))
        if due:
            self._mailbox.hand(self._notices(due))
            lease = self._handed(ticket)
            if lease is not None:
                return lease
        if self._now_ms() >= ticket.next_check_ms:
            lease = self._check(ticket)
            if lease is not None:
                self._mailbox.forget(ticket.ticket_id)
            return lease
        return None

    def wakeup(self, ticket: Ticket) -> threading.Event | None:
        """Set when this process hands `ticket` a lease: wait on it instead of sleeping."""
        return self._mailbox.event(ticket.ticket_id)

    def notify(self, ticket: Ticket, callback: Callable[[], None]) -> None:
        """Call `callback` (from whichever thread) when this process hands `ticket` a lease or
        a poll finds one: an event loop passes `lambda: loop.call_soon_threadsafe(ev.set)`."""
        self._mailbox.notify(ticket.ticket_id, callback)

    def busy(self, ticket: Ticket, retry_after_s: int = 1) -> HermesError:
        """The 429 for a ticket whose wait ran out: the busy error of the counter it waited for."""
        counter = next((c for c in ticket.counters if c.name == ticket.short), ticket.counters[0])
        return counter.busy(
            f"{counter.label} had no capacity free within the wait; retry later",
            retry_after=retry_after_s,
        )

    def wait(self, ticket: Ticket, sleep: Callable[[float], None] | None = None) -> Lease | None:
        """Blocking: poll until a lease is handed over (returned) or the ticket's wait deadline
        passes (the place is given up; None). The service does the same on its event loop."""
        event = self.wakeup(ticket)
        while True:
            lease = self.poll(ticket)
            if lease is not None:
                return lease
            if self._now_ms() + ticket.poll_after_s * 1000 >= ticket.wait_until_ms:
                return self.abandon(ticket)
            if sleep is not None:
                sleep(ticket.poll_after_s)
            elif event is not None:
                event.wait(ticket.poll_after_s)
            else:
                time.sleep(ticket.poll_after_s)

    def _handed(self, ticket: Ticket) -> Lease | None:
        notice = self._mailbox.take(ticket.ticket_id)
        if notice is None:
            return None
        self._mailbox.forget(ticket.ticket_id)
        return self._granted(ticket, notice)

    def _notices(self, ticket_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The grant notices that exist among `ticket_ids` (eventually consistent reads: a
        notice is written once, so a stale answer only delays it)."""
        keys = [_key(f"grant#{t}", "grant") for t in ticket_ids]
        found: dict[str, dict[str, Any]] = {}
        request: dict[str, Any] = {self._table: {"Keys": keys}}
        for _ in range(3):
            answer = self._call("batch_get_item", RequestItems=request)
            for item in answer.get("Responses", {}).get(self._table, []):
                found[item["pk"]["S"].removeprefix("grant#")] = item
            request = answer.get("UnprocessedKeys") or {}
            if not request:
                break
        return found

    def abandon(self, ticket: Ticket) -> Lease | None:
        """Give the place up (one write). If a lease was handed over meanwhile it is returned:
        the caller uses it or releases it."""
        self._mailbox.forget(ticket.ticket_id)
        for _ in range(MAX_ROUNDS):
            try:
                self._transact(
                    [
                        {
                            "Delete": {
                                "TableName": self._table,
                                "Key": _key(f"{ticket.pool}#queue", ticket.sk),
                                "ConditionExpression": "attribute_exists(pk)",
                            }
                        },
                        {
                            "Update": {
                                "TableName": self._table,
                                "Key": _key(ticket.pool, STATE_SK),
                                "UpdateExpression": "ADD #waiting :minus",
                                "ExpressionAttributeNames": {"#waiting": WAITING},
                                "ExpressionAttributeValues": {":minus": _n(-1)},
                            }
                        },
                    ]
                )
                return None
            except _Cancelled as cancelled:
                if cancelled.conflict:
                    _pause()
                    continue
                # The entry is gone: granted (there is a notice) or removed as lapsed.
                notice = self._get(f"grant#{ticket.ticket_id}", "grant", consistent=True)
                return self._granted(ticket, notice) if notice is not None else None
            except LimiterUnavailable as exc:
                # The entry lapses at wait_until_ms; a grant made before that expires too.
                log.error("could not give up ticket %s: %s", ticket.ticket_id, exc)
                return None
        return None

    def _granted(self, ticket: Ticket, notice: dict[str, Any]) -> Lease:
        return Lease(
            ticket.ticket_id,
            ticket.pool,
            ticket.counters,
            int(notice["exp"]["N"]),
            granted=True,
            counts={k: int(v["N"]) for k, v in notice.get("n", {}).get("M", {}).items()},
        )

    def _check(self, ticket: Ticket, force: bool = False) -> Lease | None:
        """Reads the state item and the queue ahead of `ticket`; runs a grant pass when the
        ticket is near the head and capacity is free or held by expired leases (a release
        that did not hand over: its holder crashed, or its rounds ran out)."""
        now = self._now_ms()
        state = self._get(ticket.pool, STATE_SK, consistent=force) or {}
        self._observe(ticket.pool, state)
        # Live entries among the first HEAD_WINDOW ahead: lapsed ones (crashed waiters) make
        # a ticket nearer, so that somebody's pass drops them.
        ahead = self._call(
            "query",
            TableName=self._table,
            KeyConditionExpression="pk = :pk AND sk < :me",
            FilterExpression="#wu > :now",
            ExpressionAttributeNames={"#wu": "wu"},
            ExpressionAttributeValues={
                ":pk": _s(f"{ticket.pool}#queue"),
                ":me": _s(ticket.sk),
                ":now": _n(now),
            },
            Select="COUNT",
            Limit=HEAD_WINDOW,
        )["Count"]
        near = ahead < HEAD_WINDOW
        ticket.poll_after_s = POLL_FAST_S if near else POLL_SLOW_S
        # All waiters of a pool together check at most CHECKS_PER_S_PER_POOL times a second.
        spread = max(1.0, _value(state, WAITING) / (CHECK_S * CHECKS_PER_S_PER_POOL))
        ticket.next_check_ms = now + int(CHECK_S * spread * random.uniform(800, 1200))
        short = [c.name for c in ticket.counters if _value(state, c.name) + c.weight > c.capacity]
        ticket.short = short[0] if short else ticket.short
        if not near or ticket.passes_left <= 0:
            return None
        fits = not short
        if not fits and not self._has_expired(ticket.pool):
            return None
        done = self._grant_pass(ticket.pool, state if force else None)
        if done.cleaned:
            # Work for crashed requests (at most one pass each): not charged to this ticket,
            # and the next poll checks again if some is left.
            if done.more:
                ticket.next_check_ms = now
        else:
            ticket.passes_left -= 1
        granted = done.grants
        if ticket.ticket_id in granted:
            exp, counts = granted[ticket.ticket_id]
            return Lease(
                ticket.ticket_id, ticket.pool, ticket.counters, exp, granted=True, counts=counts
            )
        return None

    # -- release and handoff ------------------------------------------------------------

    def release(self, lease: Lease) -> bool:
        """Free the caller's own lease, handing its capacity to waiters if there are any.
        False when it was already gone (expired and reaped) or DynamoDB failed; then the
        lease simply expires."""
        if lease.granted or self._contended(lease.pool):
            return self._hand_over(lease, None)  # waiters are likely: no write bound to fail
        for _ in range(RELEASE_ROUNDS):
            try:
                self._transact(self._release_items(lease, only_if_nobody_waits=True))
                return True
            except _Cancelled as cancelled:
                if cancelled.conflict:
                    _pause()
                    continue
                if cancelled.failed(0):
                    log.warning(
                        "lease %s in %s had expired and was reaped", lease.lease_id, lease.pool
                    )
                    return False
                state = cancelled.item(len(cancelled.reasons) - 1)
                self._observe(lease.pool, state)
                return self._hand_over(lease, state)
            except LimiterUnavailable as exc:
                log.error("release of lease %s failed, it will expire: %s", lease.lease_id, exc)
                return False
        return self._release_plainly(lease)

    def _hand_over(self, lease: Lease, state: dict[str, Any] | None) -> bool:
        try:
            passed_on = self._pass_on(lease)
            if passed_on is not None:
                return passed_on
            outcome = self._grant_pass(lease.pool, state, releasing=lease)
        except LimiterUnavailable as exc:
            log.error("release of lease %s failed, it will expire: %s", lease.lease_id, exc)
            return False
        if outcome.lease_gone:
            return False
        if not outcome.written:
            # Out of rounds: free the capacity anyway; waiters' own checks pick it up (CHECK_S).
            return self._release_plainly(lease)
        return True

    def _pass_on(self, lease: Lease) -> bool | None:
        """The common handoff, in two requests: when the first live entry of the queue wants no
        more than `lease` frees (same counters, weights no larger), the release and its grant
        are one transaction that needs no read of the state item, since the counters do not
        grow. None when that does not apply (then a full grant pass runs)."""
        now = self._now_ms()
        entries, _ = self._head(lease.pool)
        items = self._delete_lease(lease.pool, lease.sk, lease.lease_id if lease.granted else None)
        dropped, head = 0, None
        for entry in entries:
            if entry.wait_until_ms > now:
                head = entry
                break
            items.append(self._drop_entry(lease.pool, entry.sk, now))
            dropped += 1
        if head is None:
            return None  # nobody lives in the head window: the full pass tidies up
        freed = {c.name: c.weight for c in lease.counters}
        wanted = {name: weight for name, _, weight in head.counters}
        if not wanted.keys() <= freed.keys() or any(w > freed[n] for n, w in wanted.items()):
            return None
        expires = now + head.lease_ms
        if head.run_until_ms:
            expires = min(expires, head.run_until_ms)
        if expires <= now:
            return None
        names = {"#waiting": WAITING}
        values: dict[str, Any] = {":removed": _n(-(dropped + 1))}
        adds, conditions = ["#waiting :removed"], []
        for i, (name, capacity, weight) in enumerate(head.counters):
            names[f"#c{i}"] = name
            values[f":d{i}"] = _n(weight - freed[name])
            values[f":r{i}"] = _n(capacity - (weight - freed[name]))
            adds.append(f"#c{i} :d{i}")
            conditions.append(f"#c{i} <= :r{i}")  # a lowered limit: no handoff past it
        for i, name in enumerate(n for n in freed if n not in wanted):
            names[f"#x{i}"] = name
            values[f":x{i}"] = _n(-freed[name])
            adds.append(f"#x{i} :x{i}")
        items.append(
            {
                "Update": {
                    "TableName": self._table,
                    "Key": _key(lease.pool, STATE_SK),
                    "UpdateExpression": "ADD " + ", ".join(adds),
                    "ConditionExpression": " AND ".join(conditions),
                    "ExpressionAttributeNames": names,
                    "ExpressionAttributeValues": values,
                }
            }
        )
        counts: dict[str, int] = {}  # not known without the state item
        items += self._grant_items(lease.pool, head, expires, counts)
        try:
            self._transact(items)
        except _Cancelled as cancelled:
            if not cancelled.conflict and cancelled.failed(0):
                return False  # our lease had expired and was reaped
            return None  # the head left, a limit was lowered, or a conflict: full pass
        self._mailbox.hand({head.ticket_id: {"exp": _n(expires)}})
        return True

    def _release_plainly(self, lease: Lease) -> bool:
        try:
            self._transact(self._release_items(lease, only_if_nobody_waits=False))
            return True
        except _Cancelled:
            return False
        except LimiterUnavailable as exc:
            log.error("release of lease %s failed, it will expire: %s", lease.lease_id, exc)
            return False

    def _release_items(self, lease: Lease, only_if_nobody_waits: bool) -> list[dict[str, Any]]:
        names = {f"#c{i}": c.name for i, c in enumerate(lease.counters)}
        values = {f":w{i}": _n(-c.weight) for i, c in enumerate(lease.counters)}
        update: dict[str, Any] = {
            "TableName": self._table,
            "Key": _key(lease.pool, STATE_SK),
            "UpdateExpression": "ADD " + ", ".join(f"#c{i} :w{i}" for i in range(len(names))),
        }
        if only_if_nobody_waits:
            names["#waiting"] = WAITING
            values[":zero"] = _n(0)
            update["ConditionExpression"] = "attribute_not_exists(#waiting) OR #waiting = :zero"
            update["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        update |= {"ExpressionAttributeNames": names, "ExpressionAttributeValues": values}
        return [
            *self._delete_lease(lease.pool, lease.sk, lease.lease_id if lease.granted else None),
            {"Update": update},
        ]

    def _delete_lease(self, pool: str, sk: str, ticket_id: str | None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = [
            {
                "Delete": {
                    "TableName": self._table,
                    "Key": _key(f"{pool}#lease", sk),
                    "ConditionExpression": "attribute_exists(pk)",
                }
            }
        ]
        if ticket_id is not None:
            items.append(
                {"Delete": {"TableName": self._table, "Key": _key(f"grant#{ticket_id}", "grant")}}
            )
        return items

    def _withdraw(self, lease: Lease) -> None:
        """Best effort, after an admission whose answer was lost: remove the lease if the
        write landed after all (if it did not, the condition makes this a no-op)."""
        try:
            self._transact(self._release_items(lease, only_if_nobody_waits=False))
        except (_Cancelled, LimiterUnavailable) as exc:
            if isinstance(exc, LimiterUnavailable):
                log.error(
                    "unanswered admission %s may hold its slot until it expires", lease.lease_id
                )
            return
        log.warning(
            "admission %s in %s got no answer; its lease was removed", lease.lease_id, lease.pool
        )

    # -- the grant pass: hand capacity to waiters in order, reap, drop lapsed entries ------

    def _grant_pass(
        self, pool: str, state: dict[str, Any] | None = None, releasing: Lease | None = None
    ) -> _Pass:
        """One transaction that (1) releases `releasing`, (2) deletes expired leases, (3) drops
        queue entries past their wait deadline, (4) hands a lease to each waiter that fits, in
        queue order, never letting an entry overtake an earlier one on a counter that the
        earlier one waits for, and (5) records those counters in q_blocked. Conditional on no
        enqueue having happened since `state` was read (q_enq) and on every counter it adds to
        staying within capacity."""
        for _ in range(MAX_ROUNDS):
            state = (
                state if state is not None else (self._get(pool, STATE_SK, consistent=True) or {})
            )
            plan = self._plan(pool, state, releasing)
            if plan is None:
                return _Pass()
            items, grants, cleaned, more = plan
            try:
                self._transact(items)
            except _Cancelled as cancelled:
                if cancelled.conflict:
                    _pause()
                    state = None
                    continue
                if releasing is not None and cancelled.failed(1):
                    return _Pass(lease_gone=True)
                # The state changed (ALL_OLD says how), or an entry or lease changed: re-read.
                state = cancelled.item(0) if cancelled.failed(0) else None
                continue
            self._mailbox.hand(
                {
                    ticket_id: {"exp": _n(exp), "n": {"M": {k: _n(v) for k, v in counts.items()}}}
                    for ticket_id, (exp, counts) in grants.items()
                }
            )
            return _Pass(written=True, grants=grants, cleaned=cleaned, more=more)
        return _Pass()

    def _plan(self, pool: str, state: dict[str, Any], releasing: Lease | None) -> _Plan | None:
        """Reads the queue's head (and expired leases) and composes the pass's transaction."""
        now = self._now_ms()
        entries, more = self._head(pool)
        # A releaser's own capacity usually serves the head: it looks for expired leases only
        # when somebody still does not fit. Passes that no release drives look first.
        expired = [] if releasing is not None else self._expired(pool, now, REAP_BATCH)
        plan, short = self._compose(pool, state, releasing, now, entries, more, expired)
        if short and releasing is not None:
            expired = self._expired(pool, now, REAP_BATCH)
            if expired:
                plan, _ = self._compose(pool, state, releasing, now, entries, more, expired)
        return plan

    def _compose(
        self,
        pool: str,
        state: dict[str, Any],
        releasing: Lease | None,
        now: int,
        entries: list[_Entry],
        more: bool,
        expired: list[tuple[str, dict[str, int], str | None]],
    ) -> tuple[_Plan | None, bool]:
        """The pass's transaction items (no I/O), and whether a live entry did not fit."""
        values = {
            name: int(v["N"])
            for name, v in state.items()
            if "N" in v and name not in (WAITING, ENQUEUED)
        }
        items: list[dict[str, Any]] = []
        delta: dict[str, int] = {}
        if releasing is not None:
            items += self._delete_lease(
                pool, releasing.sk, releasing.lease_id if releasing.granted else None
            )
            for c in releasing.counters:
                delta[c.name] = delta.get(c.name, 0) - c.weight
        cleaned = 0
        for sk, weights, ticket_id in expired:
            if releasing is not None and sk == releasing.sk:
                continue
            items += self._delete_lease(pool, sk, ticket_id)
            cleaned += 1
            for name, weight in weights.items():
                delta[name] = delta.get(name, 0) - weight
        removed = 0
        blocked: set[str] = set()
        caps: dict[str, int] = {}
        grants: dict[str, tuple[int, dict[str, int]]] = {}
        for entry in entries:
            if len(items) + 1 + 3 > MAX_TRANSACT_ITEMS:  # the state item and one more grant
                more = True
                break
            if entry.wait_until_ms <= now:
                items.append(self._drop_entry(pool, entry.sk, now))
                removed += 1
                cleaned += 1
                continue
            if any(name in blocked for name, _, _ in entry.counters):
                continue
            short = [
                name
                for name, capacity, weight in entry.counters
                if values.get(name, 0) + delta.get(name, 0) + weight > capacity
            ]
            if short:
                blocked.update(short)
                continue
            expires = now + entry.lease_ms
            if entry.run_until_ms:
                expires = min(expires, entry.run_until_ms)
            if expires <= now:
                items.append(self._drop_entry(pool, entry.sk, now))
                removed += 1
                continue
            for name, capacity, weight in entry.counters:
                delta[name] = delta.get(name, 0) + weight
                caps[name] = min(capacity, caps.get(name, capacity))
            counts = {name: values.get(name, 0) + delta[name] for name, _, _ in entry.counters}
            grants[entry.ticket_id] = (expires, counts)
            items += self._grant_items(pool, entry, expires, counts)
            removed += 1
        waits = bool(blocked)  # a live entry did not fit
        if more:
            blocked.add(ANY)
        old_blocked = set(state.get(BLOCKED, {}).get("SS", []))
        if not items and blocked == old_blocked:
            return None, waits  # nothing to write
        items.insert(0, self._state_update(pool, state, delta, caps, removed, blocked))
        return (items, grants, cleaned, more or len(expired) == REAP_BATCH), waits

    def _grant_items(
        self, pool: str, entry: _Entry, expires: int, counts: dict[str, int]
    ) -> list[dict[str, Any]]:
        weights = {name: weight for name, _, weight in entry.counters}
        notice = {
            **_key(f"grant#{entry.ticket_id}", "grant"),
            "exp": _n(expires),
            "n": {"M": {k: _n(v) for k, v in counts.items()}},
        }
        return [
            {
                "Delete": {
                    "TableName": self._table,
                    "Key": _key(f"{pool}#queue", entry.sk),
                    "ConditionExpression": "attribute_exists(pk)",  # not abandoned meanwhile
                }
            },
            self._put_lease(pool, f"{expires:013d}#{entry.ticket_id}", weights, entry.ticket_id),
            {
                "Put": {
                    "TableName": self._table,
                    "Item": notice,
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            },
        ]

    def _drop_entry(self, pool: str, sk: str, now: int) -> dict[str, Any]:
        return {
            "Delete": {
                "TableName": self._table,
                "Key": _key(f"{pool}#queue", sk),
                "ConditionExpression": "attribute_exists(pk) AND #wu <= :now",
                "ExpressionAttributeNames": {"#wu": "wu"},
                "ExpressionAttributeValues": {":now": _n(now)},
            }
        }

    def _state_update(
        self,
        pool: str,
        state: dict[str, Any],
        delta: dict[str, int],
        caps: dict[str, int],
        removed: int,
        blocked: set[str],
    ) -> dict[str, Any]:
        names = {"#enq": ENQUEUED, "#blocked": BLOCKED}
        values: dict[str, Any] = {":zero": _n(0)} if delta else {}
        sets, conditions = [], []
        for i, (name, d) in enumerate(delta.items()):
            names[f"#c{i}"] = name
            values[f":d{i}"] = _n(d)
            sets.append(f"#c{i} = if_not_exists(#c{i}, :zero) + :d{i}")
            if name in caps:  # a grant adds to it: the sum must stay within capacity
                values[f":r{i}"] = _n(caps[name] - d)
                conditions.append(f"(attribute_not_exists(#c{i}) OR #c{i} <= :r{i})")
        if removed:
            names["#waiting"] = WAITING
            values[":removed"] = _n(removed)
            sets.append("#waiting = #waiting - :removed")
        if ENQUEUED in state:
            values[":enq"] = state[ENQUEUED]
            conditions.insert(0, "#enq = :enq")
        else:
            conditions.insert(0, "attribute_not_exists(#enq)")
        if blocked:
            values[":blocked"] = {"SS": sorted(blocked)}
            sets.append("#blocked = :blocked")
        expression = ("SET " + ", ".join(sets)) if sets else ""
        if not blocked:
            expression += " REMOVE #blocked"
        return {
            "Update": {
                "TableName": self._table,
                "Key": _key(pool, STATE_SK),
                "UpdateExpression": expression.strip(),
                # No enqueue since `state` was read: the pass saw every waiter it reorders.
                "ConditionExpression": " AND ".join(conditions),
                "ExpressionAttributeNames": names,
                "ExpressionAttributeValues": values,
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }
        }

    def _head(self, pool: str) -> tuple[list[_Entry], bool]:
        answer = self._call(
            "query",
            TableName=self._table,
            KeyConditionExpression="pk = :pk AND begins_with(sk, :w)",
            ExpressionAttributeValues={":pk": _s(f"{pool}#queue"), ":w": _s("w#")},
            ConsistentRead=True,
            Limit=GRANT_WINDOW,
        )
        entries = [
            _Entry(
                sk=item["sk"]["S"],
                ticket_id=item["t"]["S"],
                counters=[
                    (c["L"][0]["S"], int(c["L"][1]["N"]), int(c["L"][2]["N"]))
                    for c in item["c"]["L"]
                ],
                wait_until_ms=int(item["wu"]["N"]),
                run_until_ms=int(item["ru"]["N"]),
                lease_ms=int(item["lm"]["N"]),
            )
            for item in answer.get("Items", [])
        ]
        return entries, "LastEvaluatedKey" in answer

    def _expired(
        self, pool: str, now: int, limit: int | None
    ) -> list[tuple[str, dict[str, int], str | None]]:
        """Leases whose expiry (the first part of their key) has passed, oldest first."""
        found: list[tuple[str, dict[str, int], str | None]] = []
        request: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "pk = :pk AND sk < :now",
            "ExpressionAttributeValues": {":pk": _s(f"{pool}#lease"), ":now": _s(f"{now:013d}")},
            "ConsistentRead": True,
        }
        if limit is not None:
            request["Limit"] = limit
        while True:
            answer = self._call("query", **request)
            for item in answer.get("Items", []):
                weights = {k: int(v["N"]) for k, v in item["w"]["M"].items()}
                found.append((item["sk"]["S"], weights, item.get("t", {}).get("S")))
            if limit is not None or "LastEvaluatedKey" not in answer:
                return found
            request["ExclusiveStartKey"] = answer["LastEvaluatedKey"]

    def _has_expired(self, pool: str) -> bool:
        return bool(self._expired(pool, self._now_ms(), 1))

    # -- reading -------------------------------------------------------------------------

    def usage(self, pools: Sequence[str]) -> dict[str, dict[str, int]]:
        """Per pool, the weight that unexpired leases hold on each counter: the state item's
        counters (one BatchGetItem per 100 pools) less the expired leases not yet reaped
        (one Query per pool, usually empty)."""
        unique = list(dict.fromkeys(pools))
        found: dict[str, dict[str, int]] = {pool: {} for pool in unique}
        for start in range(0, len(unique), 100):
            for item in self._batch_get(unique[start : start + 100]):
                found[item["pk"]["S"]] = {
                    name: int(value["N"])
                    for name, value in item.items()
                    if "N" in value and name not in (WAITING, ENQUEUED)
                }
        now = self._now_ms()
        for pool in unique:
            totals = found[pool]
            for _, weights, _ in self._expired(pool, now, None):
                for name, weight in weights.items():
                    totals[name] = totals.get(name, 0) - weight
            found[pool] = {name: value for name, value in totals.items() if value > 0}
        return found

    def waiting(self, pool: str) -> int:
        """Requests waiting in the pool's queue (including lapsed entries not yet dropped)."""
        return _value(self._get(pool, STATE_SK, consistent=True) or {}, WAITING)

    def _batch_get(self, pools: Sequence[str]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        request = {
            self._table: {"Keys": [_key(p, STATE_SK) for p in pools], "ConsistentRead": True}
        }
        for _ in range(3):
            response = self._call("batch_get_item", RequestItems=request)
            items += response.get("Responses", {}).get(self._table, [])
            request = response.get("UnprocessedKeys") or {}
            if not request:
                return items
        raise LimiterUnavailable("the lease table did not answer every key; retry later")

    def _get(self, pk: str, sk: str, consistent: bool) -> dict[str, Any] | None:
        answer = self._call(
            "get_item", TableName=self._table, Key=_key(pk, sk), ConsistentRead=consistent
        )
        item: dict[str, Any] | None = answer.get("Item")
        return item

    # -- DynamoDB adapter: ClientError codes become domain outcomes ----------------------

    def _transact(self, items: list[dict[str, Any]]) -> None:
        try:
            self._ddb.transact_write_items(TransactItems=items)
        except ClientError as exc:
            response: dict[str, Any] = dict(exc.response)
            code = response.get("Error", {}).get("Code", "")
            if code == "TransactionCanceledException":
                reasons = response.get("CancellationReasons") or []
                codes = {r.get("Code") for r in reasons}
                if codes <= {"None", "ConditionalCheckFailed", "TransactionConflict", None}:
                    raise _Cancelled(reasons) from None
            if code in ("TransactionConflictException", "TransactionInProgressException"):
                raise _Cancelled([{"Code": "TransactionConflict"}]) from None
            log.error("DynamoDB TransactWriteItems failed: %s", code)
            raise _unavailable(code) from None
        except BotoCoreError as exc:
            log.error("DynamoDB TransactWriteItems failed: %s", exc)
            raise _unavailable("") from None

    def _call(self, operation: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._ddb, operation)(**kwargs)
        except ClientError as exc:
            response: dict[str, Any] = dict(exc.response)  # loosen botocore's TypedDict
            code = response.get("Error", {}).get("Code", "")
            log.error("DynamoDB %s failed: %s", operation, code)
            raise _unavailable(code) from None
        except BotoCoreError as exc:
            log.error("DynamoDB %s failed: %s", operation, exc)
            raise _unavailable("") from None


# A grant pass's transaction: its items, its grants {ticket id: (expiry, counts)}, how many
# expired leases and lapsed entries it removes, and whether it leaves some of those.
_Plan = tuple[list[dict[str, Any]], dict[str, tuple[int, dict[str, int]]], int, bool]


@dataclass(frozen=True)
class _Refusal:
    """Why the direct path said no: `counter` is full, or (`gated`) waiters hold it."""

    counter: Counter
    gated: bool
    state: dict[str, Any]
    full: bool = False


def _refusal(state: dict[str, Any], counters: tuple[Counter, ...]) -> _Refusal:
    blocked = set(state.get(BLOCKED, {}).get("SS", []))
    if _value(state, WAITING) > 0:
        held = [c for c in counters if ANY in blocked or c.name in blocked]
        if held:
            return _Refusal(held[0], True, state)
    full = [c for c in counters if _value(state, c.name) + c.weight > c.capacity]
    if full:
        return _Refusal(full[0], False, state, full=True)
    return _Refusal(counters[0], False, state)


def _busy(refusal: _Refusal, retry_after_s: int) -> HermesError:
    counter = refusal.counter
    if refusal.gated:
        message = f"{counter.label} has requests waiting; retry later"
    elif refusal.full:
        message = f"{counter.label} is at capacity ({counter.capacity}); retry later"
    else:
        message = f"{counter.label} is contended; retry later"
    return counter.busy(message, retry_after=retry_after_s)


class _Cancelled(Exception):
    """A transaction that DynamoDB cancelled: per item, its reason (and ALL_OLD item)."""

    def __init__(self, reasons: list[dict[str, Any]]) -> None:
        self.reasons = reasons
        self.conflict = any(r.get("Code") == "TransactionConflict" for r in reasons)

    def failed(self, index: int) -> bool:
        return (
            index < len(self.reasons)
            and self.reasons[index].get("Code") == "ConditionalCheckFailed"
        )

    def item(self, index: int) -> dict[str, Any]:
        if index < len(self.reasons):
            return dict(self.reasons[index].get("Item") or {})
        return {}


def _unavailable(code: str) -> LimiterUnavailable:
    return LimiterUnavailable(
        f"the lease table is unavailable ({code or 'unreachable'}); no request is admitted",
        retry_after=1,
    )


def _pause() -> None:
    """After a transaction conflict: a short random pause so that the writers spread out."""
    time.sleep(random.uniform(0.002, 0.02))


def _key(pk: str, sk: str) -> dict[str, Any]:
    return {"pk": _s(pk), "sk": _s(sk)}


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _n(value: int) -> dict[str, str]:
    return {"N": str(value)}


def _value(item: dict[str, Any], name: str) -> int:
    return int(item[name]["N"]) if name in item else 0


def lease_table_definition(name: str) -> dict[str, Any]:
    """create_table arguments of the lease table this limiter needs (pk + sk, strings)."""
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


__all__ = ["Counter", "FairLimiter", "Lease", "Ticket", "lease_table_definition"]
