"""docs/limits.md's claims about waiting that need real threads: a waiting request whose
client leaves, on the service path (HermesService in this process, with its notice poller
and worker threads), and the notice poller's pace. Against DynamoDB Local, which is safe
under the concurrent requests those threads make."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from hermes.backends import client_for
from hermes.config import get_settings
from hermes.errors import ClientDisconnected, ModelBusy
from hermes.http import unless_client_leaves
from hermes.limiter import Counter, Lease, Limiter, Ticket
from hermes.placement import host_pool, model_counter
from hermes.service import HermesService
from local.dynamodb_local import DynamoDBLocal
from tests.support.dynamodb_meter import Meter
from tests.support.models_file import use_models
from tests.support.ollama_emulator import OllamaEmulator

POOL = host_pool("default")
# One slot, and a wait and a lease (the model's timeout, capped by the caller's deadline)
# far longer than any bound below: an entry or a lease that goes, goes because the request
# gave it up, never because it lapsed or expired.
MODELS = {
    "models": {
        "llama3": {
            "max_concurrency": 1,
            "memory_cost": "high",
            "timeout": 60_000,
            "backend_model": "llama3:8b",
            "queue_timeout_ms": 120_000,
        }
    },
    "hosts": {"default": {"memory_budget": 8}},
}
DEADLINE_S = 90.0
BOUND_S = 20.0  # how long a test waits for a state: a hang's limit, not what it proves


class Waiters(Limiter):
    """The limiter, noting the tickets whose waiter asked to be woken: from then on the
    request is in the service's wait loop (HermesService._wait)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting_tickets: list[Ticket] = []

    def notify(self, ticket: Ticket, callback: Callable[[], object]) -> None:
        super().notify(ticket, callback)
        self.waiting_tickets.append(ticket)


