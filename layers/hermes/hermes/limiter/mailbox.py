"""This process's waiting tickets.

One BatchGetItem polls the notices of all of them (so a process with many waiters reads at
most once per poll interval), and a grant made by this process reaches its local grantee at
once, with no read at all."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

# BatchGetItem takes at most 100 keys per call.
POLL_BATCH = 100


class Mailbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._callbacks: dict[str, Callable[[], object]] = {}
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

    def notify(self, ticket_id: str, callback: Callable[[], object]) -> None:
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

    def poll_due(self, every_s: float) -> bool:
        return time.monotonic() - self._polled_at >= every_s

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
