"""Scale (issue 12, item 5): one model with max_concurrency 1,000 on one host, 1,000
concurrent requests over three runners (Lambda instances) sharing one DynamoDB Local behind
the conflict-faithful store (overlapping transactions cancelled, as on real DynamoDB), the
answers held open by the Ollama emulator. The emulator runs in its own process (as Ollama
does) and counts what really reached the "GPU".

1. Admission at scale: 1,000 requests, answers held open, are all admitted together (the
   emulator sees 1,000 in flight, /v1/status says 1,000); more requests meanwhile get 429
   model_busy with Retry-After at once (queue_timeout_ms 0); the emulator never sees more.
2. Crash at scale: then every runner holding them is SIGKILLed (no release runs, as in a
   Lambda that timed out). A runner that never served them finds the capacity held (429
   model_busy) before the leases can expire, and is admitted again only after they have.
3. All capacity back: once every lease of phase 1 has expired (and its expiry bucket ended,
   at most one bucket later), three runners that never
   served phase 1 admit 1,000 concurrent requests again, and not one more; all 1,000 answer
   200 and /v1/status shows nothing in flight at the end.

Written against HTTP behaviour (no limiter internals; the lease table is read to know when
each crashed lease's expiry bucket ends, the moment its slot may come back), so it holds
for any limiter design. The model's timeout (hence its lease) has to outlast the admission
of all 1,000: with a shorter one the first holders time out and free their slots before the
last are admitted, and 1,000 are never held at once. DynamoDB Local grants a few dozen
admissions a second on one host (one hot partition): about 20 s here on two loaded cores,
40 s seen before. So the timeout is 120 s, room for a machine several times slower: the time
taken is printed, never asserted; what is asserted is structural (no request answered, so
none refused, before all 1,000 are in flight; exactly 1,000 leases in the lease table;
capacity back exactly when the crashed leases' buckets end).

The figures (time to admit all 1,000, admissions per second, wall times, peak in flight,
time for capacity to come back against the lease) print with `-s`:
.venv/bin/python -m pytest -q -s tests/integration/test_scale.py -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from hermes.limiter.records import BUCKET_MS, bucket_of, buckets_of
from local.dynamodb_local import DynamoDBLocal
from tests.support.conflict_store import ConflictingDynamoDB
from tests.support.emulator_process import EmulatorProcess
from tests.support.hermes_process import HermesProcess
from tests.support.lease_state import held_lease_ids, state_items

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

CAPACITY = 1000  # hermes.config.MAX_LEASES_PER_HOST, the most one host may hold
MODEL = "wide"
TAG = "gemma3:1b"  # its backend model, as the emulator counts it
# Room to admit 1,000 at ~8 a second: several times slower than two loaded cores (~25-50).
TIMEOUT_MS = 120_000
MARGIN_MS = 500
# A lease is the model's timeout + LeaseMarginMs + hermes.service.LEASE_SAFETY_MS (250 ms),
# from the runner's clock when it admits: until LEASE_S after a request was sent its lease
# cannot have expired.
LEASE_MS = TIMEOUT_MS + MARGIN_MS + 250
LEASE_S = LEASE_MS / 1000
OVERFLOW = 30  # requests sent beyond the capacity while it is full
MODELS = {
    "models": {
        MODEL: {
            "max_concurrency": CAPACITY,
            "memory_cost": "low",
            "timeout": TIMEOUT_MS,
            "backend_model": TAG,
            "queue_timeout_ms": 0,
        }
    },
    # Room for 2,000 leases of weight 1: the model's own limit is the one that binds.
    "hosts": {"default": {"memory_budget": 2 * CAPACITY}},
    "memory_weights": {"low": 1, "medium": 2, "high": 4},
}


@dataclass(frozen=True)
class Outcome:
    status: int | None  # None: no answer (the connection dropped: its runner died)
    code: str | None
    retry_after: str | None
    seconds: float
    error: str | None = None  # the answer's message, for the report of a failure


def outcome(response: httpx.Response, started: float) -> Outcome:
    failed = None if response.status_code == 200 else response.json()
    return Outcome(
        response.status_code,
        failed and failed.get("code"),
        response.headers.get("retry-after"),
        time.monotonic() - started,
        failed and failed.get("error"),
    )


class Burst:
    """`n` concurrent POST /v1/llm requests spread round-robin over `urls`, each on its own
    connection, sent from an event loop on a thread of its own (the test's thread watches
    the emulator meanwhile)."""

    def __init__(self, urls: Sequence[str], n: int, timeout_s: float = 120) -> None:
        self.urls, self.n, self.timeout_s = list(urls), n, timeout_s
        self.outcomes: list[Outcome] = []
        self.started_at = 0.0
        self.wall_s = 0.0
        self.error: BaseException | None = None  # what broke the burst itself, if anything
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # raised in the test's thread by join()
            self.error = exc

    def start(self) -> Burst:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        return self.started_at > 0 and not self._thread.is_alive()

    def join(self, timeout_s: float = 120) -> list[Outcome]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"{self.n} requests still running after {timeout_s} s"
        if self.error is not None:
            raise self.error
        return self.outcomes

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.n + 10, max_keepalive_connections=self.n + 10)
        async with httpx.AsyncClient(
            timeout=self.timeout_s, limits=limits, trust_env=False
        ) as client:
            await asyncio.gather(
                *(self._one(client, self.urls[i % len(self.urls)], i) for i in range(self.n))
            )
        self.wall_s = time.monotonic() - self.started_at

    async def _one(self, client: httpx.AsyncClient, url: str, i: int) -> None:
        """Its outcome joins `outcomes` as it comes (a failing wait shows what came back)."""
        started = time.monotonic()
        try:
            response = await client.post(f"{url}/v1/llm/{MODEL}", json={"prompt": f"hi {i}"})
            self.outcomes.append(outcome(response, started))
        except (httpx.TransportError, ValueError) as exc:  # no answer, or not JSON
            self.outcomes.append(Outcome(None, None, None, time.monotonic() - started, repr(exc)))


def tally(outcomes: Sequence[Outcome]) -> Counter[tuple[int | None, str | None]]:
    return Counter((o.status, o.code) for o in outcomes)


def errors(outcomes: Sequence[Outcome]) -> str:
    """The distinct failures, for an assertion's message."""
    return "; ".join(sorted({str(o.error)[:300] for o in outcomes if o.status != 200})[:5])


