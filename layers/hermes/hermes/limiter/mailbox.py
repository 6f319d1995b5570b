"""This process's waiting tickets, and the one thread that polls their grant notices.

A waiter does not poll by itself: one poller thread per process reads the notices of all
waiting tickets in one BatchGetItem (up to 100 keys) per interval, and wakes each grantee
(its event, its callback). A grant made by this process reaches its local grantee at once,
with no read at all. So a process's polling costs one read per interval however many of
its requests wait, and a poll never queues behind slow admissions in a thread pool. The
interval follows the most urgent ticket: fast while one is next in line."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("hermes.limiter")


class Mailbox:
    def __init__(
        self,
        read_notices: Callable[[list[str]], dict[str, dict[str, Any]]],
        background: bool = True,
    ) -> None:
        """`background=False`: no poller thread; the waiters' `poll_once` calls read (for a
        store that is not thread-safe, such as moto in unit tests)."""
        self._read = read_notices
        self._background = background
        self._lock = threading.Condition()
        self._events: dict[str, threading.Event] = {}
        self._intervals: dict[str, float] = {}
        self._callbacks: dict[str, Callable[[], object]] = {}
        self._handed: dict[str, dict[str, Any]] = {}
        self._polled: dict[str, float] = {}  # ticket -> monotonic time of its last read
        self._ends: dict[str, float] = {}  # ticket -> monotonic time it is forgotten
        self._poller: threading.Thread | None = None

    def register(self, ticket_id: str, interval_s: float, for_s: float) -> None:
        """Poll `ticket_id` every `interval_s` for at most `for_s` (then it is forgotten:
        a waiter that vanished without giving up never leaves a ticket polled forever)."""
        with self._lock:
            self._events[ticket_id] = threading.Event()
            self._intervals[ticket_id] = interval_s
            self._ends[ticket_id] = time.monotonic() + for_s
            if self._background and (self._poller is None or not self._poller.is_alive()):
                self._poller = threading.Thread(
                    target=self._poll_forever, name="hermes-notices", daemon=True
                )
                self._poller.start()
            self._lock.notify()

    def pace(self, ticket_id: str, interval_s: float) -> None:
        """How often `ticket_id` wants its notice read (it moved nearer the head)."""
        with self._lock:
            if ticket_id in self._intervals:
                self._intervals[ticket_id] = interval_s

    def forget(self, ticket_id: str) -> None:
        with self._lock:
            self._events.pop(ticket_id, None)
            self._intervals.pop(ticket_id, None)
            self._callbacks.pop(ticket_id, None)
            self._handed.pop(ticket_id, None)
            self._polled.pop(ticket_id, None)
            self._ends.pop(ticket_id, None)

    def notify(self, ticket_id: str, callback: Callable[[], object]) -> None:
        with self._lock:
            self._callbacks[ticket_id] = callback
            if ticket_id in self._handed:
                callback()  # handed over before the caller asked to be told

    def hand(self, notices: dict[str, dict[str, Any]]) -> None:
        """Notices found by a poll, or written by this process: wake their tickets."""
        callbacks = []
        with self._lock:
            for ticket_id, notice in notices.items():
                event = self._events.get(ticket_id)
                if event is not None and ticket_id not in self._handed:
                    self._handed[ticket_id] = notice
                    self._intervals.pop(ticket_id, None)  # nothing more to read for it
                    event.set()
                    if ticket_id in self._callbacks:
                        callbacks.append(self._callbacks[ticket_id])
        for callback in callbacks:
            callback()

    def take(self, ticket_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._handed.get(ticket_id)

    def event(self, ticket_id: str) -> threading.Event | None:
        with self._lock:
            return self._events.get(ticket_id)

    def poll_once(self) -> None:
        """Read the notices of the tickets whose interval has gone by, and hand them."""
        with self._lock:
            now = time.monotonic()
            for ticket_id in [t for t, end in self._ends.items() if end < now]:
                for registry in (self._events, self._intervals, self._callbacks, self._handed):
                    registry.pop(ticket_id, None)
                self._polled.pop(ticket_id, None)
                self._ends.pop(ticket_id, None)
            due = [
                ticket_id
                for ticket_id, every in self._intervals.items()
                if now - self._polled.get(ticket_id, 0.0) >= every
            ]
            for ticket_id in due:
                self._polled[ticket_id] = now
        if due:
            self.hand(self._read(due))

    def _poll_forever(self) -> None:
        while True:
            with self._lock:
                while not self._intervals:
                    self._lock.wait()
            try:
                self.poll_once()
            except Exception as exc:  # retried next round; waiters' deadlines still hold
                log.warning("polling grant notices failed: %s", exc)
            with self._lock:
                now = time.monotonic()
                waits = [
                    self._polled.get(ticket_id, 0.0) + every - now
                    for ticket_id, every in self._intervals.items()
                ]
                if waits:  # a new ticket (register) cuts the pause short
                    self._lock.wait(max(0.0, min(waits)))

    @property
    def background(self) -> bool:
        return self._background
