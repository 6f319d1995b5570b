"""Section 3, limiter level: the DynamoDB capacity one admitted request costs with 1, 100 and
1,000 live leases on one host, and what one request writes and reads while it waits 5 s.

Both drive `hermes.limiter.Limiter` directly on a table of their own, made from the limiter's
own `lease_table_definition`, in DynamoDB Local. Requests and the capacity
they consumed are counted by tests/support/dynamodb_meter.Meter; item sizes follow
DynamoDB's rules (tests/support/dynamodb_limits.item_size)."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import Counter as Tally
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.report import Section
from tests.support.dynamodb_limits import item_size
from tests.support.dynamodb_meter import READS, WRITES, Meter

LIVE = (1, 100, 1000)
PAIRS = 10  # measured acquire + release pairs per scale (the figure is their mean)
LEASE_MS = 600_000  # held leases must outlive the whole measurement
WAIT_S = 5.0
KB = 1024


def update_wcu(size: int) -> int:
    """DynamoDB's documented cost of an UpdateItem: 1 WCU per KB (rounded up) of the item
    (the larger of the item before and after)."""
    return math.ceil(max(size, 1) / KB)


def limiter_api() -> Any:
    """hermes.limiter as a module: Limiter, Counter, Ticket, lease_table_definition."""
    import hermes.limiter as limiter

    return limiter


def counters(api: Any, slots: int) -> list[Any]:
    """A model's slot and its weight on the host's memory budget, as the service takes them."""
    from hermes.errors import HostBusy, ModelBusy

    return [
        api.Counter("inflight_bench", slots, 1, ModelBusy, "model 'bench'"),
        api.Counter("memory", 2 * slots, 2, HostBusy, "the memory budget of host 'bench'"),
    ]


@dataclass(frozen=True)
class Cost:
    live: int
    acquire_wcu: float  # reported by DynamoDB Local, mean per call
    release_wcu: float
    acquire_ops: str
    release_ops: str
    sizes: dict[str, int]  # state item (largest seen)

    @property
    def measured(self) -> float:
        return self.acquire_wcu + self.release_wcu

    @property
    def documented(self) -> int:
        # Admission and release: one UpdateItem of the state item each.
        return 2 * update_wcu(self.sizes["state"])


def _get(client: Any, table: str, pk: str, sk: str) -> dict[str, Any]:
    answer = client.get_item(
        TableName=table, Key={"pk": {"S": pk}, "sk": {"S": sk}}, ConsistentRead=True
    )
    return dict(answer.get("Item") or {})


def metered(api: Any, client: Any, table: str) -> Any:
    """A limiter whose every request the Meter sees: boto3's, with no light client."""
    try:
        return api.Limiter(client, table, light_calls=False)
    except TypeError:  # a limiter from before the light client: boto3 only anyway
        return api.Limiter(client, table)


def cost_at(api: Any, make_client: Any, table: str, live: int) -> Cost:
    """Hold `live` leases on one pool, then measure PAIRS acquire + release pairs more."""
    pool = f"host#bench-{live}"
    wanted = counters(api, live + 1)
    holder = api.Limiter(make_client(), table)
    with ThreadPoolExecutor(4) as workers:  # never released: they expire long after the run
        list(workers.map(lambda _: holder.acquire(pool, wanted, LEASE_MS), range(live)))
    reader = make_client()  # unmetered: item sizes
    client = make_client()
    meter = Meter(client)
    limiter = metered(api, client, table)
    acquire_wcu = release_wcu = 0.0
    acquire_ops: Tally[str] = Tally()
    release_ops: Tally[str] = Tally()
    state_size = 0
    for _ in range(PAIRS):
        state_size = max(state_size, item_size(_get(reader, table, pool, "state")))
        meter.reset()
        lease = limiter.acquire(pool, wanted, LEASE_MS)
        acquire_wcu += meter.units(WRITES)
        acquire_ops += meter.ops()
        state_size = max(state_size, item_size(_get(reader, table, pool, "state")))
        meter.reset()
        if not limiter.release(lease):
            raise RuntimeError(f"the release of a lease held for a moment failed ({pool})")
        release_wcu += meter.units(WRITES)
        release_ops += meter.ops()
    return Cost(
        live,
        acquire_wcu / PAIRS,
        release_wcu / PAIRS,
        _per_call(acquire_ops),
        _per_call(release_ops),
        {"state": state_size},
    )


def _per_call(ops: Tally[str]) -> str:
    return ", ".join(f"{n / PAIRS:g} {op}" for op, n in sorted(ops.items()))


@dataclass(frozen=True)
class Waiting:
    waited_s: float
    writes: Tally[str]  # until the lease was handed over
    reads: Tally[str]
    release: Tally[str]  # its own release afterwards, every call


