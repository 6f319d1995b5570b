"""Section 3: DynamoDB requests per admitted request, counted with a botocore hook on an
in-process HermesService built like get_service(), on DynamoDB Local and the emulator."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass
from typing import Any

from bench import lease_cost
from bench.memory import MemoryLog
from bench.procs import Infra, build_service, dynamodb_client, muted_stdout, write_models_file
from bench.report import Section
from bench.scale import Scale

TARGET_UNCONTENDED = 3.0
TARGET_WAITING_WRITES = 7  # design: 3 while waiting, at most 3 + 3 own passes + 1 abandon
CONTENDED_DELAY_MS = 20
# llama3 as in models.json (one slot), plus the same model with bounded waiting.
MODELS = {
    "models": {
        "gemma": {"max_concurrency": 2, "memory_cost": "medium", "timeout": 30000,
                  "backend_model": "gemma3:1b"},
        "llama3": {"max_concurrency": 1, "memory_cost": "high", "timeout": 45000,
                   "backend_model": "llama3:8b"},
        "llama3_wait": {"max_concurrency": 1, "memory_cost": "high", "timeout": 45000,
                        "backend_model": "llama3:8b", "queue_timeout_ms": 5000},
        # One request that waits WAIT_S, on a host (a pool) of its own: the other runs have
        # not taught this limiter that the pool is busy, so its first admission is tried.
        "mistral_wait": {"max_concurrency": 1, "memory_cost": "low", "timeout": 30000,
                         "backend_model": "mistral:7b", "queue_timeout_ms": 20000,
                         "host": "waiting"},
    },
    "hosts": {"default": {"memory_budget": 8}, "waiting": {"memory_budget": 8}},
}  # fmt: skip
BODY = {"prompt": "hi"}


class CallCounter:
    """Counts the client's DynamoDB API calls by operation (botocore's before-call event),
    and apart the HTTP requests they sent (before-send), which include the SDK's retries."""

    def __init__(self, client: Any) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.sent = 0
        self._lock = threading.Lock()  # callers may run on several threads
        client.meta.events.register("before-call.dynamodb.*", self._count)
        client.meta.events.register("before-send.dynamodb.*", self._count_send)

    def _count(self, model: Any, **_: Any) -> None:
        with self._lock:
            self.calls[model.name] += 1

    def _count_send(self, **_: Any) -> None:  # returns None: botocore sends the request
        with self._lock:
            self.sent += 1

    def total(self) -> int:
        with self._lock:
            return sum(self.calls.values())

    def describe(self) -> str:
        """e.g. "400 UpdateItem; 400 HTTP requests": what the calls were, and any retries."""
        with self._lock:
            ops = ", ".join(f"{n} {op}" for op, n in sorted(self.calls.items()))
            return f"{ops}; {self.sent} HTTP requests"

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.sent = 0


@dataclass
class Tally:
    admitted: int = 0
    rejected: int = 0

    @property
    def attempts(self) -> int:
        return self.admitted + self.rejected


def uncontended(service: Any, counter: CallCounter, calls: int) -> float:
    """Sequential generate calls on gemma; returns DynamoDB requests per admitted request."""

    async def loop() -> None:
        for _ in range(5):  # warm-up: connections to DynamoDB Local and the emulator
            await service.generate("gemma", BODY)
        counter.reset()
        for _ in range(calls):
            await service.generate("gemma", BODY)

    asyncio.run(loop())
    return counter.total() / calls


def contended(service: Any, model: str, callers: int, seconds: float, pause_s: float) -> Tally:
    """`callers` concurrent callers calling generate on `model` until time is up; a rejected
    caller waits `pause_s` before its next attempt. They are asyncio tasks on one event
    loop: as threads they would mostly measure GIL contention (a caller holding the slot
    would wait for the GIL behind the others' botocore work, and hold the slot longer)."""
    from hermes.errors import HostBusy, ModelBusy

    tally = Tally()
    stop_at = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < stop_at:
            try:
                await service.generate(model, BODY)
            except (ModelBusy, HostBusy):
                tally.rejected += 1
                await asyncio.sleep(pause_s)
            else:
                tally.admitted += 1

    async def all_callers() -> None:
        await asyncio.gather(*(caller() for _ in range(callers)))

    asyncio.run(all_callers())
    return tally


def _contended_rows(section: Section, label: str, tally: Tally, counter: CallCounter) -> None:
    requests = counter.total()
    section.add(
        f"{label}: DynamoDB requests per admitted request",
        f"{requests / max(tally.admitted, 1):.2f}",
    )
    section.add(
        f"{label}: DynamoDB requests per attempt (admitted + rejected)",
        f"{requests / max(tally.attempts, 1):.2f} ({tally.admitted} admitted, "
        f"{tally.rejected} rejected; {counter.describe()})",
    )