def emulator_in_flight(emulator: EmulatorProcess) -> int:
    return int(emulator.stats()["in_flight"].get(TAG, 0))


def wait_for_all_in_flight(emulator: EmulatorProcess, burst: Burst) -> float:
    """Seconds from the burst's start until the emulator holds all of it at once (printed,
    not bounded). No request of the burst may be answered before: the backend holds every
    admitted one, and capacity is free until all are in, so any answer is a refusal with
    capacity free (or an error), reported with the in-flight count and its text. The model's
    timeout is not a bound the test sets but what holding them all at once needs (after it
    the first holders are answered, which is reported the same way)."""
    deadline = burst.started_at + TIMEOUT_MS / 1000
    marks: dict[int, float] = {}
    while (seen := emulator_in_flight(emulator)) < burst.n:
        marks.setdefault(seen // 100 * 100, round(time.monotonic() - burst.started_at, 1))
        assert not burst.outcomes, (
            f"answered with {seen} of {burst.n} in flight, capacity {CAPACITY} (seconds to "
            f"reach each hundred: {marks}): {tally(burst.outcomes)}: {errors(burst.outcomes)}"
        )
        assert burst.error is None, f"the burst broke with {seen} in flight: {burst.error!r}"
        assert time.monotonic() < deadline, (
            f"only {seen} of {burst.n} in flight within the model's timeout of "
            f"{TIMEOUT_MS / 1000:g} s, none answered (seconds to reach each hundred: {marks})"
        )
        time.sleep(0.05)
    return time.monotonic() - burst.started_at


def bucket_ends_ms(client: Any) -> list[int]:
    """When each expiry bucket that holds a lease ends (epoch ms), as the lease table says:
    a slot comes back once its lease's bucket has ended (records.Bucket.expired)."""
    return sorted(
        bucket.end * BUCKET_MS
        for item in state_items(client)
        for bucket in buckets_of(item).values()
        if bucket.ids
    )


def post_once(runner: HermesProcess) -> Outcome:
    started = time.monotonic()
    response = httpx.post(
        f"{runner.url}/v1/llm/{MODEL}", json={"prompt": "probe"}, timeout=30, trust_env=False
    )
    return outcome(response, started)


def assert_full(runners: Sequence[HermesProcess]) -> None:
    """Capacity is exactly used up: every further request is refused at once."""
    overflow = Burst([r.url for r in runners], OVERFLOW, timeout_s=30).start().join()
    assert tally(overflow) == {(429, "model_busy"): OVERFLOW}, errors(overflow)
    assert all(o.retry_after is not None and int(o.retry_after) >= 1 for o in overflow)


def spread(outcomes: Sequence[Outcome]) -> str:
    seconds = sorted(o.seconds for o in outcomes)
    p99 = seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))]
    return (
        f"min {seconds[0]:.2f} s, p50 {statistics.median(seconds):.2f} s, "
        f"p99 {p99:.2f} s, max {seconds[-1]:.2f} s"
    )


