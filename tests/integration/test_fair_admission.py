"""Fair admission (hermes.limiter) against DynamoDB Local (real atomic transactions): limits,
order, recovery, cost. Each test has a lease table of its own on the session's DynamoDB Local.

  .venv/bin/python -m pytest -q -s tests/integration/test_fair_admission.py -p no:cacheprovider
(-s prints the measured figures.)
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
from collections import Counter as Tally
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ReadTimeoutError

from hermes.errors import HostBusy, LimiterUnavailable, ModelBusy
from hermes.limiter import Counter, Lease, Limiter, Ticket, lease_table_definition
from hermes.limiter.limiter import MAX_TRANSACT_ITEMS, WAITER_PASSES
from hermes.limiter.records import BUCKET_MS, buckets_of
from local.dynamodb_local import DynamoDBLocal
from tests.support.clock import Clock
from tests.support.conflict_store import ConflictingDynamoDB
from tests.support.dynamodb_limits import ExpressionWatch, item_size
from tests.support.dynamodb_meter import WRITES, Meter
from tests.support.threads import Background, results

POOL = "host#gpu"


def slot(model: str = "gemma", capacity: int = 1, weight: int = 1) -> Counter:
    return Counter(f"inflight_{model}", capacity, weight, ModelBusy, f"model '{model}'")


def budget(capacity: int, weight: int) -> Counter:
    return Counter("memory", capacity, weight, HostBusy, "the memory budget of host 'gpu'")


@pytest.fixture
def dynamodb(conflicting_dynamodb: ConflictingDynamoDB) -> ConflictingDynamoDB:
    """The session's DynamoDB Local behind the conflict-faithful store: a transaction holds its
    items for its 10 ms commit and overlapping ones are cancelled, as on real DynamoDB
    (tests/integration/conftest.py)."""
    return conflicting_dynamodb


def client_of(db: ConflictingDynamoDB) -> Any:
    """A client with room for every test thread's connection."""
    return db.client()


@pytest.fixture
def table(dynamodb: DynamoDBLocal) -> Iterator[str]:
    name = f"Leases-{uuid.uuid4().hex[:8]}"
    client = client_of(dynamodb)
    client.create_table(**lease_table_definition(name))
    yield name
    client.delete_table(TableName=name)


def everything(client: Any, table: str) -> list[dict[str, Any]]:
    items, request = [], {"TableName": table, "ConsistentRead": True}
    while True:
        page = client.scan(**request)
        items += page["Items"]
        if "LastEvaluatedKey" not in page:
            return items
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def assert_clean(client: Any, table: str) -> None:
    """No lease, no queue entry, no notice left; every counter and the waiting count at 0."""
    for item in everything(client, table):
        pk = item["pk"]["S"]
        assert pk.endswith(("#seq", "")) and not pk.endswith("#queue"), item
        assert not any(bucket.ids for bucket in buckets_of(item).values()), item
        assert not pk.startswith("grant#"), item
        if item["sk"]["S"] == "state":
            # (q_blocked only matters while somebody waits.)
            numbers = {k: int(v["N"]) for k, v in item.items() if "N" in v and k != "q_enq"}
            assert set(numbers.values()) <= {0}, item


def wait_by(limiter: Limiter, ticket: Ticket, clock: Clock) -> Lease | None:
    """Limiter.wait on a fake clock: between polls the clock moves on instead of sleeping."""
    while clock.now_ms() < ticket.wait_until_ms:
        lease = limiter.poll(ticket)
        if lease is not None:
            return lease
        clock.advance(ticket.poll_after_s)
    return limiter.abandon(ticket)


def persist(call: Any, *args: Any, **kwargs: Any) -> Any:
    """A test's setup, from several threads: on a store that cancels overlapping transactions,
    one writer may stay contended past an admission's patience or a short wait (429); the
    setup asks again rather than fail on what the test does not measure."""
    while True:
        with contextlib.suppress(ModelBusy, HostBusy):
            return call(*args, **kwargs)


def hold_and_release(limiter: Limiter, got: Lease | Ticket) -> Lease | None:
    return got if isinstance(got, Lease) else limiter.wait(got)


