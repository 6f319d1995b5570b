"""Sketch: HermesService.admit on FairLimiter (to replace the backoff loop in service.py).

Not imported by anything; it shows the exact calls. Everything after the lease is granted
(run_s from the lease as granted, cut_by, the give-back when too little is left, metrics) is
today's code, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from typing import Any, Literal

from fair_limiter import Lease, Ticket
from hermes.errors import LimiterUnavailable

# (in service.py: LEASE_SAFETY_MS, MIN_RUN_S, LEASE_SHORTFALL_S, host_pool, Admission ... as today)


class HermesServiceAdmit:  # the methods below go into HermesService
    settings: Any
    limiter: Any

    async def admit(
        self, name: str, config: Any, deadline: float | None, priority: str = "normal"
    ) -> Any:
        """Take a lease at once, or a place in the host's queue (FIFO by ticket, priority with
        aging) and wait there up to queue_timeout_ms, never past `deadline` (monotonic)."""
        pool, counters = host_pool(config.host), self.counters(name, config)  # noqa: F821
        asked_at = time.monotonic()
        reserve_ms = self.settings.lease_margin_ms + LEASE_SAFETY_MS  # noqa: F821
        wanted_s = config.timeout / 1000
        if deadline is not None:
            wanted_s = max(0.001, min(wanted_s, deadline - asked_at))
        lease_ms = math.ceil(wanted_s * 1000) + reserve_ms
        wait_s = config.queue_timeout_ms / 1000
        if deadline is not None:
            wait_s = min(wait_s, deadline - asked_at)
        retry_after = self.settings.retry_after_s

        if wait_s <= 0:
            # queue_timeout_ms 0: admitted now or 429 model_busy/host_busy at once (it never
            # jumps waiters: a counter somebody waits for answers busy too).
            lease = await self._blocking(
                self.limiter.acquire, pool, counters, lease_ms, retry_after
            )
        else:
            now_ms = int(time.time() * 1000)
            got = await self._blocking(
                functools.partial(
                    self.limiter.enqueue,
                    pool,
                    counters,
                    # A grant comes later: it gives the model's whole timeout, capped by the
                    # caller's deadline (run_until_ms), both plus the reserve.
                    config.timeout + reserve_ms,
                    wait_until_ms=now_ms + int(wait_s * 1000),
                    run_until_ms=(
                        now_ms + int((deadline - asked_at) * 1000) + reserve_ms
                        if deadline is not None
                        else 0
                    ),
                    priority=priority,
                )
            )
            lease = got if isinstance(got, Lease) else await self._wait(got, asked_at + wait_s)

        # -- from here on, today's code: run time from the lease as granted ---------------------
        granted_at = time.monotonic()
        lease_s = self.limiter.time_left(lease) - reserve_ms / 1000
        limits = {"model": config.timeout / 1000, "lease": lease_s}
        if deadline is not None:
            limits["deadline"] = deadline - granted_at
        run_s = min(limits.values())
        cut_by: Literal["model", "deadline", "lease"] = (
            "deadline" if limits.get("deadline", math.inf) < limits["model"] else "model"
        )
        if lease_s < limits[cut_by] - LEASE_SHORTFALL_S:  # noqa: F821
            cut_by = "lease"
        if run_s <= 0 or (cut_by == "lease" and run_s < MIN_RUN_S):  # noqa: F821
            await self._release(lease)
            if cut_by == "deadline":
                raise self._timeout(name, config, 0.0, "deadline")
            raise LimiterUnavailable(
                f"the lease table took {time.monotonic() - asked_at:.1f} s to grant a slot of "
                f"model '{name}', which left no time to run it; the slot was given back, "
                "retry later",
                retry_after=retry_after,
            )
        # lease.counts is empty for direct admissions (a transaction returns no values):
        # report InFlight from it when present, else leave the metric to /v1/status.
        return Admission(lease, run_s, granted_at, cut_by)  # noqa: F821

    async def _wait(self, ticket: Ticket, wait_until: float) -> Lease:
        """Poll the ticket (reads only) until a lease is handed over, or give the place up at
        `wait_until` and answer 429. A cancelled request (client gone) gives its place up too,
        and releases a lease handed over meanwhile."""
        loop = asyncio.get_running_loop()
        handed = asyncio.Event()
        self.limiter.notify(ticket, lambda: loop.call_soon_threadsafe(handed.set))
        try:
            while True:
                lease = await self._blocking(self.limiter.poll, ticket)
                if lease is not None:
                    return lease
                if time.monotonic() + ticket.poll_after_s >= wait_until:
                    lease = await self._blocking(self.limiter.abandon, ticket)
                    if lease is not None:
                        return lease  # granted at the last moment: the run-time check decides
                    raise self.limiter.busy(ticket, self.settings.retry_after_s)
                handed.clear()
                # A handoff by this process wakes us at once; others are seen by the next poll.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(handed.wait(), ticket.poll_after_s)
        except asyncio.CancelledError:
            loop.run_in_executor(None, self._give_up, ticket)
            raise

    def _give_up(self, got: Lease | Ticket | None) -> None:
        """In a worker thread: whatever a cancelled request holds goes back."""
        if isinstance(got, Ticket):
            got = self.limiter.abandon(got)  # a lease handed over meanwhile comes back here
        if isinstance(got, Lease):
            self.limiter.release(got)

    async def _blocking(self, call: Any, *args: Any) -> Any:
        """A limiter call off the event loop, shielded as today's _acquire is: if the caller is
        cancelled meanwhile, the lease or place the call still obtains is given back."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, functools.partial(call, *args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The callback runs on the loop: the blocking give-back goes to a worker thread.
            future.add_done_callback(
                lambda f: (
                    None
                    if f.cancelled() or f.exception()
                    else loop.run_in_executor(None, self._give_up, f.result())
                )
            )
            raise
