"""Waiting for a state instead of sleeping for it: a test polls what it waits for and fails
naming it, so a slow machine takes longer but never changes the verdict."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(
    check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02
) -> Any:
    """`check()` until it returns something true, which is returned. AssertionError naming
    `what` if it has not within `timeout_s` (a bound generous enough for a loaded machine:
    it is how long a test may hang, not what it proves)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(interval_s)