# -- safety -------------------------------------------------------------------------------


def test_sixteen_waiting_threads_never_exceed_the_slot_and_the_budget_together(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    """Given one model with 3 slots whose memory weight 2 meets a budget of 4 (binds at 2),
    when 16 threads enqueue, wait, hold and release 12 times each,
    then never more than 2 hold at once, every request is served, and nothing is left."""
    client = client_of(dynamodb)
    watch = ExpressionWatch()
    limiter = Limiter(watch.watch(client), table, light_calls=False)  # every request watched
    counters = [slot("mistral", 3), budget(4, 2)]
    holders = peak = served = 0
    lock = threading.Lock()

    def worker(_: int) -> None:
        nonlocal holders, peak, served
        for _ in range(12):
            now = int(time.time() * 1000)
            got = limiter.enqueue(POOL, counters, 10_000, wait_until_ms=now + 20_000)
            lease = hold_and_release(limiter, got)
            assert lease is not None, "a waiter timed out"
            with lock:
                holders += 1
                served += 1
                peak = max(peak, holders)
            time.sleep(0.003)
            with lock:
                holders -= 1
            assert limiter.release(lease)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(worker, range(16)))
    print(f"\n  race: peak {peak} (limit 2), served {served}, requests checked {watch.checked}")
    # Never more than 2 (both slots in use at once depends on timing: not asserted).
    assert peak <= 2 and served == 16 * 12
    assert watch.found == []
    assert limiter.usage([POOL]) == {POOL: {}}
    assert_clean(client, table)


def test_two_models_on_one_budget_hold_their_own_limits_under_the_race(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    """Given gemma (2 slots, weight 2) and llama3 (1 slot, weight 4) on a budget of 6,
    when 8 threads of each wait for and hold their model, then per model and per host the
    in-flight weight never passes its limit."""
    limiter = Limiter(client_of(dynamodb), table)
    models = {
        "gemma": [slot("gemma", 2), budget(6, 2)],
        "llama3": [slot("llama3", 1), budget(6, 4)],
    }
    inflight = {"gemma": 0, "llama3": 0}
    peaks = {"gemma": 0, "llama3": 0, "memory": 0}
    lock = threading.Lock()

    def worker(model: str) -> None:
        for _ in range(8):
            now = int(time.time() * 1000)
            lease = hold_and_release(
                limiter,
                limiter.enqueue(POOL, models[model], 10_000, wait_until_ms=now + 20_000),
            )
            assert lease is not None
            with lock:
                inflight[model] += 1
                memory = inflight["gemma"] * 2 + inflight["llama3"] * 4
                peaks[model] = max(peaks[model], inflight[model])
                peaks["memory"] = max(peaks["memory"], memory)
            time.sleep(0.003)
            with lock:
                inflight[model] -= 1
            limiter.release(lease)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(worker, ["gemma", "llama3"] * 8))
    print(f"\n  two models: peaks {peaks} (limits gemma 2, llama3 1, memory 6)")
    assert peaks["gemma"] <= 2 and peaks["llama3"] <= 1 and peaks["memory"] <= 6
    assert peaks["llama3"] == 1  # the heavy model was not starved by the light one
    assert_clean(client_of(dynamodb), table)


