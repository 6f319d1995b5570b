"""Which priority a request was admitted with, seen from the outside: where the queue put it.

A request's priority is an order in the queue of its host (records.PRIORITIES): a request
that waits goes ahead of earlier waiters of a lower priority, and behind earlier ones of the
same or a higher one. So, with the model's one slot held and one rival queued first (another
instance's waiter), the slot that frees while the request waits goes to the request only if
its priority is above the rival's: ahead of a `normal` rival means `high`; ahead of a `low`
one (and not of a `normal` one) means `normal`; ahead of neither, `low`.

The slot frees from the waiter's own thread, just before its first poll of its ticket (the
limiter's `poll`, wrapped for the probe): the request is then certainly queued, and no second
thread writes to moto (which is not thread-safe). Whoever the freed slot went to, the request
is served in the end (the rival's grant is released at once and passes on to it), so every
probe answers as a lone request would. The model must allow one call at a time and let its
requests wait (max_concurrency 1, queue_timeout_ms long enough for a loaded machine): see
`probe_models`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hermes.limiter import Lease, Ticket
from hermes.service import get_service, host_pool
from tests.support.lambda_calls import hold
from tests.support.models_file import use_shipped_models

QUEUE_TIMEOUT_MS = 30_000  # never reached: the probe frees the slot on the first poll


def probe_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *models: str) -> None:
    """The shipped models file with `models` allowing one call at a time, whose requests
    wait for it."""
    changes = {"max_concurrency": 1, "queue_timeout_ms": QUEUE_TIMEOUT_MS}
    use_shipped_models(tmp_path, monkeypatch, budget=8, **dict.fromkeys(models, changes))


def served_before(
    monkeypatch: pytest.MonkeyPatch, model: str, rival: str, send: Callable[[], Any]
) -> bool:
    """Whether the request `send()` makes for `model` (it must be served) got the model's
    freed slot ahead of a waiter of priority `rival` queued before it."""
    service = get_service()
    config = service.model(model)
    pool = host_pool(config.host)
    held = [hold(service, model)]
    now_ms = int(time.time() * 1000)
    ticket = service.limiter.enqueue(
        pool,
        service.counters(model, config),
        60_000,
        wait_until_ms=now_ms + QUEUE_TIMEOUT_MS,
        priority=rival,
    )
    assert isinstance(ticket, Ticket), "the rival must wait: the model's slot is held"
    first: list[str] = []  # who the freed slot went to
    poll = service.limiter.poll

    def poll_after_the_release(waiting: Ticket) -> Lease | None:
        if waiting.ticket_id == ticket.ticket_id:
            return poll(waiting)
        if held:
            service.limiter.release(held.pop())  # the slot frees while the request waits
        lease = poll(waiting)
        if not first:
            if lease is not None:
                first.append("request")
            else:
                granted = poll(ticket)
                if granted is not None:
                    first.append("rival")
                    service.limiter.release(granted)  # passed on to the request, next in line
        return lease

    with monkeypatch.context() as patch:
        patch.setattr(service.limiter, "poll", poll_after_the_release)
        try:
            send()
        finally:
            if first != ["rival"]:  # still waiting, or granted after the request was done
                granted = service.limiter.abandon(ticket)
                if granted is not None:
                    service.limiter.release(granted)
    assert not held, "the request never waited for the held slot"
    assert first, "the freed slot went to nobody"
    return first == ["request"]


def admitted_priority(monkeypatch: pytest.MonkeyPatch, model: str, send: Callable[[], Any]) -> str:
    """The priority `send()`'s request for `model` was admitted with, by where the queue put
    it: one or two requests are sent (each must be served)."""
    if served_before(monkeypatch, model, "normal", send):
        return "high"
    if served_before(monkeypatch, model, "low", send):
        return "normal"
    return "low"