def waiting_through_service(service: Any, counter: CallCounter, endpoint_url: str) -> float:
    """One generate call on mistral_wait while its only slot is held through another client
    (another instance) for lease_cost.WAIT_S; that holder's release hands the slot over.
    Every call of the service's client is made for this one request. Returns its wait."""
    from hermes.limiter import Limiter
    from hermes.service import host_pool

    config = service.model("mistral_wait")
    holder = Limiter(dynamodb_client(endpoint_url), service.settings.lease_table)
    held = holder.acquire(host_pool(config.host), service.counters("mistral_wait", config), 60_000)
    releaser = threading.Timer(lease_cost.WAIT_S, holder.release, args=(held,))
    counter.reset()
    started = time.monotonic()
    releaser.start()
    try:
        asyncio.run(service.generate("mistral_wait", BODY))
    finally:
        releaser.join()
    return time.monotonic() - started


def run(infra: Infra, scale: Scale, _: MemoryLog) -> Section:
    section = Section(3, "DynamoDB requests per admitted request")
    infra.dynamodb.reset_tables()
    emulator = infra.emulator
    emulator.reset()
    store = infra.strict_dynamodb  # as strict as DynamoDB: overlapping transactions cancelled
    ddb = dynamodb_client(store.url)
    counter = CallCounter(ddb)
    models_file = write_models_file(infra.tmp, "dynamodb-models.json", MODELS)
    service = build_service(ddb, models_file, emulator.url)

    with muted_stdout():
        per_admitted = uncontended(service, counter, scale.uncontended_calls)
    section.add(
        f"uncontended ({scale.uncontended_calls} sequential calls on gemma): requests per "
        "admitted request",
        f"{per_admitted:.2f} ({counter.describe()})",
        f"≤ {TARGET_UNCONTENDED:g} (expected 2)",
        per_admitted <= TARGET_UNCONTENDED,
    )

    emulator.set_behaviour("llama3:8b", "ok", delay_ms=CONTENDED_DELAY_MS)
    callers = scale.contended_callers
    counter.reset()
    with muted_stdout():
        tally = contended(service, "llama3", callers, scale.contended_s, CONTENDED_DELAY_MS / 1000)
    _contended_rows(section, "contended, queue_timeout_ms 0", tally, counter)
    counter.reset()
    with muted_stdout():
        tally = contended(service, "llama3_wait", callers, scale.contended_s, 0)
    _contended_rows(section, "contended, queue_timeout_ms 5000", tally, counter)

    with muted_stdout():
        took = waiting_through_service(service, counter, store.url)
    writes = sum(n for op, n in counter.calls.items() if op in lease_cost.WRITES)
    reads = sum(n for op, n in counter.calls.items() if op in lease_cost.READS)
    section.add(
        f"writes per waiting request through HermesService, {lease_cost.WAIT_S:g} s of waiting "
        "(the whole request, its release included)",
        f"{writes} ({counter.describe()}; answered after {took:.2f} s)",
        f"≤ {TARGET_WAITING_WRITES} + 1 (bounded, independent of the wait)",
        writes <= TARGET_WAITING_WRITES + 1,
    )
    section.add(
        f"reads per waiting request through HermesService, {lease_cost.WAIT_S:g} s of waiting",
        f"{reads} ({reads / took:.0f}/s)",
    )
    lease_cost.run(section, store.url)

    section.note(
        "Every DynamoDB API call of the service's boto3 client is counted with a botocore "
        "`before-call.dynamodb.*` hook (Hermes' own retries, such as admission rounds, count "
        "as calls); the HTTP requests beside it (`before-send`) also count the SDK's retries."
    )
    section.note(
        f"Contended: {callers} concurrent callers (asyncio tasks on one event loop) calling "
        f"llama3 (max_concurrency 1) for {scale.contended_s:g} s while the emulator takes "
        f"{CONTENDED_DELAY_MS} ms per answer. With queue_timeout_ms 0 a rejected caller gets "
        "ModelBusy (HTTP 429 model_busy) at once and tries again after "
        f"{CONTENDED_DELAY_MS} ms; with queue_timeout_ms 5000 (same model, another name) "
        "the request waits in the limiter's queue (a ticket and a queue entry, then reads "
        "until a release hands it the slot), so each attempt is one generate call however "
        "many requests it took."
    )
    section.note(
        "Waiting request through HermesService: mistral_wait (max_concurrency 1, "
        "queue_timeout_ms 20000); its only slot is taken through another client (another "
        f"instance), which releases it after {lease_cost.WAIT_S:g} s and so hands it over. "
        "Every call of the service's client during the generate call is counted: admission, "
        "waiting, and the release after the (instant) answer."
    )
    return section