@dataclass
class Fleet:
    emulator: EmulatorProcess
    table: Any  # a DynamoDB client of the lease table's store (DynamoDB Local itself)
    store: ConflictingDynamoDB
    doomed: list[HermesProcess]  # serve phase 1, then are SIGKILLed
    fresh: list[HermesProcess]  # never serve phase 1: one watches the crash, all serve phase 3


@pytest.fixture(scope="module")
def fleet(
    dynamodb_local: DynamoDBLocal,
    conflict_store: ConflictingDynamoDB,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    """Six runners on the conflict-faithful store (overlapping transactions cancelled, as on
    DynamoDB)."""
    models = tmp_path_factory.mktemp("scale") / "models.json"
    models.write_text(json.dumps(MODELS))
    dynamodb_local.reset_tables()
    conflict_store.reset()
    with ExitStack() as stack:
        emulator = stack.enter_context(EmulatorProcess())
        env = {
            "AWS_ENDPOINT_URL_DYNAMODB": conflict_store.url,
            "OLLAMA_URL": emulator.url,
            "HERMES_MODELS_FILE": str(models),
            "HERMES_LEASE_MARGIN_MS": str(MARGIN_MS),
        }
        # All started up front, from this thread (a runner dies with the thread that started
        # it), so that no start-up time falls inside the lease windows being measured.
        started = time.monotonic()
        runners = [stack.enter_context(HermesProcess(env)) for _ in range(6)]
        print(f"\n6 runners started in {time.monotonic() - started:.1f} s")
        yield Fleet(emulator, dynamodb_local.client(), conflict_store, runners[:3], runners[3:])


def test_1000_leases_on_one_host_across_three_runners_and_their_crash(fleet: Fleet) -> None:
    emulator, doomed, fresh = fleet.emulator, fleet.doomed, fleet.fresh
    watcher = fresh[0]
    test_started = time.monotonic()

    # Phase 1: 1,000 admitted together over three runners, not one more.
    emulator.reset()
    emulator.set_behaviour(TAG, "hang")  # held until their runners die
    fleet.store.reset()
    sent_ms = time.time() * 1000  # no lease of phase 1 was granted before this
    burst = Burst([r.url for r in doomed], CAPACITY).start()
    sent_at = burst.started_at
    admit_1 = wait_for_all_in_flight(emulator, burst)
    all_in_at = time.monotonic()  # every lease of phase 1 was granted before this
    all_in_ms = time.time() * 1000
    requests = sum(fleet.store.calls.values())
    conflicts = sum(fleet.store.conflicts.values())
    held = watcher.in_flight(MODEL)
    leases = held_lease_ids(fleet.table)
    ends = bucket_ends_ms(fleet.table)
    assert_full(doomed + fresh)
    stats = emulator.stats()
    assert (held, stats["peak_in_flight"][TAG], stats["requests"][TAG]) == (CAPACITY,) * 3
    # Exactly the 1,000 leases in the lease table (no leak, none lost), each for the whole
    # lease from the request, each bucket ending at most one bucket after the lease.
    assert (len(leases), len(set(leases))) == (CAPACITY, CAPACITY)
    # An admission is one conditional write to the host's state item (1.0 a request here):
    # twice that would be retries or reads on the hot item, whatever the machine's speed.
    assert requests <= 2 * CAPACITY, dict(fleet.store.calls)
    bucket_ms = bucket_of(1, LEASE_MS) * BUCKET_MS
    assert sent_ms + LEASE_MS <= ends[0] and ends[-1] <= all_in_ms + LEASE_MS + bucket_ms, (
        sent_ms,
        all_in_ms,
        ends,
    )
    print(
        f"phase 1: all {CAPACITY} in flight {admit_1:.1f} s after the first was sent "
        f"({CAPACITY / admit_1:.0f} admissions/s over 3 runners; {requests} DynamoDB "
        f"requests, {conflicts} conflicts); /v1/status said {held}; "
        f"{OVERFLOW} more got 429 model_busy; peak in flight {stats['peak_in_flight'][TAG]}"
    )

    # Phase 2: every runner holding them SIGKILLed mid-flight.
    for runner in doomed:
        runner.kill()
    killed_at = time.monotonic()
    emulator.set_behaviour(TAG, "ok")
    outcomes = burst.join()
    assert tally(outcomes) == {(None, None): CAPACITY}  # none answered: their runners died

    held = watcher.in_flight(MODEL)
    busy = post_once(watcher)
    busy_at = time.monotonic()
    assert time.time() * 1000 < ends[0], "too slow to tell held capacity from expired leases"
    assert (busy.status, busy.code) == (429, "model_busy"), busy.error
    assert busy.retry_after is not None
    assert held == CAPACITY
    probes = 0
    while True:
        probe_sent_ms = time.time() * 1000
        probe = post_once(watcher)
        if probe.status == 200:
            break
        assert (probe.status, probe.code) == (429, "model_busy"), probe.error
        # Once the first crashed lease's bucket has ended, the next request takes its slot.
        assert probe_sent_ms <= ends[0], (
            f"refused {(probe_sent_ms - ends[0]) / 1000:.2f} s after the first crashed "
            f"lease's bucket ended: {probe.error}"
        )
        assert time.monotonic() - all_in_at < LEASE_S + 60, "capacity never came back"
        probes += 1
        time.sleep(0.25)
    first_back = time.monotonic() - sent_at
    # Never early: not within the lease of the first request, nor before its bucket ended.
    assert first_back >= LEASE_S, "a lease was taken over before it expired"
    assert time.time() * 1000 > ends[0], "a slot came back before its lease's bucket ended"
    print(
        f"phase 2: SIGKILL of the 3 runners took {killed_at - all_in_at:.2f} s; then "
        f"/v1/status said {held} in flight and a new request got 429 model_busy "
        f"{busy_at - sent_at:.1f} s after the first lease was asked for; the first slot came "
        f"back {first_back:.1f} s after it (lease {LEASE_S:g} s; {probes} refused probes "
        f"before), {time.monotonic() - all_in_at:.1f} s after the last was granted"
    )

    # Phase 3: once the last lease of phase 1 has expired and its expiry bucket ended (at
    # most one bucket later: asserted above), all 1,000 slots are back.
    time.sleep(max(0.0, (ends[-1] - time.time() * 1000) / 1000 + 0.01))
    emulator.reset()
    emulator.set_behaviour(TAG, "hold")  # until released below
    burst = Burst([r.url for r in fresh], CAPACITY).start()
    admit_3 = wait_for_all_in_flight(emulator, burst)
    back_after = time.monotonic() - all_in_at
    held = watcher.in_flight(MODEL)
    assert_full(fresh)
    assert emulator.release() == CAPACITY
    outcomes = burst.join()
    assert tally(outcomes) == {(200, None): CAPACITY}, errors(outcomes)
    stats = emulator.stats()
    assert (held, stats["peak_in_flight"][TAG], stats["requests"][TAG]) == (CAPACITY,) * 3
    assert watcher.in_flight(MODEL) == 0
    print(
        f"phase 3: all {CAPACITY} in flight again {admit_3:.1f} s after the first was sent "
        f"({CAPACITY / admit_3:.0f} admissions/s), {back_after:.1f} s after the crashed "
        f"leases were all granted (lease {LEASE_S:g} s); {OVERFLOW} more got 429 model_busy; "
        f"peak in flight {stats['peak_in_flight'][TAG]}; all {CAPACITY} answered 200, burst "
        f"wall {burst.wall_s:.1f} s, request wall {spread(outcomes)}"
    )
    print(f"test body: {time.monotonic() - test_started:.1f} s")