@pytest.fixture
def service(
    dynamodb_local: DynamoDBLocal,
    emulator: OllamaEmulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> HermesService:
    """The service as get_service builds it, on the session's DynamoDB Local and emulator."""
    dynamodb_local.reset_tables()
    emulator.reset()
    use_models(monkeypatch, tmp_path, MODELS)
    monkeypatch.setenv("OLLAMA_URL", emulator.url)
    settings = get_settings()
    backends = {
        host: client_for(config.kind, settings.host_url(host), config.token_parameter)
        for host, config in settings.hosts.items()
    }
    limiter = Waiters(dynamodb_local.client(), settings.lease_table)
    return HermesService(settings, limiter, backends)


def holding(service: HermesService) -> Lease:
    """The model's one slot, taken as another instance's request would."""
    config = service.model("llama3")
    return service.limiter.acquire(POOL, service.counters("llama3", config), 60_000)


def in_line(service: HermesService) -> bool:
    """Whether a request waits in the queue, in the service's wait loop."""
    assert isinstance(service.limiter, Waiters)
    return bool(service.limiter.waiting_tickets) and service.limiter.waiting(POOL) == 1


def in_flight(service: HermesService) -> int:
    return service.limiter.usage([POOL])[POOL].get(model_counter("llama3"), 0)


async def until(check: Callable[[], bool], what: str) -> None:
    """`check` (a blocking DynamoDB read, run off the loop) until true, else fail naming
    `what`; the loop keeps running meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND_S
    while not await asyncio.to_thread(check):
        if loop.time() > deadline:
            raise AssertionError(f"not within {BOUND_S:g} s: {what}")
        await asyncio.sleep(0.02)


def disconnecting() -> tuple[Request, asyncio.Event]:
    """A request whose client leaves when the event is set (http.disconnect, as uvicorn
    reports it; the body was read already)."""
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/api/generate", "headers": []}
    return Request(scope, receive), gone


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def test_a_waiter_whose_client_leaves_gives_its_place_up_at_once(
    service: HermesService, emulator: OllamaEmulator
) -> None:
    """docs/limits.md, "Waiting, first come first served": "A request that gives up, times
    out or loses its client removes its entry at once (1 write ...)" — not at its wait
    deadline (here 90 s away), and it never reaches the model."""

    async def scenario() -> None:
        # Given the model's one slot held, and a streamed request waiting for it
        holder = holding(service)
        request, gone = disconnecting()
        body = {"prompt": "hi", "stream": True}
        waiting = service.open_stream("llama3", "/api/generate", body, deadline_s=DEADLINE_S)
        work = asyncio.ensure_future(unless_client_leaves(request, waiting))
        await until(lambda: in_line(service), "the request waits in line")
        # When its client leaves
        gone.set()
        with pytest.raises(ClientDisconnected):
            await work
        # Then its queue entry goes, long before it would lapse
        await until(lambda: service.limiter.waiting(POOL) == 0, "the entry removed")
        # and the holder's release has nobody to hand over to: the slot is free
        assert service.limiter.release(holder) is True
        assert in_flight(service) == 0
        assert isinstance(holding(service), Lease)

    run(scenario)
    assert emulator.stats()["requests"].get("llama3:8b", 0) == 0


def test_a_lease_handed_to_a_waiter_whose_client_left_is_released(
    service: HermesService, emulator: OllamaEmulator
) -> None:
    """docs/limits.md, "Waiting, first come first served": a request that loses its client
    "removes its entry at once (1 write; a lease handed over meanwhile comes back and is
    released)" — the slot handed to it is not held for nobody until the lease expires
    (here after 90 s and more)."""

    async def scenario() -> None:
        # Given the model's one slot held, and a request waiting for it
        holder = holding(service)
        waiter = asyncio.ensure_future(
            service.generate("llama3", {"prompt": "hi"}, deadline_s=DEADLINE_S)
        )
        await until(lambda: in_line(service), "the request waits in line")
        # When its client leaves (what unless_client_leaves does: the task is cancelled) and,
        # before the waiter can act on it, the holder hands its slot over. (The release runs
        # on this thread: the waiter's task cannot run until it is done.)
        waiter.cancel()
        assert service.limiter.release(holder) is True
        assert (in_flight(service), service.limiter.waiting(POOL)) == (1, 0)  # handed over
        with pytest.raises(asyncio.CancelledError):
            await waiter
        # Then the lease handed to it comes back: the slot is free for the next request
        await until(lambda: in_flight(service) == 0, "the handed-over lease released")
        assert isinstance(holding(service), Lease)

    run(scenario)
    assert emulator.stats()["requests"].get("llama3:8b", 0) == 0


# -- the notice poller's pace --------------------------------------------------------------

SLOT = [Counter("inflight_a", 1, 1, ModelBusy, "model 'a'")]
WINDOW_S = 2.0


def notice_reads(limiter_client: Any, ticket_of: Callable[[Limiter], Ticket]) -> float:
    """Notice reads a second made by the poller thread of a process whose one waiting
    ticket is `ticket_of(limiter)`, over WINDOW_S after its first check."""
    meter = Meter(limiter_client)
    limiter = Limiter(limiter_client, "LeaseTable", light_calls=False)  # boto3: metered
    ticket = ticket_of(limiter)
    assert limiter.poll(ticket) is None  # its first check: its place, and so its pace
    meter.reset()
    started = time.monotonic()
    time.sleep(WINDOW_S)  # the window measured, not a synchronization
    reads = meter.ops("hermes-notices")["BatchGetItem"]
    elapsed = time.monotonic() - started
    limiter.abandon(ticket)
    return reads / elapsed


def test_the_notice_poller_reads_at_most_every_70_ms_next_in_line_and_250_ms_behind(
    dynamodb_local: DynamoDBLocal,
) -> None:
    """docs/limits.md, "Waiting, first come first served": "one thread per process reads
    the notices of all of its waiting requests in one `BatchGetItem`, every 70 ms for the
    next in line, 100 ms near the head, 250 ms behind it". (Upper bounds: a loaded machine
    may read less often, never more; the exact paces are tests/unit/test_documented_limits.)
    """
    dynamodb_local.reset_tables()
    others = Limiter(dynamodb_local.client(), "LeaseTable")  # another process
    holder = others.acquire("host#gpu", SLOT, 60_000)
    until = int(time.time() * 1000) + 60_000

    def waits(limiter: Limiter) -> Ticket:
        ticket = limiter.enqueue("host#gpu", SLOT, 60_000, wait_until_ms=until)
        assert isinstance(ticket, Ticket)
        return ticket

    # Next in line: at most one read per 70 ms
    next_in_line = notice_reads(dynamodb_local.client(), waits)
    assert 0 < next_in_line <= 1 / 0.07 + 1 / WINDOW_S, next_in_line
    # Behind 8 others: at most one read per 250 ms
    ahead = [waits(others) for _ in range(8)]
    behind = notice_reads(dynamodb_local.client(), waits)
    assert 0 < behind <= 1 / 0.25 + 1 / WINDOW_S, behind
    for ticket in ahead:
        others.abandon(ticket)
    others.release(holder)
