"""The limiter: admission, waiting in line, release with handoff, crash recovery, usage."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from botocore.client import BaseClient

from hermes.errors import HermesError, LimiterUnavailable, QueueFull
from hermes.limiter import writes
from hermes.limiter.budgets import Budgets
from hermes.limiter.hosts import HostBook
from hermes.limiter.light_client import LightClient
from hermes.limiter.mailbox import Mailbox
from hermes.limiter.records import (
    AGING_TICKETS,
    ANY,
    BLOCKED,
    FAIR_UNIT,
    POLL_FAST_S,
    POLL_NEAR_S,
    POLL_SLOW_S,
    PRIORITIES,
    STATE_SK,
    VT,
    WAITING,
    Bucket,
    Counter,
    Entry,
    Lease,
    Refusal,
    Ticket,
    bucket_of,
    buckets_of,
    counters_of,
    key,
    n,
    new_id,
    s,
    value,
    waiting_attr,
)
from hermes.limiter.table import (
    RELEASE_BACKOFF_BASE_S,
    RELEASE_BACKOFF_CAP_S,
    Backoff,
    Cancelled,
    Contended,
    Table,
)

log = logging.getLogger("hermes.limiter")

# Bounded work: optimistic rounds per operation (a round fails only when another writer
# changed the state item in between). Conflicts and throttling are not rounds: they are
# retried with backoff until the operation's deadline (table.Backoff).
MAX_ROUNDS = 4
# Rounds of an admission whose reaping freed capacity, not counted in MAX_ROUNDS.
FREEING_ROUNDS = 32
# A request that may not wait still rides out contention this long (or to its deadline).
ADMIT_PATIENCE_S = 2.0
# A release hands over only with this much time left before its deadline, and at least
# HANDOFF_REQUESTS of DynamoDB's current answer time (a pass-on is 2 requests, and a plain
# release may follow); closer to it, it frees its capacity in one write and the waiters' own
# checks pick it up.
HANDOFF_MIN_S = 1.0
HANDOFF_REQUESTS = 4
# What a holder keeps back from an invocation's end for its release (Lambda freezes, or times
# out, the moment the handler is done: the release must land before). With time that short,
# a release is one write, which DynamoDB answers in milliseconds and botocore gives up
# on after its read timeout (hermes.aws: 2 s); the rest is for the answer to go out. A release
# that does not land by then is left to its lease's expiry, and the answer still goes out.
RELEASE_RESERVE_S = 3.0
# A grant pass reads this many queue entries from the head; entries beyond it wait for the next
# pass. Each grant is 2 transaction items, a lapsed entry 1, plus the state item: a pass stops
# adding before TransactWriteItems' 100 items.
GRANT_WINDOW = 32
PASS_ON_WINDOW = 4  # a pass-on reads this many entries to find the first live one
# A pass reaps at most this many expired buckets (each names 1 + counters attributes in the
# state update: the expression stays far under 4 KB).
REAP_BATCH = 8
MAX_TRANSACT_ITEMS = 100
# A waiter is "near the head" with fewer than HEAD_WINDOW live entries ahead: it polls fast and
# may run a grant pass itself when its check finds capacity free or held by expired leases (a
# handoff that did not happen: the releaser crashed). Checks (a read of the state item and of
# the entries ahead) come every CHECK_S, spread so that a pool's waiters together check at most
# CHECKS_PER_S_PER_POOL times a second; a ticket's own passes are at most WAITER_PASSES.
HEAD_WINDOW = 8
AHEAD_PAGES = 8  # pages of 2 * HEAD_WINDOW entries read to count the live ones ahead
CHECK_S = 1.0  # through boto3 (~3 ms of CPU each): rarer than the notice polls
CHECKS_PER_S_PER_POOL = 1000
WAITER_PASSES = 3
# A release that hands over tries its grant pass this often, then frees its capacity plainly:
# the caller's answer waits for its release (a Lambda freezes once it has answered), and the
# waiters' own checks pick the capacity up within CHECK_S.
HANDOFF_ROUNDS = 2
# After a refusal in a pool, admissions there read the state item first for this long.
REFUSED_S = 0.5
# A refused newcomer that heals a stale gate runs at most this many passes (each drops up to
# GRANT_WINDOW lapsed entries).
GATE_PASSES = 8
# A caller's fair-share finish in a pool is kept this long after its last request there.
FAIR_TTL_S = 86_400
# After seeing waiters on a pool, a release goes straight to a handoff for this long.
CONTENDED_S = 1.0
# A release tidies up (its grant notice, empty buckets: two requests) only with time to spare.
TIDY_REQUESTS = 2


@dataclass
class _Pass:
    """What a grant pass did: `written` when its transaction committed; the grants it made
    ({ticket id: (expiry ms, counts)}); `lease_gone` when the lease it was releasing was
    already gone (expired and reaped); `cleaned`: expired leases and lapsed entries it removed
    (work for crashed requests); `more` when it left some of those for the next pass."""

    written: bool = False
    grants: dict[str, tuple[int, int, dict[str, int]]] = field(default_factory=dict)
    lease_gone: bool = False
    cleaned: int = 0
    more: bool = False


@dataclass
class _Plan:
    items: list[dict[str, Any]]
    grants: dict[str, tuple[int, int, dict[str, int]]]  # ticket -> (expiry, bucket, counts)
    cleaned: int
    more: bool
    reaped: int = 0


T = TypeVar("T")


class Limiter:
    NOTICE_POLLER = True

    def __init__(
        self,
        client: Any,
        table: str,
        clock: Callable[[], float] = time.time,
        aging_tickets: int = AGING_TICKETS,
        notice_poller: bool | None = None,
        light_calls: bool | None = None,
        traced: bool = False,
    ) -> None:
        """`notice_poller=False`: waiters read their notices in `poll` instead of one poller
        thread per process (for a store that is not thread-safe, such as moto in the unit
        tests, which turn NOTICE_POLLER off). `light_calls` (default: as notice_poller): requests
        through light_client rather than boto3; `traced` (X-Ray patches botocore): its writes go
        through boto3, so that each appears in the request's trace."""
        if notice_poller is None:
            notice_poller = self.NOTICE_POLLER
        self._table = Table(client, table, clock)
        self.hosts = HostBook(self._table)  # what placement shares about each host
        self.budgets = Budgets(self._table)  # callers' token and request windows
        self._clock = clock
        self._aging = aging_tickets
        self._mailbox = Mailbox(self._notices, background=notice_poller)
        # Reads beside a write of the same request (release): threads start when first used.
        self._beside = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hermes-beside")
        if light_calls is None:
            # Only for boto3's own client: a wrapper (a test's fault injector) sees every call.
            light_calls = notice_poller and isinstance(client, BaseClient)
        if light_calls:
            # Requests without boto3's CPU (light_client): a waiting Lambda instance repeats
            # its reads, and every answer waits for its release's writes.
            # (The unit tests' in-process moto intercepts boto3 only: they read through it,
            # and so do tests that count calls with boto3's event hooks: light_calls=False.)
            self._table.light = LightClient(client, writes=not traced)
        self._contended_until: dict[str, float] = {}
        self._refused_until: dict[str, float] = {}  # pool -> monotonic s
        self._gate_checked_until: dict[str, float] = {}  # pool -> monotonic s
        self._last_state: dict[str, dict[str, Any]] = {}

    @property
    def _ddb(self) -> Any:  # the boto3 client, for tests that hook it
        return self._table.client

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _observe(self, pool: str, state: dict[str, Any]) -> None:
        """Remember `pool`'s state, and that it has waiters: this process's releases there
        hand over at once."""
        self._last_state[pool] = state
        if value(state, WAITING) > 0:
            self._contended_until[pool] = time.monotonic() + CONTENDED_S

    def _contended(self, pool: str) -> bool:
        return self._contended_until.get(pool, 0.0) > time.monotonic()

    @property
    def table(self) -> Table:
        """The adapter of the limiter's DynamoDB client (light calls, backoff), for other
        tables' items written beside the limiter's (hermes.usage)."""
        return self._table

    def time_left(self, lease: Lease) -> float:
        """Seconds until `lease` expires, by this limiter's clock (negative once expired)."""
        return (lease.expires_at_ms - self._now_ms()) / 1000

    # -- admission without waiting -------------------------------------------------------

    def acquire(
        self,
        pool: str,
        counters: Sequence[Counter],
        lease_ms: int,
        retry_after_s: int = 1,
        until_ms: int | None = None,
    ) -> Lease:
        """Take every counter at once, or raise the `busy` error of the first full counter (or
        of the first one that queued requests are waiting for: nobody jumps the queue).
        Conflicts and throttling are ridden out with backoff until `until_ms` (default
        ADMIT_PATIENCE_S from now), then answered as busy too: contention is not an outage.

        The lease's `expires_at_ms` is the expiry written (it is in the key): the caller stops
        before it (`time_left`), however long the write took. When no answer comes back
        (LimiterUnavailable) although the write may have landed, the lease is withdrawn."""
        if until_ms is None:
            until_ms = self._now_ms() + int(ADMIT_PATIENCE_S * 1000)
        outcome = self._admit_now(pool, tuple(counters), lease_ms, 0, until_ms, timed_rounds=False)
        if isinstance(outcome, Lease):
            return outcome
        raise outcome.error(retry_after_s)

    def _admit_now(
        self,
        pool: str,
        counters: tuple[Counter, ...],
        lease_ms: int,
        run_until_ms: int,
        until_ms: int,
        timed_rounds: bool = True,
    ) -> Lease | Refusal:
        """One admission write; on a full pool with expired leases, a grant pass (which reaps
        them) and another try; contention retried with backoff until `until_ms`, and with
        `timed_rounds` no new round after it either (MAX_ROUNDS bounds them anyway). A
        refusal says why (neither `gated` nor `full`: it stayed contended).

        Right after a refusal in this pool, a read comes first: while a pool stays full, the
        refusals are reads, not failed writes that contend for the state item with the
        writes that admit and hand over."""
        backoff = Backoff(until_ms, self._clock)
        refusal = Refusal(counters[0], False, {})
        rounds = freeing = 0
        # After a refusal, or while this process sees waiters there, a read comes first: a
        # full pool's refusal is then a read, not a failed write.
        first = self._refused_until.get(pool, 0.0) > time.monotonic() or self._contended(pool)
        while rounds < MAX_ROUNDS:
            try:
                if first:
                    seen = self._seen_refusal(pool, counters)
                    if seen is not None:
                        return seen
                    first = False
                if timed_rounds and rounds and self._now_ms() >= until_ms and refusal.state:
                    return refusal
                outcome = self._admit_round(pool, counters, lease_ms, run_until_ms, until_ms)
            except Contended:  # not a round: DynamoDB was busy and wrote nothing
                if not backoff.wait():
                    return Refusal(counters[0], False, refusal.state)
                # Others were writing the state item: read it before writing again. While it
                # is full, that is the answer (and a waiter goes to the queue), not another
                # write that contends with the handoffs.
                first = True
                continue
            if isinstance(outcome, Lease) or outcome.gated or outcome.full:
                return outcome
            refusal = outcome if outcome.state else refusal
            # A round that reaped gave capacity back (to whoever took it first): it does
            # not use up the request's rounds, or a pool of many expired buckets, reaped
            # REAP_BATCH at a time while others take what each pass frees, would refuse it
            # with capacity free. Reaping ends (each pass removes expired buckets), and
            # FREEING_ROUNDS bounds it anyway.
            if outcome.freed and freeing < FREEING_ROUNDS:
                freeing += 1
            else:
                rounds += 1
        return refusal

    def _seen_refusal(self, pool: str, counters: tuple[Counter, ...]) -> Refusal | None:
        """After a recent refusal or contention: the state item read, and the refusal it
        still gives."""
        state = self._table.get(pool, STATE_SK, consistent=True) or {}
        self._observe(pool, state)
        seen = Refusal.of(state, counters)
        if seen.gated and self._gate_holds(pool, seen):
            return seen
        if seen.full and not self._has_expired(state):
            self._refused_until[pool] = time.monotonic() + REFUSED_S
            return seen
        return None

    def _admit_round(
        self,
        pool: str,
        counters: tuple[Counter, ...],
        lease_ms: int,
        run_until_ms: int,
        until_ms: int,
    ) -> Lease | Refusal:
        """One admission write. A final refusal is gated or full; any other refusal means:
        try again (the state changed, a stale gate or expired leases were cleared)."""
        now = self._now_ms()
        expires = now + lease_ms if not run_until_ms else min(now + lease_ms, run_until_ms)
        lease = Lease(new_id(), pool, counters, expires, bucket_of(expires, lease_ms))
        try:
            new = self._table.update(writes.admit(self._table.name, lease))
            return replace(lease, counts={c.name: value(new, c.name) for c in counters})
        except LimiterUnavailable:
            self._withdraw(lease)
            raise
        except Cancelled as cancelled:
            state = cancelled.item(0)
            if _holds(state, lease):
                # Our id (a fresh one) is there: botocore's retry of this very write met
                # its first attempt, which landed and whose answer was lost. Admitted, once.
                return lease
        self._observe(pool, state)
        refusal = Refusal.of(state, counters)
        if refusal.gated or refusal.full:
            self._refused_until[pool] = time.monotonic() + REFUSED_S
        if refusal.gated and not self._gate_holds(pool, refusal):
            return Refusal(refusal.counter, False, state)  # the gate was stale: try again
        if refusal.full and self._has_expired(state):
            # Reap them. A pass that collided with another instance's reap is no loss:
            # capacity came back either way, so the next round may fit.
            self._grant_pass(pool, state, until_ms=until_ms)
            return Refusal(refusal.counter, False, state, freed=True)
        return refusal

    def _gate_holds(self, pool: str, refusal: Refusal) -> bool:
        """Whether a refusal because others wait (q_blocked) is still true. Only a grant pass
        rewrites q_blocked, and passes run when leases are released or waiters check: if
        the waiters are gone (crashed, or their give-up failed) and nobody holds a lease,
        none runs, and newcomers would be refused forever. So a refused newcomer runs one
        pass itself (at most once per REFUSED_S per pool and process): it drops lapsed
        entries and recomputes q_blocked, or finds nothing to change (the gate holds)."""
        if self._gate_checked_until.get(pool, 0.0) > time.monotonic():
            return True
        self._gate_checked_until[pool] = time.monotonic() + REFUSED_S
        done = self._grant_pass(pool, refusal.state or None)
        written = done.written
        for _ in range(GATE_PASSES - 1):  # a long queue of lapsed entries: clear it all
            if not (done.written and done.cleaned and done.more):
                break
            done = self._grant_pass(pool)
        return not written

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
        retry_after_s: int = 1,
        max_waiting: int | None = None,
        fair: tuple[str, int] | None = None,
    ) -> Lease | Ticket:
        """Admit now if the pool has room and nobody waits for these counters; otherwise take
        a ticket and a place in the pool's queue. Poll the ticket (`poll`) until it turns
        into a lease, and `abandon` it when the caller stops waiting.

        `lease_ms` is the lease a grant gives (run time plus margins), never past
        `run_until_ms` (epoch ms; 0 for none); `wait_until_ms` is when the place lapses.
        Conflicts and throttling are retried with backoff until then; a request that could
        not even take its place by then gets the busy error (429), as a full pool's would.
        `max_waiting`: at most this many wait for the first counter (the model's slot) in
        this pool; past it, QueueFull (429). `fair`: (caller, weight), to order the queue by
        fair share between callers (records.FAIR_UNIT) rather than by arrival alone."""
        counters = tuple(counters)
        backoff = Backoff(wait_until_ms, self._clock)
        refusal = self._known_refusal(pool, counters)
        if refusal is None:  # not known to be busy: try to get in at once
            outcome = self._admit_now(pool, counters, lease_ms, run_until_ms, wait_until_ms)
            if isinstance(outcome, Lease):
                return outcome
            refusal = outcome
            # The state as the refusal just read it: a full queue needs no ticket. (A state
            # remembered from an earlier refusal may be stale: the enqueue's condition decides.)
            if max_waiting is not None and _waiting(refusal.state, counters) >= max_waiting:
                raise _queue_full(counters, max_waiting, retry_after_s)
        seq = self._retried(self._next_seq, pool, backoff=backoff)
        if seq is None:
            raise refusal.error(retry_after_s)
        order, start = seq + PRIORITIES[priority] * self._aging, None
        if fair is not None:
            caller, weight = fair
            now_vt = value(refusal.state, VT)
            start = self._retried(self._fair_start, pool, caller, weight, now_vt, backoff=backoff)
            if start is None:
                raise refusal.error(retry_after_s)
            order = start + PRIORITIES[priority] * self._aging * FAIR_UNIT
        ticket = Ticket(
            ticket_id=new_id(),
            pool=pool,
            counters=counters,
            seq=seq,
            order=order,
            lease_ms=lease_ms,
            wait_until_ms=wait_until_ms,
            run_until_ms=run_until_ms,
            priority=priority,
            passes_left=WAITER_PASSES,
            start=start,
        )
        # Polled until a little after its wait ends (a grant then is read by `abandon`).
        waits_s = (wait_until_ms - self._now_ms()) / 1000
        self._mailbox.register(ticket.ticket_id, ticket.poll_after_s, max(waits_s, 0.0) + 5)
        state = refusal.state
        rounds = 0
        while rounds < MAX_ROUNDS:
            full = [c.name for c in counters if value(state, c.name) + c.weight > c.capacity]
            try:
                # Conditional on this request still not being admissible: a release that
                # committed since the refusal saw nobody waiting and handed nothing over.
                self._table.transact(writes.enqueue(self._table.name, ticket, full, max_waiting))
                return ticket
            except Contended:  # nothing written: the same place, a little later
                if backoff.wait():
                    continue
                break
            except Cancelled as cancelled:
                if cancelled.failed(1):
                    return ticket  # our entry exists: an earlier attempt landed, answer lost
                seen = cancelled.item(0)
                if max_waiting is not None and _waiting(seen, counters) >= max_waiting:
                    self._mailbox.forget(ticket.ticket_id)
                    raise _queue_full(counters, max_waiting, retry_after_s) from None
            except LimiterUnavailable:
                # The write may have landed: take the place back (and a lease, had it one).
                granted = self.abandon(ticket)
                if granted is not None:
                    self.release(granted)
                raise
            # Admissible after all (capacity came back): in directly, or queue again.
            rounds += 1
            outcome = self._admit_now(pool, counters, lease_ms, run_until_ms, wait_until_ms)
            if isinstance(outcome, Lease):
                self._mailbox.forget(ticket.ticket_id)
                return outcome
            refusal, state = outcome, outcome.state
        self._mailbox.forget(ticket.ticket_id)
        raise refusal.error(retry_after_s)

    def _retried(self, call: Callable[..., T], *args: Any, backoff: Backoff) -> T | None:
        """`call(*args)`, retried with `backoff` while DynamoDB is contended; None when its
        deadline passes first."""
        while True:
            try:
                return call(*args)
            except Contended:
                if not backoff.wait():
                    return None

    def _known_refusal(self, pool: str, counters: tuple[Counter, ...]) -> Refusal | None:
        """No I/O: right after a refusal in `pool`, the refusal its last seen state gives (so
        a waiter goes straight to its ticket; the enqueue's condition catches a stale view)."""
        if self._refused_until.get(pool, 0.0) <= time.monotonic():
            return None
        refusal = Refusal.of(self._last_state.get(pool, {}), counters)
        return refusal if refusal.gated or refusal.full else None

    def _next_seq(self, pool: str) -> int:
        """A ticket: the pool's atomic counter, so arrival order is DynamoDB's own order."""
        answer = self._table.call(
            "update_item",
            TableName=self._table.name,
            Key=key(f"{pool}#seq", "seq"),
            UpdateExpression="ADD n :one",
            ExpressionAttributeValues={":one": n(1)},
            ReturnValues="UPDATED_NEW",
        )
        return int(answer["Attributes"]["n"]["N"])

    def _fair_start(self, pool: str, caller: str, weight: int, now_vt: int) -> int:
        """The caller's next virtual start in `pool`: the pool's virtual time if the caller
        is behind it (it had nothing queued), else its last finish; its finish then moves on
        by FAIR_UNIT / weight. One conditional write when the caller was idle, two when it
        has a backlog (the second an atomic ADD: concurrent requests get distinct starts)."""
        step = max(1, FAIR_UNIT // weight)
        ttl = n(int(self._clock()) + FAIR_TTL_S)
        fair_key = key(f"{pool}#fair", caller)
        try:
            self._table.update(
                {
                    "TableName": self._table.name,
                    "Key": fair_key,
                    "UpdateExpression": "SET f = :next, #ttl = :ttl",
                    "ConditionExpression": "attribute_not_exists(f) OR f < :now",
                    "ExpressionAttributeNames": {"#ttl": "ttl"},
                    "ExpressionAttributeValues": {
                        ":next": n(now_vt + step),
                        ":now": n(now_vt),
                        ":ttl": ttl,
                    },
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            )
            return now_vt
        except Cancelled:
            pass  # a backlog: it starts where its last request finishes
        moved = self._table.update(
            {
                "TableName": self._table.name,
                "Key": fair_key,
                "UpdateExpression": "ADD f :step SET #ttl = :ttl",
                "ExpressionAttributeNames": {"#ttl": "ttl"},
                "ExpressionAttributeValues": {":step": n(step), ":ttl": ttl},
                "ReturnValues": "UPDATED_NEW",
            }
        )
        return int(moved["f"]["N"]) - step

    def poll(self, ticket: Ticket) -> Lease | None:
        """The lease handed to `ticket`, if any yet. This process's notice poller reads the
        notices (and this process's own handoffs arrive in memory); now and then, a check of
        the queue's head, which may run a grant pass (bounded per ticket). Between polls,
        wait on `notify`'s callback, at most `next_poll_s(ticket)`."""
        if not self._mailbox.background:
            self._mailbox.poll_once()
        lease = self._handed(ticket)
        if lease is not None:
            return lease
        if self._now_ms() >= ticket.next_check_ms:
            try:
                lease = self._check(ticket)
            except Contended:
                return None  # DynamoDB was busy: the next check tries again (a read, at worst)
            if lease is not None:
                self._mailbox.forget(ticket.ticket_id)
            return lease
        return None

    def take(self, ticket: Ticket) -> Lease | None:
        """The lease handed to `ticket`, if one has arrived: memory only, no I/O (so a waiter
        woken by its notice gets going without a thread hop)."""
        return self._handed(ticket)

    def poll_needed(self, ticket: Ticket) -> bool:
        """Whether `poll` has anything to do now (no I/O here): a lease handed over, or the
        ticket's check due. Lets an event loop skip a thread hop while nothing happened."""
        return (
            not self._mailbox.background
            or self._mailbox.take(ticket.ticket_id) is not None
            or self._now_ms() >= ticket.next_check_ms
        )

    def next_poll_s(self, ticket: Ticket) -> float:
        """Seconds until `poll` has something to do unless a notice wakes the waiter first."""
        until = min(ticket.next_check_ms, ticket.wait_until_ms) - self._now_ms()
        if not self._mailbox.background:
            until = min(until, int(ticket.poll_after_s * 1000))
        return max(0.0, until / 1000)

    def notify(self, ticket: Ticket, callback: Callable[[], object]) -> None:
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

    def wait(self, ticket: Ticket) -> Lease | None:
        """Blocking: poll until a lease is handed over (returned) or the ticket's wait deadline
        passes (the place is given up; None). The service does the same on its event loop."""
        event = self._mailbox.event(ticket.ticket_id)
        while True:
            lease = self.poll(ticket)
            if lease is not None:
                return lease
            if self._now_ms() >= ticket.wait_until_ms:
                return self.abandon(ticket)
            pause = self.next_poll_s(ticket)
            if event is not None:
                event.wait(pause)
            else:
                time.sleep(pause)

    def _handed(self, ticket: Ticket) -> Lease | None:
        notice = self._mailbox.take(ticket.ticket_id)
        if notice is None:
            return None
        self._mailbox.forget(ticket.ticket_id)
        return self._granted(ticket, notice)

    def _notices(self, ticket_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The grant notices that exist among `ticket_ids` (eventually consistent reads: a
        notice is written once, so a stale answer only delays it)."""
        items = self._table.batch_get(
            [key(f"grant#{t}", "grant") for t in ticket_ids], consistent=False
        )
        return {item["pk"]["S"].removeprefix("grant#"): item for item in items}

    def abandon(self, ticket: Ticket) -> Lease | None:
        """Give the place up (one write). If a lease was handed over meanwhile it is returned:
        the caller uses it or releases it."""
        self._mailbox.forget(ticket.ticket_id)
        backoff = self._table.backoff()
        while True:
            try:
                try:
                    self._table.transact(writes.abandon(self._table.name, ticket))
                    return None
                except Cancelled:
                    # The entry is gone: granted (there is a notice) or removed as lapsed.
                    notice = self._table.get(f"grant#{ticket.ticket_id}", "grant", consistent=True)
                    return self._granted(ticket, notice) if notice is not None else None
            except Contended:
                if backoff.wait():
                    continue
                error: Exception = LimiterUnavailable("the lease table stayed contended")
            except LimiterUnavailable as exc:
                error = exc
            # The entry lapses at wait_until_ms (a pass then drops it); a grant made before
            # that expires too.
            log.error("could not give up ticket %s: %s", ticket.ticket_id, error)
            return None

    def _granted(self, ticket: Ticket, notice: dict[str, Any]) -> Lease:
        return Lease(
            ticket.ticket_id,
            ticket.pool,
            ticket.counters,
            int(notice["exp"]["N"]),
            bucket=value(notice, "b"),
            granted=True,
            counts={k: int(v["N"]) for k, v in notice.get("n", {}).get("M", {}).items()},
        )

    def _check(self, ticket: Ticket) -> Lease | None:
        """Reads the state item (and the queue ahead of `ticket`); runs a grant pass when the
        ticket is near the head and capacity is free or held by expired leases (a release
        that did not hand over: its holder crashed, or its rounds ran out)."""
        now = self._now_ms()
        state = self._table.get(ticket.pool, STATE_SK, consistent=False) or {}
        self._observe(ticket.pool, state)
        spread = max(1.0, value(state, WAITING) / (CHECK_S * CHECKS_PER_S_PER_POOL))
        ticket.next_check_ms = now + int(CHECK_S * spread * random.uniform(800, 1200))
        short = [c.name for c in ticket.counters if value(state, c.name) + c.weight > c.capacity]
        ticket.short = short[0] if short else ticket.short
        # At the head, a ticket stays there but for a later arrival of higher priority, and
        # then it only polls faster than it must: its checks skip the count, a read a second.
        ahead = 0 if ticket.ahead == 0 else self._ahead(ticket, now)
        ticket.ahead = ahead
        near = ahead < HEAD_WINDOW
        # Next in line (or nearly): every millisecond between a handoff and its pickup idles a
        # slot. Further back, slower: polls are reads, but they load the table all the same.
        ticket.poll_after_s = POLL_FAST_S if ahead < 2 else POLL_NEAR_S if near else POLL_SLOW_S
        self._mailbox.pace(ticket.ticket_id, ticket.poll_after_s)
        if not near or ticket.passes_left <= 0 or now >= ticket.wait_until_ms:
            return None
        if short and not self._has_expired(state):
            return None
        done = self._grant_pass(ticket.pool, until_ms=ticket.wait_until_ms)
        if done.cleaned:
            # Work for crashed requests (at most one pass each): not charged to this ticket,
            # and the next poll checks again if some is left.
            if done.more:
                ticket.next_check_ms = now
        else:
            ticket.passes_left -= 1
        if ticket.ticket_id in done.grants:
            exp, bucket, counts = done.grants[ticket.ticket_id]
            return Lease(
                ticket.ticket_id,
                ticket.pool,
                ticket.counters,
                exp,
                bucket=bucket,
                granted=True,
                counts=counts,
            )
        return None

    def _ahead(self, ticket: Ticket, now: int) -> int:
        """Live entries ahead of `ticket`, counted up to HEAD_WINDOW: the queue is read
        backwards from the ticket, so the count is its real position (lapsed entries, of
        crashed waiters, do not count, and a long queue's head does not either)."""
        request: dict[str, Any] = {
            "KeyConditionExpression": "pk = :pk AND sk < :me",
            "FilterExpression": "#wu > :now",
            "ExpressionAttributeNames": {"#wu": "wu"},
            "ExpressionAttributeValues": {
                ":pk": s(f"{ticket.pool}#queue"),
                ":me": s(ticket.sk),
                ":now": n(now),
            },
            "ScanIndexForward": False,
            "Select": "COUNT",
            "Limit": 2 * HEAD_WINDOW,
        }
        ahead = 0
        for _ in range(AHEAD_PAGES):
            answer = self._table.query(**request)
            ahead += int(answer["Count"])
            if ahead >= HEAD_WINDOW or "LastEvaluatedKey" not in answer:
                return min(ahead, HEAD_WINDOW)
            request["ExclusiveStartKey"] = answer["LastEvaluatedKey"]
        # Pages of lapsed entries: count it near, so that its passes drop them.
        return ahead

    # -- release and handoff ------------------------------------------------------------

    def release(self, lease: Lease, until_ms: int | None = None) -> bool:
        """Free the caller's own lease, handing its capacity to waiters if there are any.
        Conflicts and throttling are retried with backoff until the release lands or
        `until_ms` passes (the invocation's end; by default the lease's expiry, after which
        any instance may reap it): one busy moment of DynamoDB must not hold a slot for a
        whole lease. Close to the deadline it frees the capacity in one write and
        leaves the handoff to the waiters' checks. False when the lease was already gone
        (expired and reaped), or DynamoDB failed or stayed busy: then it simply expires."""
        backoff = Backoff(
            lease.expires_at_ms if until_ms is None else until_ms,
            self._clock,
            RELEASE_BACKOFF_BASE_S,
            RELEASE_BACKOFF_CAP_S,
        )
        # Waiters are likely: hand over at once, with no write bound to fail first.
        mode = "handoff" if lease.granted or self._contended(lease.pool) else "if-nobody-waits"
        state: dict[str, Any] | None = None
        head = None
        if mode == "if-nobody-waits" and self._mailbox.background and _filled(lease):
            # The lease took the last of a counter, so a waiter may have come since: the
            # queue's head is read beside the conditional release, and a handoff needs one
            # round trip less (in Lambda the caller's answer waits for this release). Never
            # with a store that is not thread-safe (moto: no background poller either).
            head = self._beside.submit(self._head, lease.pool, PASS_ON_WINDOW)
        try:
            return self._release(lease, backoff, mode, state, head)
        finally:
            if head is not None:
                # Nothing of a release outlives it (a Lambda sandbox freezes once it answers).
                wait_futures([head])

    def _release(
        self,
        lease: Lease,
        backoff: Backoff,
        mode: str,
        state: dict[str, Any] | None,
        head: Future[tuple[list[Entry], bool]] | None,
    ) -> bool:
        while True:
            needs_s = max(HANDOFF_MIN_S, HANDOFF_REQUESTS * self._table.latency_s)
            if mode == "handoff" and backoff.left_ms() < needs_s * 1000:
                mode = "plainly"
            try:
                if mode == "handoff":
                    done = self._hand_over(lease, state, _entries(head))
                    head = None  # read once: a retry reads the queue afresh
                    if done is not None:
                        if done:
                            self._tidy(lease, None, backoff)
                        return done
                    # Its rounds ran out (the queue kept changing): free the capacity
                    # anyway; waiters' own checks pick it up (CHECK_S).
                    mode = "plainly"
                    continue
                nobody_waits = mode == "if-nobody-waits"
                new = self._table.update(writes.release(self._table.name, lease, nobody_waits))
                self._tidy(lease, new, backoff)
                return True
            except Cancelled as cancelled:
                state = cancelled.item(0)
                if not _holds(state, lease):
                    log.warning(
                        "lease %s in %s was already gone (expired and reaped)",
                        lease.lease_id,
                        lease.pool,
                    )
                    return False
                # Somebody waits (ALL_OLD of the state item says so): hand over.
                self._observe(lease.pool, state)
                mode = "handoff"
            except Contended as busy:
                if not backoff.wait():
                    log.error(
                        "release of lease %s stayed contended (%s), it will expire",
                        lease.lease_id,
                        busy.code,
                    )
                    return False
                state = None  # read afresh: others wrote meanwhile
            except LimiterUnavailable as exc:
                log.error("release of lease %s failed, it will expire: %s", lease.lease_id, exc)
                return False

    def _tidy(self, lease: Lease, state: dict[str, Any] | None, backoff: Backoff) -> None:
        """After a release, with time to spare: its grant notice goes (if it was granted),
        and past buckets left empty in `state` (the state after the release) are removed.
        Both are housekeeping: what does not fit in the time left is left to the table's
        TTL (the notice) and to the next release or grant pass (the buckets)."""
        spare_ms = 2 * (TIDY_REQUESTS + 1) * self._table.latency_s * 1000
        try:
            while lease.granted and backoff.left_ms() > spare_ms:
                try:
                    notice = writes.delete_notice(self._table.name, lease.lease_id)
                    self._table.call("delete_item", **notice)
                    break
                except Contended:  # its grant's transaction may still hold it
                    if not backoff.wait():
                        break
            # Only past buckets: no admission goes there any more, so one tidy is final (a
            # current bucket emptied by this release may fill again within BUCKET_MS).
            empty = [b for b in _expired(state or {}, self._now_ms()) if b.empty][:REAP_BATCH]
            if empty and backoff.left_ms() > spare_ms:
                self._table.update(writes.tidy(self._table.name, lease.pool, empty))
        except (Cancelled, Contended, LimiterUnavailable):
            pass

    def _hand_over(
        self, lease: Lease, state: dict[str, Any] | None, head: list[Entry] | None = None
    ) -> bool | None:
        """Release `lease` and hand its capacity to the queue: True when done, False when the
        lease was already gone, None when no pass could be written in HANDOFF_ROUNDS (the
        queue kept changing). Contended propagates: the caller backs off and tries again.
        `head`: the queue's first entries, if already read."""
        passed_on, seen = self._pass_on(lease, head)
        if passed_on is not None:
            return passed_on
        outcome = self._grant_pass(
            lease.pool, seen or state, releasing=lease, rounds=HANDOFF_ROUNDS
        )
        if outcome.lease_gone:
            return False
        return True if outcome.written else None

    def _pass_on(
        self, lease: Lease, head_read: list[Entry] | None = None
    ) -> tuple[bool | None, dict[str, Any] | None]:
        """The common handoff, in two requests (the head of the queue, one transaction): the
        release and the grant to the first live entry, whatever its model, conditional on the
        head's counters fitting once the lease is gone. No read of the state item: the
        condition checks it. (None, state as DynamoDB had it) when the head does not fit or
        left meanwhile: then a full grant pass decides."""
        now = self._now_ms()
        # Only the first live entry matters here: a short read is a faster handoff.
        entries = head_read if head_read else self._head(lease.pool, PASS_ON_WINDOW)[0]
        items: list[dict[str, Any]] = []
        dropped: list[Entry] = []
        head = None
        for entry in entries:
            if entry.wait_until_ms > now and entry.expiry(now) > now:
                head = entry
                break
            items.append(writes.drop_entry(self._table.name, lease.pool, entry.sk, now))
            dropped.append(entry)
        if head is None:
            return None, None  # nobody lives in the head window: the full pass tidies up
        freed = {c.name: c.weight for c in lease.counters}
        wanted = {name: weight for name, _, weight in head.counters}
        if any(weight > wanted[name] for name, weight in freed.items() if name in wanted):
            # The lease frees more than the head takes (a heavy model's memory): the full
            # pass, which reads the state, hands the rest to the entries after it.
            return None, None
        expires = head.expiry(now)
        bucket = writes.grant_bucket(expires, head.lease_ms, lease.bucket)
        state_at = len(items)
        update = writes.pass_on_state(self._table.name, lease, head, bucket, dropped)
        items.append({"Update": update})
        items += writes.grant(self._table.name, lease.pool, head, expires, bucket, {})
        try:
            self._table.transact(items)
        except Cancelled as cancelled:
            if not cancelled.failed(state_at):
                return None, None  # the head left, or a lapsed entry was dropped meanwhile
            state = cancelled.item(state_at)
            if not _holds(state, lease):
                return False, None  # our lease had expired and was reaped
            return None, state  # the head does not fit (ALL_OLD tells the state)
        self._mailbox.hand({head.ticket_id: {"exp": n(expires), "b": n(bucket)}})
        return True, None

    def _withdraw(self, lease: Lease) -> None:
        """After an admission whose answer was lost: remove the lease if the write landed
        after all (if it did not, the condition makes this a no-op)."""
        backoff = self._table.backoff()
        while True:
            try:
                self._table.update(writes.release(self._table.name, lease, False))
            except Cancelled:
                return
            except Contended:
                if backoff.wait():
                    continue
                log.error("unanswered admission %s may hold its slot until expiry", lease.lease_id)
                return
            except LimiterUnavailable:
                log.error("unanswered admission %s may hold its slot until expiry", lease.lease_id)
                return
            log.warning(
                "admission %s in %s got no answer; its lease was removed",
                lease.lease_id,
                lease.pool,
            )
            return

    # -- the grant pass: hand capacity to waiters in order, reap, drop lapsed entries ------

    def _grant_pass(
        self,
        pool: str,
        state: dict[str, Any] | None = None,
        releasing: Lease | None = None,
        *,
        rounds: int = MAX_ROUNDS,
        until_ms: int | None = None,
    ) -> _Pass:
        """One transaction that (1) releases `releasing`, (2) reaps expired buckets, (3) drops
        queue entries past their wait deadline, (4) hands a lease to each waiter that fits, in
        queue order, never letting an entry overtake an earlier one on a counter that the
        earlier one waits for, and (5) records those counters in q_blocked. At most `rounds`
        tries (a try fails when another writer changed what it read), none after `until_ms`."""
        for attempt in range(rounds):
            if attempt and until_ms is not None and self._now_ms() >= until_ms:
                break
            if state is None:
                state = self._table.get(pool, STATE_SK, consistent=True) or {}
            plan = self._plan(pool, state, releasing)
            if plan is None:
                return _Pass()
            try:
                # Contended propagates: callers back off. A pass that only changes the state
                # item (a release, a reap) is a single-item write: no transaction to hold it.
                if len(plan.items) == 1:
                    self._table.update(plan.items[0]["Update"])
                else:
                    self._table.transact(plan.items)
            except Cancelled as cancelled:
                # The state changed (ALL_OLD says how), or an entry changed: re-read.
                state = cancelled.item(0) if cancelled.failed(0) else None
                if releasing is not None and state is not None and not _holds(state, releasing):
                    return _Pass(lease_gone=True)
                continue
            self._mailbox.hand(
                {
                    ticket_id: {
                        "exp": n(exp),
                        "b": n(bucket),
                        "n": {"M": {k: n(v) for k, v in counts.items()}},
                    }
                    for ticket_id, (exp, bucket, counts) in plan.grants.items()
                }
            )
            if plan.reaped:
                log.warning("took over %d expired lease(s) in %s", plan.reaped, pool)
            return _Pass(True, plan.grants, cleaned=plan.cleaned, more=plan.more)
        return _Pass()

    def _plan(self, pool: str, state: dict[str, Any], releasing: Lease | None) -> _Plan | None:
        """Reads the queue's head and composes the pass's transaction (expired buckets are
        in the state item: no read for them)."""
        now = self._now_ms()
        entries, more = self._head(pool)
        # The rest of a long queue is not granted by this pass, but what it waits for is
        # still blocked: a newcomer must not take what a waiter further back is short of.
        rest = self._rest(pool, entries[-1].sk) if more else []
        return self._compose(pool, state, releasing, now, entries, rest)

    def _rest(self, pool: str, after_sk: str) -> list[Entry] | None:
        """The queue entries after `after_sk` (the grant window's last), or None when they
        are more than one page of the Query holds (then every counter waits: ANY)."""
        answer = self._table.query(
            KeyConditionExpression="pk = :pk AND sk > :after",
            ExpressionAttributeValues={":pk": s(f"{pool}#queue"), ":after": s(after_sk)},
            ConsistentRead=True,
        )
        if "LastEvaluatedKey" in answer:
            return None
        return [Entry.of(item) for item in answer.get("Items", [])]

    def _compose(
        self,
        pool: str,
        state: dict[str, Any],
        releasing: Lease | None,
        now: int,
        entries: list[Entry],
        rest: list[Entry] | None,
    ) -> _Plan | None:
        """The pass's transaction items (no I/O). `entries` is the grant window; `rest` the
        entries behind it (None: too many to read), which are not granted here but block
        what they are short of."""
        more = rest is None or bool(rest)
        table = self._table.name
        values = counters_of(state)
        items: list[dict[str, Any]] = []
        delta: dict[str, int] = {}
        if releasing is not None:
            for c in releasing.counters:
                delta[c.name] = delta.get(c.name, 0) - c.weight
        taken = releasing.bucket if releasing is not None else None
        expired = [b for b in _expired(state, now) if b.end != taken]
        reaped = expired[:REAP_BATCH]
        cleaned = reaped_leases = sum(len(gone.ids) for gone in reaped)
        for gone in reaped:
            for name, weight in gone.weights.items():
                delta[name] = delta.get(name, 0) - weight
        removed: list[Entry] = []
        blocked: set[str] = set()
        caps: dict[str, int] = {}
        grants: dict[str, tuple[int, int, dict[str, int]]] = {}
        granted: dict[int, dict[str, Any]] = {}
        served: int | None = None
        window = len(entries)
        for index, entry in enumerate([*entries, *(rest or [])]):
            # Grants only in the window, and within TransactWriteItems' 100 items (the state
            # item and one more grant); past that, an entry only blocks what it is short of.
            grantable = index < window and len(items) + 1 + 2 <= MAX_TRANSACT_ITEMS
            more = more or (index < window and not grantable)
            expires = entry.expiry(now)
            if entry.wait_until_ms <= now or expires <= now:
                if grantable:
                    items.append(writes.drop_entry(table, pool, entry.sk, now))
                    removed.append(entry)
                    cleaned += entry.wait_until_ms <= now
                continue
            if any(name in blocked for name, _, _ in entry.counters):
                continue
            short = [
                name
                for name, capacity, weight in entry.counters
                if values.get(name, 0) + delta.get(name, 0) + weight > capacity
            ]
            if short or not grantable:
                # Not granted now: what it is short of (all it takes, if it would fit but
                # this pass cannot grant it) is kept from newcomers.
                blocked.update(short or [name for name, _, _ in entry.counters])
                continue
            bucket = writes.grant_bucket(expires, entry.lease_ms, taken)
            into = granted.setdefault(bucket, {"ids": set(), "weights": {}})
            into["ids"].add(entry.ticket_id)
            for name, capacity, weight in entry.counters:
                delta[name] = delta.get(name, 0) + weight
                caps[name] = min(capacity, caps.get(name, capacity))
                into["weights"][name] = into["weights"].get(name, 0) + weight
            counts = {name: values.get(name, 0) + delta[name] for name, _, _ in entry.counters}
            grants[entry.ticket_id] = (expires, bucket, counts)
            if entry.start is not None:
                served = max(served or 0, entry.start)
            items += writes.grant(table, pool, entry, expires, bucket, counts)
            removed.append(entry)
        if rest is None:
            blocked.add(ANY)  # more waiters than one read holds: every counter waits
        old_blocked = set(state.get(BLOCKED, {}).get("SS", []))
        if not items and not reaped and releasing is None and blocked == old_blocked:
            return None  # nothing to write
        update = writes.grant_pass_state(
            table,
            pool,
            state,
            releasing=releasing,
            reaped=reaped,
            granted=granted,
            delta=delta,
            caps=caps,
            removed=removed,
            blocked=blocked,
            served=served,
        )
        items.insert(0, {"Update": update})
        more = more or len(expired) > REAP_BATCH
        return _Plan(items, grants, cleaned, more, reaped_leases)

    def _head(self, pool: str, limit: int = GRANT_WINDOW) -> tuple[list[Entry], bool]:
        answer = self._table.query(
            KeyConditionExpression="pk = :pk AND begins_with(sk, :w)",
            ExpressionAttributeValues={":pk": s(f"{pool}#queue"), ":w": s("w#")},
            ConsistentRead=True,
            Limit=limit,
        )
        return [Entry.of(item) for item in answer.get("Items", [])], "LastEvaluatedKey" in answer

    def _has_expired(self, state: dict[str, Any]) -> bool:
        """Whether the state item holds leases that have expired (a crashed holder's)."""
        return any(not bucket.empty for bucket in _expired(state, self._now_ms()))

    # -- reading -------------------------------------------------------------------------

    def usage(self, pools: Sequence[str], waiting: bool = False) -> dict[str, dict[str, int]]:
        """Per pool, the weight that unexpired leases hold on each counter: the state item's
        counters less its expired buckets not yet reaped (one BatchGetItem per 100 pools).
        `waiting`: also, under waiting_attr(counter), how many wait for each counter
        (lapsed entries not yet dropped included)."""
        unique = list(dict.fromkeys(pools))
        found: dict[str, dict[str, int]] = {pool: {} for pool in unique}
        try:
            states = self._table.states(unique)
        except Contended as busy:
            raise LimiterUnavailable(
                f"the lease table is busy ({busy.code}); retry later"
            ) from None
        now = self._now_ms()
        for item in states:
            totals = counters_of(item)
            for bucket in _expired(item, now):
                for name, weight in bucket.weights.items():
                    totals[name] = totals.get(name, 0) - weight
            if waiting:
                totals |= {k: value(item, k) for k in item if k.startswith(f"{WAITING}#")}
            found[item["pk"]["S"]] = {name: count for name, count in totals.items() if count > 0}
        return found

    def waiting(self, pool: str) -> int:
        """Requests waiting in the pool's queue (including lapsed entries not yet dropped)."""
        return value(self._table.get(pool, STATE_SK, consistent=True) or {}, WAITING)


def _holds(state: dict[str, Any], lease: Lease) -> bool:
    """Whether the state item holds `lease` (its id is in its bucket)."""
    return lease.lease_id in buckets_of(state).get(lease.bucket, Bucket(0)).ids


def _expired(state: dict[str, Any], now_ms: int) -> list[Bucket]:
    """The state item's buckets whose end has passed (their leases have all expired), oldest
    first."""
    return sorted(
        (bucket for bucket in buckets_of(state).values() if bucket.expired(now_ms)),
        key=lambda bucket: bucket.end,
    )


def _waiting(state: dict[str, Any], counters: tuple[Counter, ...]) -> int:
    """How many wait for the first of `counters` (the model's slot) in this pool."""
    return value(state, waiting_attr(counters[0].name))


def _queue_full(counters: tuple[Counter, ...], max_waiting: int, retry_after_s: int) -> QueueFull:
    label = counters[0].label
    return QueueFull(
        f"{label} already has {max_waiting} requests waiting (its max_waiting); retry later",
        retry_after=retry_after_s,
        max_waiting=max_waiting,
    )


def _filled(lease: Lease) -> bool:
    """Whether the admission left some counter without room for another like it."""
    return bool(lease.counts) and any(
        lease.counts.get(c.name, 0) + c.weight > c.capacity for c in lease.counters
    )


def _entries(head: Future[tuple[list[Entry], bool]] | None) -> list[Entry] | None:
    """The prefetched head of the queue, or None when there is none or its read failed (the
    handoff then reads it itself)."""
    if head is None:
        return None
    try:
        return head.result()[0]
    except Exception:  # a failed prefetch is only a round trip lost: read again
        return None