def test_limits_hold_with_crashes_give_ups_priorities_and_three_models(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    """12 threads, three models on a budget of 6, random priorities; some holders crash (their
    400 ms leases are never released), some waiters give up after 50 ms. At every admission the
    live holders stay within every limit, and afterwards everything comes back."""
    import random

    limiter = Limiter(client_of(dynamodb), table, aging_tickets=4)
    models = {
        "gemma": [slot("gemma", 2), budget(6, 2)],
        "llama3": [slot("llama3", 1), budget(6, 4)],
        "mistral": [slot("mistral", 2), budget(6, 2)],
    }
    weight = {"gemma": 2, "llama3": 4, "mistral": 2}
    live: dict[str, list[float]] = {m: [] for m in models}  # expiry (s) of each live holder
    lock = threading.Lock()
    violations: list[str] = []
    tally: Tally[str] = Tally()

    def admitted(model: str, lease: Lease) -> None:
        now = time.time()
        with lock:
            for expiries in live.values():
                expiries[:] = [e for e in expiries if e > now]  # crashed holders stop at expiry
            live[model].append(lease.expires_at_ms / 1000)
            counts = {m: len(e) for m, e in live.items()}
            memory = sum(weight[m] * n for m, n in counts.items())
            if counts["gemma"] > 2 or counts["llama3"] > 1 or counts["mistral"] > 2 or memory > 6:
                violations.append(f"{counts} memory {memory}")

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(10):
            model = rng.choice(list(models))
            fate = rng.choices(["run", "crash", "give up"], [6, 1, 1])[0]
            wait_ms = 50 if fate == "give up" else 20_000
            lease_ms = 400 if fate == "crash" else 10_000
            try:
                got = limiter.enqueue(
                    POOL, models[model], lease_ms,
                    wait_until_ms=int(time.time() * 1000) + wait_ms,
                    priority=rng.choice(["high", "normal", "low"]),
                )  # fmt: skip
            except (ModelBusy, HostBusy):
                # Its wait ran out while the store was contended: the 429 of a wait.
                assert fate == "give up"
                got = None
            lease = None if got is None else got if isinstance(got, Lease) else limiter.wait(got)
            if lease is None:
                tally["gave up"] += 1
                continue
            admitted(model, lease)
            tally[fate] += 1
            time.sleep(0.003)
            with lock:
                if fate != "crash":
                    live[model].remove(lease.expires_at_ms / 1000)
            if fate != "crash":
                limiter.release(lease)

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(worker, range(12)))
    print(f"\n  fuzz: {dict(tally)}, violations {violations}")
    assert violations == []
    # The crashed leases expire, and their bucket ends (BUCKET_MS later at most): a
    # newcomer's pass reaps them.
    time.sleep(0.5 + BUCKET_MS / 1000)
    lease = limiter.acquire(POOL, models["llama3"], 1_000)
    limiter.release(lease)
    assert limiter.usage([POOL]) == {POOL: {}} and limiter.waiting(POOL) == 0


