"""A clock a test moves by hand, for the limiter's `clock=`: leases, buckets and deadlines
then expire exactly when the test says, however loaded the machine is."""

from __future__ import annotations

import time


class Clock:
    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def now_ms(self) -> int:
        return int(self.now * 1000)