def waiting_request(api: Any, make_client: Any, table: str) -> Waiting:
    """One request waits WAIT_S behind the only slot, held through another client (another
    Lambda instance), whose release hands the slot over. Every call of the waiter's own
    client is made on the waiting request's behalf."""
    pool = "host#bench-wait"
    wanted = counters(api, 1)
    holder = api.Limiter(make_client(), table)
    client = make_client()
    meter = Meter(client)
    waiter = metered(api, client, table)
    held = holder.acquire(pool, wanted, LEASE_MS)
    found: dict[str, Any] = {}

    def wait() -> None:
        started = time.monotonic()
        got = waiter.enqueue(
            pool, wanted, LEASE_MS, wait_until_ms=int(time.time() * 1000) + int(WAIT_S * 4000)
        )
        lease = got if not isinstance(got, api.Ticket) else waiter.wait(got)
        found["waited_s"] = time.monotonic() - started
        found["lease"] = lease

    thread = threading.Thread(target=wait, name="bench-waiter")
    thread.start()
    time.sleep(WAIT_S)
    holder.release(held)
    thread.join(30)
    if found.get("lease") is None:
        raise RuntimeError("the waiting request was not handed the slot")
    ops = meter.ops()
    meter.reset()
    waiter.release(found["lease"])
    return Waiting(
        found["waited_s"],
        Tally({op: n for op, n in ops.items() if op in WRITES}),
        Tally({op: n for op, n in ops.items() if op in READS}),
        meter.ops(),
    )


def _describe(ops: Tally[str]) -> str:
    return ", ".join(f"{n} {op}" for op, n in sorted(ops.items())) or "none"


def run(section: Section, endpoint_url: str) -> None:
    """Add the rows of both measurements to `section` (section 3)."""
    from bench.procs import dynamodb_client

    api = limiter_api()

    def make_client() -> Any:
        return dynamodb_client(endpoint_url)

    table = f"BenchLeaseCost-{uuid.uuid4().hex[:6]}"
    make_client().create_table(**api.lease_table_definition(table))
    # DynamoDB Local's JVM answers its first few hundred requests slowly: warm it up.
    warm = api.Limiter(make_client(), table)
    for _ in range(100):
        warm.release(warm.acquire("host#bench-warm", counters(api, 1), LEASE_MS))

    print(f"  holding {', '.join(map(str, LIVE))} leases on one host each", flush=True)
    costs = [cost_at(api, make_client, table, live) for live in LIVE]
    for cost in costs:
        leases = f"{cost.live:,} live lease" + ("s" if cost.live != 1 else "")
        per_lease = cost.sizes["state"] / (cost.live + 1)
        section.add(
            f"WCU per admitted request at {leases} on one host, DynamoDB Local / documented",
            f"{cost.measured:g} ({cost.acquire_wcu:g} + {cost.release_wcu:g}) / "
            f"{cost.documented} (acquire + release: {cost.acquire_ops} + {cost.release_ops}; "
            f"state item {cost.sizes['state']:,} B)",
            "one UpdateItem each; 1 WCU per KB of the state item (≤ 20 B a live lease beyond 1 KB)",
            cost.acquire_ops == cost.release_ops == "1 UpdateItem"
            and (cost.sizes["state"] <= KB or per_lease <= 20),
        )
    section.note(
        f"WCU: for each of {', '.join(f'{n:,}' for n in LIVE)} live leases, that many leases "
        "are taken on one pool with `Limiter.acquire` (a model slot with capacity N + 1 and a "
        f"memory budget, as the service takes them) and held; then {PAIRS} more acquire + "
        "release pairs are measured with `ReturnConsumedCapacity=TOTAL` on every request, and "
        "the table shows their mean. Documented = DynamoDB's price for UpdateItem, 1 WCU per "
        "KB (rounded up) of the item: admission and release are one conditional UpdateItem "
        "of the host's state item each, which holds the live leases' ids (16 characters each) "
        "in their expiry buckets, so 2 x ceil(state/1 KB); the state item's size by "
        "DynamoDB's documented rules, read back after each write. The cost grows by 1 WCU per "
        "~60 live leases on one host: 2 WCU per request up to ~50, 32 at 1,000 (the price of "
        "single-item writes, which no transaction cancels: docs/design/conflicts.md)."
    )

    wait = waiting_request(api, make_client, table)
    writes = sum(wait.writes.values())
    reads = sum(wait.reads.values())
    released = sum(n for op, n in wait.release.items() if op in WRITES)
    section.add(
        f"writes per waiting request, {WAIT_S:g} s of waiting (until the slot is handed over)",
        f"{writes} ({_describe(wait.writes)}); then its release: {released} "
        f"({_describe(wait.release)})",
        "bounded, independent of the wait (design: 3, at most 7)",
        writes <= 7,
    )
    section.add(
        f"reads per waiting request, {WAIT_S:g} s of waiting",
        f"{reads} in {wait.waited_s:.2f} s, {reads / wait.waited_s:.0f}/s "
        f"({_describe(wait.reads)})",
    )
    section.note(
        f"Waiting: the only slot of a pool is held through one client (one Lambda instance); "
        f"a request on another client calls `Limiter.enqueue` (wait_until {WAIT_S * 4:g} s "
        f"ahead) and `Limiter.wait`; after {WAIT_S:g} s the holder releases, which hands the "
        "slot over in one transaction (the state item, the waiter's entry and its notice). "
        "Every call of the waiter's client until it has the "
        "lease is counted (it serves that one request); its release afterwards is shown apart "
        "(writes, and in brackets every call it made: a release that saw waiters within the "
        "last second looks for a waiter to hand its slot to). "
        "Writes are TransactWriteItems, UpdateItem, PutItem, DeleteItem (BatchWriteItem); "
        "reads GetItem, BatchGetItem, Query."
    )