def test_busy_answers_name_the_full_counter_and_waiting_requests_are_not_overtaken(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    limiter = Limiter(client_of(dynamodb), table)
    held = limiter.acquire(POOL, [slot("gemma", 2), budget(3, 2)], 10_000)
    with pytest.raises(HostBusy) as host:
        limiter.acquire(POOL, [slot("gemma", 2), budget(3, 2)], 10_000, retry_after_s=2)
    assert host.value.retry_after == 2 and "memory budget" in str(host.value)
    # A waiter for the memory budget: a newcomer that would fit now still may not jump it.
    now = int(time.time() * 1000)
    ticket = limiter.enqueue(
        POOL, [slot("llama3", 1), budget(3, 2)], 10_000, wait_until_ms=now + 5_000
    )
    assert isinstance(ticket, Ticket)
    with pytest.raises(HostBusy, match="requests waiting"):
        limiter.acquire(POOL, [slot("tiny", 1), budget(3, 1)], 10_000)
    woken = threading.Event()
    limiter.notify(ticket, woken.set)  # e.g. loop.call_soon_threadsafe for an event loop
    assert limiter.release(held)  # handed over to the waiter, in the release's transaction
    assert woken.is_set()  # same process: no poll needed
    lease = limiter.poll(ticket)
    assert lease is not None and lease.granted
    with pytest.raises(ModelBusy, match="at capacity"):
        limiter.acquire(POOL, [slot("llama3", 1), budget(3, 1)], 10_000)
    limiter.release(lease)
    assert_clean(client_of(dynamodb), table)


def test_changed_limits_apply_to_the_next_admission_and_handoff(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    limiter = Limiter(client_of(dynamodb), table)
    first = limiter.acquire(POOL, [slot("gemma", 2)], 10_000)
    second = limiter.acquire(POOL, [slot("gemma", 2)], 10_000)
    # The limit goes down to 1 (a new models file): a waiter under the new limit is not handed
    # the slot its predecessor frees while another still runs.
    now = int(time.time() * 1000)
    ticket = limiter.enqueue(POOL, [slot("gemma", 1)], 10_000, wait_until_ms=now + 5_000)
    assert isinstance(ticket, Ticket)
    limiter.release(first)
    assert limiter.poll(ticket) is None
    limiter.release(second)
    lease = limiter.poll(ticket)
    assert lease is not None
    # Raised to 3: admitted at once next to the running one, no migration.
    extra = limiter.acquire(POOL, [slot("gemma", 3)], 10_000)
    limiter.release(extra)
    limiter.release(lease)
    assert_clean(client_of(dynamodb), table)


# -- order ----------------------------------------------------------------------------------


def serve_in_turn(limiter: Limiter, tickets: list[Ticket], held: Lease) -> list[str]:
    """Every ticket waits in its own thread; each holder releases 5 ms after it is admitted.
    Returns the ticket ids in the order they were admitted."""
    order: list[str] = []
    lock = threading.Lock()

    def waiter(ticket: Ticket) -> None:
        lease = limiter.wait(ticket)
        assert lease is not None, f"ticket {ticket.seq} timed out"
        with lock:
            order.append(ticket.ticket_id)
        time.sleep(0.005)
        limiter.release(lease)

    # Each waiter's failure (an assert included) is raised here, in the test's thread.
    waiters = [Background(waiter, t) for t in tickets]
    # The order is the queue's, whenever the threads start polling: no need to wait for them.
    limiter.release(held)
    results(waiters, timeout_s=60)
    return order


def test_waiters_are_admitted_in_ticket_order(dynamodb: DynamoDBLocal, table: str) -> None:
    """Given a full model, when 12 requests from 12 threads enqueue at the same moment,
    then they are admitted exactly in the order of their tickets (DynamoDB's atomic counter)."""
    limiter = Limiter(client_of(dynamodb), table)
    held = limiter.acquire(POOL, [slot()], 10_000)
    start = threading.Barrier(12)
    wait_until = int(time.time() * 1000) + 30_000

    def enqueue(_: int) -> Ticket:
        start.wait()
        got = limiter.enqueue(POOL, [slot()], 10_000, wait_until_ms=wait_until)
        assert isinstance(got, Ticket)
        return got

    with ThreadPoolExecutor(12) as pool:
        tickets = list(pool.map(enqueue, range(12)))
    admitted = serve_in_turn(limiter, tickets, held)
    by_ticket = [t.ticket_id for t in sorted(tickets, key=lambda t: t.seq)]
    seqs = {t.ticket_id: t.seq for t in tickets}
    print(f"\n  FIFO: seqs in admission order {[seqs[a] for a in admitted]}")
    assert admitted == by_ticket
    assert_clean(client_of(dynamodb), table)


def test_priority_goes_first_but_ages(dynamodb: DynamoDBLocal, table: str) -> None:
    """With aging of 2 tickets, a low request (rank 2) is ordered as if it came 4 tickets
    later: it is overtaken by the 3 requests that arrive within that, never by a later one."""
    limiter = Limiter(client_of(dynamodb), table, aging_tickets=2)
    held = limiter.acquire(POOL, [slot()], 10_000)
    wait_until = int(time.time() * 1000) + 30_000
    arrivals = ["low", "normal", "high", "high", "high", "high", "low"]
    tickets = []
    for priority in arrivals:
        got = limiter.enqueue(POOL, [slot()], 10_000, wait_until_ms=wait_until, priority=priority)
        assert isinstance(got, Ticket)
        tickets.append(got)
    admitted = serve_in_turn(limiter, tickets, held)
    names = {t.ticket_id: f"{t.priority}{t.seq}" for t in tickets}
    # keys (order, seq): low1 (5,1) normal2 (4,2) high3 (3,3) high4 (4,4) high5 (5,5)
    # high6 (6,6) low7 (11,7)
    assert [names[a] for a in admitted] == [
        "high3", "normal2", "high4", "low1", "high5", "high6", "low7",
    ]  # fmt: skip


# -- crashes, deadlines, giving up -----------------------------------------------------------


def test_a_crashed_holder_is_taken_over_at_expiry_and_never_before(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    clock = Clock()
    limiter = Limiter(client_of(dynamodb), table, clock=clock)
    crashed = limiter.acquire(POOL, [slot()], 1_000)  # its holder crashes: no release
    clock.advance(0.998)
    with pytest.raises(ModelBusy):
        limiter.acquire(POOL, [slot()], 1_000)
    assert limiter.usage([POOL]) == {POOL: {"inflight_gemma": 1}}
    # Its slot comes back when its expiry bucket ends: at most BUCKET_MS after its expiry.
    assert 0 <= crashed.bucket * BUCKET_MS - crashed.expires_at_ms < BUCKET_MS
    clock.now = crashed.bucket * BUCKET_MS / 1000 - 0.002
    with pytest.raises(ModelBusy):
        limiter.acquire(POOL, [slot()], 1_000)
    clock.advance(0.004)
    assert limiter.usage([POOL]) == {POOL: {}}  # status counts only unexpired buckets
    lease = limiter.acquire(POOL, [slot()], 1_000)
    assert limiter.release(lease)
    assert_clean(client_of(dynamodb), table)


def test_a_waiter_behind_a_crashed_holder_takes_over_by_itself(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    """Nobody releases: the waiter's own check sees the expired lease and runs a grant pass."""
    clock = Clock()
    limiter = Limiter(client_of(dynamodb), table, clock=clock)
    limiter.acquire(POOL, [slot()], 1_000)
    ticket = limiter.enqueue(POOL, [slot()], 5_000, wait_until_ms=clock.now_ms() + 10_000)
    assert isinstance(ticket, Ticket) and limiter.poll(ticket) is None
    clock.advance(1.0 + BUCKET_MS / 1000 + 0.01)  # the lease's bucket has ended
    lease = limiter.poll(ticket)
    assert lease is not None and lease.expires_at_ms == clock.now_ms() + 5_000
    assert limiter.release(lease)
    assert_clean(client_of(dynamodb), table)


def test_a_crashed_waiter_loses_its_place_at_its_deadline(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    clock = Clock()
    limiter = Limiter(client_of(dynamodb), table, clock=clock)
    held = limiter.acquire(POOL, [slot()], 60_000)
    crashed = limiter.enqueue(POOL, [slot()], 5_000, wait_until_ms=clock.now_ms() + 500)
    alive = limiter.enqueue(POOL, [slot()], 5_000, wait_until_ms=clock.now_ms() + 60_000)
    assert isinstance(crashed, Ticket) and isinstance(alive, Ticket)
    assert limiter.waiting(POOL) == 2
    clock.advance(0.6)
    limiter.release(held)  # the handoff drops the lapsed entry and serves the next one
    lease = limiter.poll(alive)
    assert lease is not None and limiter.waiting(POOL) == 0
    limiter.release(lease)
    assert_clean(client_of(dynamodb), table)


def test_a_waiter_that_gives_up_leaves_at_once_and_a_late_grant_is_returned(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    limiter = Limiter(client_of(dynamodb), table)
    held = limiter.acquire(POOL, [slot()], 60_000)
    now = int(time.time() * 1000)
    quitter = limiter.enqueue(POOL, [slot()], 5_000, wait_until_ms=now + 60_000)
    late = limiter.enqueue(POOL, [slot()], 5_000, wait_until_ms=now + 60_000)
    assert isinstance(quitter, Ticket) and isinstance(late, Ticket)
    assert limiter.abandon(quitter) is None and limiter.waiting(POOL) == 1
    limiter.release(held)  # handed to `late`, which gives up without having polled
    lease = limiter.abandon(late)
    assert lease is not None and lease.granted
    limiter.release(lease)
    assert_clean(client_of(dynamodb), table)


def test_a_waiter_times_out_when_its_deadline_passes(dynamodb: DynamoDBLocal, table: str) -> None:
    limiter = Limiter(client_of(dynamodb), table)
    held = limiter.acquire(POOL, [slot()], 60_000)
    ticket = limiter.enqueue(POOL, [slot()], 5_000, wait_until_ms=int(time.time() * 1000) + 200)
    assert isinstance(ticket, Ticket)
    assert limiter.wait(ticket) is None and limiter.waiting(POOL) == 0
    busy = limiter.busy(ticket, retry_after_s=3)  # what the service answers: 429 + Retry-After
    assert isinstance(busy, ModelBusy) and busy.retry_after == 3
    limiter.release(held)
    assert_clean(client_of(dynamodb), table)


def test_a_mass_crash_is_recovered_within_dynamodb_request_limits(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    """300 holders and 120 waiters die at once; after expiry one new request brings the pool
    back. Every request stays within DynamoDB's documented limits (4 KB expressions, 100
    items per transaction)."""
    clock = Clock()
    watch = ExpressionWatch()
    client = watch.watch(client_of(dynamodb))
    biggest = 0

    def count_items(params: dict[str, Any], **_: Any) -> None:
        nonlocal biggest
        biggest = max(biggest, len(params["TransactItems"]))

    client.meta.events.register("provide-client-params.dynamodb.TransactWriteItems", count_items)
    limiter = Limiter(client, table, clock=clock, light_calls=False)  # all watched
    counters = [slot("gemma", 300)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: persist(limiter.acquire, POOL, counters, 2_000), range(300)))
        list(
            pool.map(
                lambda _: persist(
                    limiter.enqueue, POOL, counters, 2_000, wait_until_ms=clock.now_ms() + 1_000
                ),
                range(120),
            )
        )
    clock.advance(2.0 + BUCKET_MS / 1000 + 0.01)  # every lease's bucket has ended
    assert limiter.usage([POOL]) == {POOL: {}}
    meter = Meter(client)
    lease = limiter.enqueue(POOL, counters, 2_000, wait_until_ms=clock.now_ms() + 5_000)
    lease = lease if isinstance(lease, Lease) else wait_by(limiter, lease, clock)
    assert lease is not None
    print(f"\n  mass crash: one newcomer recovered the pool with {dict(meter.ops())}")
    assert limiter.waiting(POOL) == 0 and limiter.usage([POOL]) == {POOL: {"inflight_gemma": 1}}
    print(f"\n  mass crash: largest transaction {biggest} items, {watch.checked} requests checked")
    assert watch.found == [] and biggest <= MAX_TRANSACT_ITEMS
    limiter.release(lease)


# -- DynamoDB faults ------------------------------------------------------------------------


def test_an_unreachable_table_fails_closed(table: str) -> None:
    client = boto3.client(
        "dynamodb",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 1}, connect_timeout=0.2, read_timeout=0.2),
    )
    limiter = Limiter(client, table)
    with pytest.raises(LimiterUnavailable):
        limiter.acquire(POOL, [slot()], 1_000)
    with pytest.raises(LimiterUnavailable):
        limiter.enqueue(POOL, [slot()], 1_000, wait_until_ms=int(time.time() * 1000) + 1_000)


class Faulty:
    """A DynamoDB client whose next writes (transactions and single-item updates) fail as
    told, then behave."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.faults: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def update_item(self, **kwargs: Any) -> Any:
        fault = self.faults.pop(0) if self.faults else None
        if fault == "conflict":  # a transaction holds the item
            error = {"Code": "TransactionConflictException"}
            raise ClientError({"Error": error}, "UpdateItem")
        answer = self._client.update_item(**kwargs)
        if fault == "lost":  # applied, but the answer never came back
            raise ReadTimeoutError(endpoint_url="http://dynamodb")
        return answer

    def transact_write_items(self, **kwargs: Any) -> Any:
        fault = self.faults.pop(0) if self.faults else None
        if fault == "conflict":
            reasons = [{"Code": "TransactionConflict"} for _ in kwargs["TransactItems"]]
            raise ClientError(
                {"Error": {"Code": "TransactionCanceledException"}, "CancellationReasons": reasons},
                "TransactWriteItems",
            )
        answer = self._client.transact_write_items(**kwargs)
        if fault == "lost":  # applied, but the answer never came back
            raise ReadTimeoutError(endpoint_url="http://dynamodb")
        return answer


def test_transaction_conflicts_are_retried_not_reported(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    """Real DynamoDB cancels concurrent transactions on one item (TransactionConflict);
    DynamoDB Local serializes them, so the conflicts are injected."""
    faulty = Faulty(client_of(dynamodb))
    limiter = Limiter(faulty, table)
    faulty.faults = ["conflict", "conflict"]
    lease = limiter.acquire(POOL, [slot()], 10_000)
    faulty.faults = ["conflict"]
    assert limiter.release(lease)
    assert_clean(client_of(dynamodb), table)


def test_a_lost_admission_is_withdrawn(dynamodb: DynamoDBLocal, table: str) -> None:
    faulty = Faulty(client_of(dynamodb))
    limiter = Limiter(faulty, table)
    faulty.faults = ["lost"]
    with pytest.raises(LimiterUnavailable):
        limiter.acquire(POOL, [slot()], 10_000)
    assert limiter.usage([POOL]) == {POOL: {}}
    assert_clean(client_of(dynamodb), table)


# -- cost -------------------------------------------------------------------------------------


def test_an_uncontended_request_is_two_dynamodb_requests(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    client = client_of(dynamodb)
    meter = Meter(client)
    limiter = Limiter(client, table, light_calls=False)  # every request counted
    lease = limiter.acquire(POOL, [slot("gemma", 2), budget(8, 2)], 10_000)
    assert limiter.release(lease)
    print(f"\n  uncontended: {dict(meter.ops())}")
    assert meter.ops() == {"UpdateItem": 2}


def size_of(item: dict[str, Any]) -> int:
    """item_size, plus string sets (the sum of their strings, one byte of overhead each)."""
    sets = {k: v for k, v in item.items() if "SS" in v}
    rest = {k: v for k, v in item.items() if k not in sets}
    return item_size(rest) + sum(len(k) + sum(len(x) + 1 for x in v["SS"]) for k, v in sets.items())


def documented_wcu(sizes: list[int], transaction: bool = True) -> int:
    """2 WCU per 1 KB (rounded up) of each item a TransactWriteItems writes; 1 WCU per 1 KB
    of the item an UpdateItem writes."""
    return sum((2 if transaction else 1) * math.ceil(max(size, 1) / 1024) for size in sizes)


def cost_at(db: ConflictingDynamoDB, table: str, live: int) -> dict[str, Any]:
    """With `live` leases held on a host of its own: what a direct admission, a queued one
    (enqueue, handoff in the holder's release, poll) and their releases cost, by request
    and by WCU, and the sizes of the items they write (a client of its own: its meter
    counts this size only)."""
    client = client_of(db)
    pool = f"host#live{live}"
    limiter = Limiter(client, table, notice_poller=False)  # every read counted here
    counters = [slot("gemma", live + 1), budget(10 * (live + 1), 2)]

    with ThreadPoolExecutor(4) as threads:
        list(
            threads.map(
                lambda _: persist(limiter.acquire, pool, counters, 600_000), range(live - 1)
            )
        )
    meter = Meter(client)

    direct = limiter.acquire(pool, counters, 600_000)
    admit_wcu, admit_ops = meter.units(WRITES), dict(meter.ops())
    meter.reset()
    assert limiter.release(direct)
    release_wcu = meter.units(WRITES)

    direct = limiter.acquire(pool, counters, 600_000)
    last = limiter.acquire(pool, counters, 600_000)  # now full: live + 1
    meter.reset()
    ticket = limiter.enqueue(
        pool, counters, 600_000, wait_until_ms=int(time.time() * 1000) + 60_000
    )
    assert isinstance(ticket, Ticket)
    enqueue_wcu, enqueue_ops = meter.units(WRITES), dict(meter.ops())
    meter.reset()
    assert limiter.release(last)  # hands the slot to the ticket
    handoff_wcu, handoff_ops = meter.units(WRITES), dict(meter.ops())
    meter.reset()
    granted = limiter.poll(ticket)
    assert granted is not None
    poll_ops = dict(meter.ops())

    state = client.get_item(TableName=table, Key={"pk": {"S": pool}, "sk": {"S": "state"}})["Item"]
    notice = client.get_item(
        TableName=table, Key={"pk": {"S": f"grant#{granted.lease_id}"}, "sk": {"S": "grant"}}
    )["Item"]
    sizes = {"state": size_of(state), "notice": size_of(notice)}
    meter.reset()
    assert limiter.release(granted)
    granted_release_wcu = meter.units(WRITES)
    limiter.release(direct)

    return {
        "live": live,
        "admit WCU": admit_wcu,
        "release WCU": release_wcu,
        "enqueue WCU": enqueue_wcu,
        "handoff WCU": handoff_wcu,
        "granted release WCU": granted_release_wcu,
        "sizes": sizes,
        "documented WCU admit": documented_wcu([sizes["state"]], transaction=False),
        "documented WCU handoff": documented_wcu([sizes["state"], 300, sizes["notice"]]),
        "admit ops": admit_ops,
        "enqueue ops": enqueue_ops,
        "handoff ops": handoff_ops,
        "poll ops": poll_ops,
    }


def test_the_cost_of_an_admission_grows_only_by_the_lease_ids_it_holds(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    """With 1, 100 and 1,000 leases held on one host (each size measured here, on a host of
    its own): a direct admission, a queued one (enqueue, handoff in the holder's release,
    poll) and their releases cost the same requests at every scale; the state item, which
    holds the live leases' ids, grows by at most 20 bytes a lease (WCU: one per KB of it),
    every other item stays under 1 KB."""
    costs = [cost_at(dynamodb, table, live) for live in (1, 100, 1000)]
    for figures in costs:
        live = figures["live"]
        print(f"\n  cost at {live} live leases: {figures}")
        assert figures["admit ops"] == {"UpdateItem": 1}, figures
        assert figures["sizes"]["notice"] < 1024, figures
        assert figures["sizes"]["state"] < 600 + 20 * (live + 2), figures
    for key in ("admit ops", "enqueue ops", "handoff ops", "poll ops"):
        assert [figures[key] for figures in costs] == [costs[0][key]] * len(costs), key


def test_a_waiter_writes_a_bounded_number_of_times_however_long_it_waits(
    dynamodb: DynamoDBLocal, table: str
) -> None:
    """A request waits 3 s behind a holder: its writes are the refused admission, its ticket
    and its queue entry; polling is reads. (Its release is one more, as for any request.)"""
    client = client_of(dynamodb)
    meter = Meter(client)
    limiter = Limiter(client, table, light_calls=False)  # every request counted
    held = limiter.acquire(POOL, [slot()], 60_000)
    result: dict[str, Any] = {}

    def waiter() -> None:
        started = time.monotonic()
        got = limiter.enqueue(
            POOL, [slot()], 60_000, wait_until_ms=int(time.time() * 1000) + 30_000
        )
        assert isinstance(got, Ticket)
        result["lease"] = limiter.wait(got)
        result["waited_s"] = time.monotonic() - started

    waiting = Background(waiter, name="waiter")  # its failures are raised by result()
    time.sleep(3.0)  # how long it waits: what is measured, not a synchronization
    limiter.release(held)
    waiting.result(timeout_s=30)
    writes, reads = meter.writes("waiter"), meter.reads("waiter")
    polls = meter.reads("hermes-notices")  # the process's notice poller, for every waiter
    print(
        f"\n  waiter: waited {result['waited_s']:.2f} s, writes {writes} "
        f"{dict(meter.ops('waiter'))}, reads {reads} ({reads / result['waited_s']:.0f}/s), "
        f"notice polls {polls} ({polls / result['waited_s']:.0f}/s)"
    )
    assert meter.writes("hermes-notices") == 0
    assert result["lease"] is not None
    assert writes <= 3 + WAITER_PASSES  # refused admission, ticket, entry (+ stall passes)
    assert writes == 3  # here the release handed the slot over: no pass of its own
    limiter.release(result["lease"])
