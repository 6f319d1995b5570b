"""The service layer: Hermes' rules, independent of how a request arrived.

generate = look the model up → validate → admit (limiter) → call the backend with
the model's deadline → release in `finally`. Every failure leaves as a HermesError.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, TypeVar

from hermes import observability
from hermes.aws import client
from hermes.backends import OllamaClient, client_for
from hermes.bounds import check_request
from hermes.callers import (
    CALLER,
    CallerConfig,
    caller_pool,
    limits_for,
    prompt_tokens_bound,
    used_tokens,
    with_output_cap,
)
from hermes.config import ModelConfig, Settings, get_settings
from hermes.errors import (
    CallerBusy,
    ClientDisconnected,
    HermesError,
    HostBusy,
    InvalidRequest,
    LimiterUnavailable,
    ModelBusy,
    ModelNotConfigured,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from hermes.limiter import (
    ADMIT_PATIENCE_S,
    PRIORITIES,
    RELEASE_RESERVE_S,
    Counter,
    Lease,
    Limiter,
    Ticket,
)
from hermes.limiter.budgets import Reservation
from hermes.limiter.hosts import HostView
from hermes.placement import (
    MEMORY_COUNTER,
    WAIT_WHERE_LOADED,
    Candidate,
    host_pool,
    model_counter,
)
from hermes.pools import HostPools, host_failed
from hermes.schemas import Priority, check_num_ctx, parse_generate_request
from hermes.usage import Tally, Usage

# A holder stops its backend call this long before its lease expires, on top of
# LeaseMarginMs (which lets the release land): room for clock skew between instances
# (Lambda hosts keep within milliseconds) and for the event loop to act on the deadline.
LEASE_SAFETY_MS = 250
# A granted lease that leaves less than this to run is given back rather than used.
MIN_RUN_S = 0.1
# Below the requested run time by more than this, a 504 says the lease was what cut it.
LEASE_SHORTFALL_S = 0.5


# Releases get threads of their own: queued behind admissions (the default executor), a
# release would keep its slot busy for nothing.
_RELEASES = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hermes-release")
# Admissions and checks (a waiting request holds no thread: its notice is read by the
# limiter's poller). Few threads on purpose: 32 per runner overloaded DynamoDB Local with
# concurrent transactions on one state item (1,000-request scale test: timeouts, 503s).
_LIMITER = ThreadPoolExecutor(max_workers=6, thread_name_prefix="hermes-limiter")
T = TypeVar("T")
log = logging.getLogger("hermes.service")

# Hermes names and backend tags (gemma, gemma3:1b); anything else is refused before lookup.
MODEL_NAME = re.compile(r"[A-Za-z0-9._:-]{1,100}")


def model_pool(model: str) -> str:
    """The limiter pool of a model's cap over all of its hosts (max_concurrency_total)."""
    return f"model#{model}"


@dataclass(frozen=True)
class Placed:
    """Where placement put a request of a pool, on which view, and whether this request
    holds the host's cold-load claim."""

    candidate: Candidate
    view: HostView
    claimed: bool


@dataclass(frozen=True)
class Admission:
    """A granted lease and how long the call may run from `granted_at` (time.monotonic()):
    up to the model's timeout, never past the caller's deadline nor the lease's expiry less
    LeaseMarginMs and LEASE_SAFETY_MS. `cut_by` names what set `run_s`."""

    lease: Lease
    run_s: float
    granted_at: float
    cut_by: Literal["model", "deadline", "lease"]
    host: str
    cap: Lease | None = None  # the lease of the model-wide cap, when it has one
    caller_lease: Lease | None = None  # the caller's concurrency, when it is capped
    placed: Placed | None = None  # how a pool of several hosts was placed
    # The caller's deadline (time.monotonic()), after which RELEASE_RESERVE_S is kept for the
    # release: it must land before the invocation ends. None: no deadline (local runner).
    deadline: float | None = None

    @property
    def ends_at(self) -> float:
        return self.granted_at + self.run_s

    def left_s(self) -> float:
        return self.ends_at - time.monotonic()

    @property
    def release_by(self) -> float | None:
        """When its releases must be done (time.monotonic()): the invocation's end, less the
        time the answer needs. None without a deadline."""
        return None if self.deadline is None else self.deadline + RELEASE_RESERVE_S


class HermesService:
    def __init__(
        self,
        settings: Settings,
        limiter: Limiter,
        backends: dict[str, OllamaClient],
        usage: Usage | None = None,
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.backends = backends  # one client per Ollama host
        self.usage = usage  # a row per caller, model and day (None: not recorded)
        self.pools = HostPools(
            settings, limiter.hosts, backends, self._blocking, strategy=settings.placement
        )

    async def _release(self, lease: Lease) -> None:
        """Free `lease` from a worker thread and wait for it. A slow DynamoDB must not stall
        the event loop, where the other calls of this process keep their deadlines. The
        release starts before the first await, so a cancelled task (a client gone) still
        frees its slot: only the waiting is cancelled."""
        await asyncio.shield(self._start_release(lease, None))

    def _start_release(self, lease: Lease, release_by: float | None) -> asyncio.Future[bool]:
        """The release of `lease`, already running in a worker thread when this returns;
        retried through contention until `release_by` (time.monotonic()) or, without one,
        until the lease expires."""
        until_ms = None
        if release_by is not None:
            until_ms = int((time.time() + release_by - time.monotonic()) * 1000)
        release = functools.partial(self.limiter.release, lease, until_ms)
        return asyncio.get_running_loop().run_in_executor(_RELEASES, release)

    async def _finish(
        self,
        model: str,
        admission: Admission,
        *,
        counted: bool = True,
        answer: dict[str, Any] | None = None,
        error: BaseException | None = None,
    ) -> float:
        """The call is over: count the slot time it held (SlotTime, summed per period, is the
        model's average in-flight), free the slot, and tell the pool what the call showed
        about its host (`answer`: the backend's last object when it succeeded; `error`: why
        it failed), all at once. Returns the slot time."""
        held_s = time.monotonic() - admission.granted_at
        if counted:
            observability.held(model, held_s, host=admission.host)
        # Started here, before any await: a cancelled task (client gone) still frees its
        # slots, and the pool's bookkeeping runs to its end.
        leases = [
            lease
            for lease in (admission.lease, admission.cap, admission.caller_lease)
            if lease is not None
        ]
        releases = [self._start_release(lease, admission.release_by) for lease in leases]
        hints: list[Awaitable[None]] = []
        placed = admission.placed
        if placed is not None:
            host = admission.host
            if isinstance(error, HermesError) and host_failed(error):
                hints.append(self.pools.failed(host, error))
            if error is not None or not counted:
                if placed.claimed:
                    hints.append(self.pools.release_claim(host, model))
            else:
                hints.append(
                    self.pools.answered(
                        host, model, placed.candidate, placed.view, answer, held_s, placed.claimed
                    )
                )
        tasks = [asyncio.ensure_future(hint) for hint in hints]
        everything = asyncio.shield(asyncio.gather(*releases, *tasks, return_exceptions=True))
        if admission.release_by is None:
            results = await everything
        else:
            # The answer must go out before the invocation ends: a release (or a hint) still
            # running then is left to finish if the sandbox lives on, else to lease expiry.
            left_s = admission.release_by - time.monotonic()
            try:
                results = await asyncio.wait_for(everything, max(left_s, 0.0))
            except TimeoutError:
                log.error("releases of %s outlasted the invocation's reserve", model)
                return held_s
        for result in results[len(releases) :]:  # bookkeeping is a hint: never fails the call
            if isinstance(result, Exception):
                log.warning(
                    "pool bookkeeping for %s on %s failed: %r", model, admission.host, result
                )
        for result in results[: len(releases)]:
            if isinstance(result, BaseException):
                raise result
        return held_s

    def model(self, name: str) -> ModelConfig:
        if not MODEL_NAME.fullmatch(name):
            raise InvalidRequest("model names are 1 to 100 letters, digits, '.', '_', ':' or '-'")
        config = self.settings.models.get(name)
        if config is None:
            configured = sorted(self.settings.models)
            raise ModelNotConfigured(
                f"model '{name[:100]}' is not configured; "
                f"configured models: {', '.join(configured)}",
                configured_models=configured,
            )
        return config

    def counters(self, name: str, config: ModelConfig, host: str | None = None) -> list[Counter]:
        """A slot of the model and its weight on the host's memory budget, taken together."""
        host = host or config.host
        budget = self.settings.hosts[host].memory_budget
        return [
            Counter(model_counter(name), config.max_concurrency, 1, ModelBusy, f"model '{name}'"),
            Counter(
                MEMORY_COUNTER,
                budget,
                self.settings.weight(config),
                HostBusy,
                f"the memory budget of host '{host}'",
            ),
        ]

    async def admit(
        self,
        name: str,
        config: ModelConfig,
        deadline: float | None,
        priority: Priority = "normal",
        exclude: frozenset[str] = frozenset(),
    ) -> Admission:
        """Take a lease at once, or a place in the host's queue (first come, first served by
        ticket, `priority` with aging) and wait there up to the model's queue_timeout_ms, never
        past `deadline` (a time.monotonic() value). A model with several hosts is placed first
        (hermes.placement), never on a host of `exclude`; a model-wide cap is one more lease.
        The run time is derived from the lease as granted: however long DynamoDB took, the
        call ends before the lease can look expired to another instance."""
        asked_at = time.monotonic()
        wanted_s = config.timeout / 1000
        wait_s = config.queue_timeout_ms / 1000
        if deadline is not None:
            wanted_s = max(0.001, min(wanted_s, deadline - asked_at))
            wait_s = min(wait_s, deadline - asked_at)
        take = functools.partial(
            self._take,
            config=config,
            wanted_s=wanted_s,
            wait_until=asked_at + wait_s,
            deadline=deadline,
            priority=priority,
        )
        caller_lease = await self._take_caller_slot(name, take)
        cap = None
        if config.max_concurrency_total is not None:
            total = Counter(
                model_counter(name),
                config.max_concurrency_total,
                1,
                ModelBusy,
                f"model '{name}' over all of its hosts",
            )
            try:
                cap = await take(model_pool(name), (total,))
            except BaseException:
                if caller_lease is not None:
                    await self._release(caller_lease)
                raise
        try:
            if len(config.pool) == 1:
                host, placed = config.host, None
                lease = await take(host_pool(host), self.counters(name, config, host))
            else:
                lease, placed = await self._place(name, config, wait_s, exclude, take)
                host = placed.candidate.host
        except BaseException:
            for held in (cap, caller_lease):
                if held is not None:
                    await self._release(held)
            raise
        granted_at = time.monotonic()
        reserve_s = (self.settings.lease_margin_ms + LEASE_SAFETY_MS) / 1000
        lease_s = min(self.limiter.time_left(x) for x in (lease, cap) if x) - reserve_s
        limits = {"model": config.timeout / 1000, "lease": lease_s}
        if deadline is not None:
            limits["deadline"] = deadline - granted_at
        run_s = min(limits.values())
        cut_by: Literal["model", "deadline", "lease"] = (
            "deadline" if limits.get("deadline", math.inf) < limits["model"] else "model"
        )
        if lease_s < limits[cut_by] - LEASE_SHORTFALL_S:
            cut_by = "lease"
        admission = Admission(
            lease, run_s, granted_at, cut_by, host, cap, caller_lease, placed, deadline
        )
        if run_s <= 0 or (cut_by == "lease" and run_s < MIN_RUN_S):
            await self._finish(name, admission, counted=False)
            if cut_by == "deadline":
                raise self._timeout(name, config, 0.0, "deadline")
            raise LimiterUnavailable(
                f"the lease table took {time.monotonic() - asked_at:.1f} s to grant a slot of "
                f"model '{name}', which left no time to run it; the slot was given back, "
                "retry later",
                retry_after=self.settings.retry_after_s,
            )
        observability.admitted(
            name,
            lease.counts.get(model_counter(name)),  # the count its admission or grant wrote
            config.max_concurrency,
            (granted_at - asked_at) * 1000,
            host=host,
        )
        return admission

    async def _take_caller_slot(
        self, name: str, take: Callable[..., Awaitable[Lease]]
    ) -> Lease | None:
        """The caller's concurrency (over all models, and of this model), when its limits
        cap it: a lease of its own pool taken first, never waited for (429 caller_busy), and
        held and released with the request's other leases (it expires with them too)."""
        caller = CALLER.get()
        limits = limits_for(self.settings.callers, caller)
        if limits is None:
            return None
        counters = []
        if limits.max_concurrency is not None:
            counters.append(
                Counter(
                    "inflight",
                    limits.max_concurrency,
                    1,
                    CallerBusy,
                    f"caller '{caller}' (its max_concurrency)",
                )
            )
        if name in limits.models:
            counters.append(
                Counter(
                    model_counter(name),
                    limits.models[name].max_concurrency,
                    1,
                    CallerBusy,
                    f"caller '{caller}' on model '{name}' (its max_concurrency there)",
                )
            )
        if not counters:
            return None
        return await take(caller_pool(caller), counters, wait_until=0.0)

    def _fair_share(self) -> tuple[str, int] | None:
        """(caller, weight) to order a queue by fair share between callers, when the models
        file has a callers section (then every request has one: unlisted callers weigh 1)."""
        if not self.settings.callers:
            return None
        caller = CALLER.get()
        limits = limits_for(self.settings.callers, caller)
        return caller, limits.weight if limits is not None else 1

    async def _place(
        self,
        name: str,
        config: ModelConfig,
        wait_s: float,
        exclude: frozenset[str],
        take: Callable[..., Awaitable[Lease]],
    ) -> tuple[Lease, Placed]:
        """A lease on the best host of the model's pool: the first ranked host whose slot is
        free takes it at once (a host that must cold-load the model only with its one load
        claim); when none is, the request waits where the model is loaded, if anywhere."""
        candidates, views = await self.pools.candidates(name, config, wait_s, exclude)
        if not candidates:
            failing = ", ".join(h for h in config.pool)
            raise UpstreamUnavailable(
                f"every host of model '{name}' is failing ({failing}): their circuits are "
                "open until a probe succeeds; retry later",
                retry_after=max(1, math.ceil(self.pools.reopens_at(views))),
            )
        waits_here: Candidate | None = None
        for candidate in candidates:
            if not candidate.free:
                if candidate.tier == WAIT_WHERE_LOADED:
                    waits_here = candidate  # loaded there, a slot frees in time: no new load
                    break
                continue
            claimed = candidate.cold and await self.pools.claim_load(candidate.host, name, config)
            if candidate.cold and not claimed:
                continue  # the host is loading another model: not a second load at once
            counters = self.counters(name, config, candidate.host)
            try:
                lease = await take(host_pool(candidate.host), counters, wait_until=0.0)
            except BaseException as error:
                if claimed:  # no call: the host may load another model at once
                    with contextlib.suppress(Exception):
                        await self.pools.release_claim(candidate.host, name)
                if isinstance(error, ModelBusy | HostBusy):
                    continue  # the view was stale: the next host
                raise
            if claimed:
                with contextlib.suppress(HermesError):  # a hint: the load goes ahead anyway
                    await self.pools.make_room(candidate.host, name, views[candidate.host])
            return lease, Placed(candidate, views[candidate.host], claimed)
        # No slot free now: wait (or answer 429) where the model is loaded, if it is anywhere.
        target = waits_here or min(candidates, key=lambda c: (c.cold, c.tier))
        lease = await take(host_pool(target.host), self.counters(name, config, target.host))
        return lease, Placed(target, views[target.host], False)

    async def _take(
        self,
        pool: str,
        counters: Sequence[Counter],
        *,
        config: ModelConfig,
        wanted_s: float,
        wait_until: float,
        deadline: float | None,
        priority: Priority,
    ) -> Lease:
        """One lease of `pool`: at once, or by waiting in its queue until `wait_until`."""
        reserve_ms = self.settings.lease_margin_ms + LEASE_SAFETY_MS
        retry_after = self.settings.retry_after_s
        asked_at = time.monotonic()
        if wait_until <= asked_at:
            # No waiting: admitted now, or 429 model_busy/host_busy at once (also when others
            # wait for that capacity: nobody jumps the queue). Contention is ridden out for
            # the limiter's patience, never past the caller's deadline.
            until_ms = None
            if deadline is not None:
                patience_s = min(ADMIT_PATIENCE_S, max(deadline - asked_at, 0.0))
                until_ms = int((time.time() + patience_s) * 1000)
            call = functools.partial(
                self.limiter.acquire, pool, counters, math.ceil(wanted_s * 1000) + reserve_ms
            )
            return await self._blocking(functools.partial(call, retry_after, until_ms))
        now_ms = int(time.time() * 1000)
        got = await self._blocking(
            functools.partial(
                self.limiter.enqueue,
                pool,
                counters,
                # A grant may come late: it gives the model's whole timeout, capped by the
                # caller's deadline (run_until_ms), both plus the reserve.
                config.timeout + reserve_ms,
                wait_until_ms=now_ms + int((wait_until - asked_at) * 1000),
                run_until_ms=(
                    now_ms + int((deadline - asked_at) * 1000) + reserve_ms
                    if deadline is not None
                    else 0
                ),
                priority=priority,
                retry_after_s=retry_after,
                max_waiting=config.waiting_limit,
                fair=self._fair_share(),
            )
        )
        return got if isinstance(got, Lease) else await self._wait(got, wait_until)

    async def _wait(self, ticket: Ticket, wait_until: float) -> Lease:
        """Poll the ticket (reads only) until a lease is handed over, or give the place up at
        `wait_until` and answer 429. A cancelled request (client gone) gives its place up too,
        and releases a lease handed over meanwhile."""
        loop = asyncio.get_running_loop()
        handed = asyncio.Event()
        self.limiter.notify(ticket, lambda: loop.call_soon_threadsafe(handed.set))
        try:
            while True:
                # Cleared before looking, never after: a notice that arrives while this
                # round looks (or polls) must still wake the pause below.
                handed.clear()
                lease = self.limiter.take(ticket)  # handed over: no thread hop
                if lease is not None:
                    return lease
                if self.limiter.poll_needed(ticket):
                    lease = await self._blocking(functools.partial(self.limiter.poll, ticket))
                    if lease is not None:
                        return lease
                if time.monotonic() >= wait_until:
                    lease = await self._blocking(functools.partial(self.limiter.abandon, ticket))
                    if lease is not None:
                        return lease  # granted at the last moment: the run-time check decides
                    raise self.limiter.busy(ticket, self.settings.retry_after_s)
                # A handoff, by this process or seen by its notice poller, wakes us at once.
                pause = min(self.limiter.next_poll_s(ticket), wait_until - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(handed.wait(), max(pause, 0.001))
        except asyncio.CancelledError:
            _RELEASES.submit(self._give_up, ticket)
            raise

    def _give_up(self, got: Lease | Ticket | None) -> None:
        """In a worker thread: whatever a cancelled request holds goes back."""
        if isinstance(got, Ticket):
            got = self.limiter.abandon(got)  # a lease handed over meanwhile comes back here
        if isinstance(got, Lease):
            self.limiter.release(got)

    async def _blocking(self, call: Callable[[], T]) -> T:
        """A limiter call off the event loop (other requests of this process keep moving while
        it waits on DynamoDB). If the caller is cancelled meanwhile, the lease or place the
        call still obtains is given back as soon as it arrives: never leaked."""
        future = asyncio.get_running_loop().run_in_executor(_LIMITER, call)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._give_up_orphan)
            raise

    def _give_up_orphan(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            # A callback on the event loop: the blocking write goes to a worker thread.
            _RELEASES.submit(self._give_up, future.result())

    async def generate(
        self,
        model_name: str,
        body: Any,
        *,
        deadline_s: float | None = None,
        priority: Priority = "normal",
    ) -> dict[str, Any]:
        """Run one prompt (the seed's /v1/llm shape); `deadline_s` is what the caller can
        still wait (Lambda time left)."""
        config = self.model(model_name)
        with observed(model_name, only_failures=True):
            request = parse_generate_request(body, self.settings.max_prompt_chars, config)
        started = time.perf_counter()
        data = await self.complete(
            model_name,
            "/api/generate",
            request.to_ollama(),
            deadline_s=deadline_s,
            priority=request.priority or priority,
        )
        return {
            "result": data["response"],
            "model": model_name,
            "backend_model": config.backend_model,
            "done_reason": data.get("done_reason"),
            "usage": {
                "prompt_tokens": data.get("prompt_eval_count"),
                "completion_tokens": data.get("eval_count"),
            },
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        }

    def resolve(self, requested: str) -> str:
        """The configured name for `requested`: a Hermes name (gemma) or the backend tag it
        maps to (gemma3:1b), with or without Ollama's implicit `:latest`."""
        if requested in self.settings.models:
            return requested
        bare = requested.removesuffix(":latest")
        for name, config in self.settings.models.items():
            if bare in (config.backend_model, config.backend_model.removesuffix(":latest")):
                return name
        self.model(requested)  # raises ModelNotConfigured with the list
        raise AssertionError("unreachable")

    async def complete(
        self,
        model_name: str,
        path: str,
        body: dict[str, Any],
        *,
        deadline_s: float | None = None,
        priority: Priority = "normal",
    ) -> dict[str, Any]:
        """One non-streamed backend call (`path` /api/generate or /api/chat, Ollama's body
        with Hermes' model name), under the model's limits. Returns Ollama's answer."""

        def call(backend: OllamaClient, body: dict[str, Any], timeout_s: float) -> Any:
            return backend.complete(path, body, timeout_s)

        return await self._call(
            model_name, "completion", body, call, deadline_s=deadline_s, priority=priority
        )

    async def embed(
        self,
        model_name: str,
        body: dict[str, Any],
        *,
        deadline_s: float | None = None,
        priority: Priority = "normal",
    ) -> dict[str, Any]:
        """One embedding call (Ollama's /api/embed body, `input` a list of texts, with Hermes'
        model name) under the same limits as a generation: the model's slot and memory
        weight on its host, its timeout, the caller's budgets (its input tokens, as the
        backend reports them). Returns Ollama's /api/embed answer."""
        config = self.model(model_name)
        inputs = body.get("input")
        if not isinstance(inputs, list) or not inputs:
            raise InvalidRequest(
                "field 'input': a text or a non-empty list of texts", field="input"
            )
        if len(inputs) > config.max_inputs:
            raise InvalidRequest(
                f"field 'input': {len(inputs)} texts; model '{model_name}' takes at most "
                f"{config.max_inputs} per request (max_inputs)",
                field="input",
            )

        def call(backend: OllamaClient, body: dict[str, Any], timeout_s: float) -> Any:
            return backend.embed(body, timeout_s)

        return await self._call(
            model_name, "embedding", body, call, deadline_s=deadline_s, priority=priority
        )

    def _serves(self, model_name: str, config: ModelConfig, capability: str) -> None:
        if capability not in config.capabilities:
            what = " and ".join(config.capabilities)
            raise InvalidRequest(
                f"model '{model_name}' serves {what} only, not {capability}: use a model "
                f'whose capabilities include "{capability}"',
                model=model_name,
                capabilities=list(config.capabilities),
            )

    async def _call(
        self,
        model_name: str,
        capability: Literal["completion", "embedding"],
        body: dict[str, Any],
        call: Callable[[OllamaClient, dict[str, Any], float], Awaitable[dict[str, Any]]],
        *,
        deadline_s: float | None,
        priority: Priority,
    ) -> dict[str, Any]:
        """One non-streamed backend `call` under the model's limits: admit, call with the
        model's deadline, release; a host that fails before answering is left for another
        of the pool once."""
        config = self.model(model_name)
        self._serves(model_name, config, capability)
        tally = Tally(CALLER.get(), model_name)
        with observed(model_name) as outcome:
            deadline = time.monotonic() + deadline_s if deadline_s is not None else None
            tried: frozenset[str] = frozenset()
            answer: dict[str, Any] | None = None
            reservation: Reservation | None = None
            ended_by: BaseException | None = None
            try:
                body = self._bounded(config, body)
                body, priority, reservation = await self._reserve(
                    config, body, priority, capability == "completion"
                )
                while True:
                    admission = await self.admit(model_name, config, deadline, priority, tried)
                    tally.ran = True
                    failure: BaseException | None = None
                    try:
                        async with asyncio.timeout_at(_loop_time(admission.ends_at)):
                            answer = await call(
                                self.backends[admission.host],
                                {**body, "model": config.backend_model},
                                admission.run_s + 1,
                            )
                    except TimeoutError as error:
                        failure = error
                        raise self._timeout(
                            model_name, config, admission.run_s, admission.cut_by
                        ) from None
                    except BaseException as error:
                        failure = error
                        if self._retry_elsewhere(
                            model_name, config, admission, error, tried, deadline
                        ):
                            tried |= {admission.host}
                            continue
                        raise
                    finally:
                        tally.slot_s += await self._finish(
                            model_name, admission, answer=answer, error=failure
                        )
                    break
            except BaseException as error:
                ended_by = error
                raise
            finally:
                await self._account(tally, reservation, answer, ended_by)
            assert answer is not None
            outcome.update(
                usage=_usage(answer),
                prompt=body.get("prompt", body.get("messages", body.get("input"))),
                completion=answer.get("response", answer.get("message", {}).get("content")),
            )
            return answer

    def _retry_elsewhere(
        self,
        name: str,
        config: ModelConfig,
        admission: Admission,
        error: BaseException,
        tried: frozenset[str],
        deadline: float | None,
    ) -> bool:
        """Whether a call that failed before any byte reached the caller goes once more, to
        another host of its pool: only for a failure of the host itself, only once, and only
        with time left before the caller's deadline."""
        if not (isinstance(error, HermesError) and host_failed(error)):
            return False
        if tried or len(config.pool) < 2:
            return False
        if deadline is not None and deadline - time.monotonic() < MIN_RUN_S:
            return False
        observability.retried(name, admission.host, error.message)
        return True

    async def open_stream(
        self,
        model_name: str,
        path: str,
        body: dict[str, Any],
        *,
        deadline_s: float | None = None,
        priority: Priority = "normal",
    ) -> AsyncIterator[dict[str, Any]]:
        """Admit, start a streamed backend call and wait for its first object, so that busy,
        unknown-model and unreachable errors are raised before the caller sends any byte.
        The returned iterator yields Ollama's objects and releases the slot when it ends,
        fails, times out or is closed (a client that disconnects closes it), even if closed
        before its first object was asked for."""
        config = self.model(model_name)
        self._serves(model_name, config, "completion")
        tally = Tally(CALLER.get(), model_name)
        started = time.perf_counter()
        deadline = time.monotonic() + deadline_s if deadline_s is not None else None
        try:
            with observed(model_name, only_failures=True, started=started):
                body = self._bounded(config, body)
                body, priority, reservation = await self._reserve(config, body, priority)
        except BaseException as error:
            await self._account(tally, None, None, error)
            raise
        tried: frozenset[str] = frozenset()
        while True:
            try:
                with observed(model_name, only_failures=True, started=started):
                    admission = await self.admit(model_name, config, deadline, priority, tried)
            except BaseException as error:
                await self._account(tally, reservation, None, error)
                raise
            tally.ran = True
            timeout_s = admission.run_s
            chunks = self.backends[admission.host].stream(
                path, {**body, "model": config.backend_model}, timeout_s + 1
            )
            try:
                try:
                    first = await asyncio.wait_for(anext(chunks), max(admission.left_s(), 0.001))
                except TimeoutError:
                    raise self._timeout(model_name, config, timeout_s, admission.cut_by) from None
            except BaseException as error:
                try:
                    await _close_quietly(chunks)  # the backend sees the call end first
                finally:
                    tally.slot_s += await self._finish(model_name, admission, error=error)
                # Nothing reached the caller yet: a failing host's request goes elsewhere once.
                if self._retry_elsewhere(model_name, config, admission, error, tried, deadline):
                    tried |= {admission.host}
                    continue
                await self._account(tally, reservation, None, error)
                with observed(model_name, only_failures=True, started=started):
                    raise
            break

        return _Stream(
            self, model_name, config, admission, chunks, first, started, reservation, tally
        )

    def _bounded(self, config: ModelConfig, body: dict[str, Any]) -> dict[str, Any]:
        """The body as the backend gets it: within what a caller may send (hermes.bounds),
        and, for a model with max_num_ctx, run at that context whatever the request asked
        (a larger one is refused): Ollama reloads a model for another num_ctx
        (ollama/ollama#9977), so callers alternating sizes would reload it on every request,
        and memory_cost is its footprint at that context."""
        check_request(body, self.settings.max_prompt_chars)
        if config.max_num_ctx is None:
            return body
        given = body.get("options")
        options: dict[str, Any] = given if isinstance(given, dict) else {}
        if options.get("num_ctx") is not None:
            check_num_ctx(options["num_ctx"], config)
        return {**body, "options": {**options, "num_ctx": config.max_num_ctx}}

    async def _reserve(
        self, config: ModelConfig, body: dict[str, Any], priority: Priority, output: bool = True
    ) -> tuple[dict[str, Any], Priority, Reservation | None]:
        """The caller's limits before its request asks for a slot: its priority lowered to
        its max_priority, and its budgets reserved (the prompt's tokens, bounded, plus the
        output cap, which the body then carries) or 429 quota_exceeded."""
        caller = CALLER.get()
        limits: CallerConfig | None = limits_for(self.settings.callers, caller)
        if limits is None:
            return body, priority, None
        if PRIORITIES[priority] < PRIORITIES[limits.max_priority]:
            priority = limits.max_priority
        if not (limits.budgets_tokens or limits.requests_per_minute):
            return body, priority, None
        tokens = 0
        if limits.budgets_tokens:
            cap = 0  # an embedding has no output: its input is all it uses
            if output:
                body, cap = with_output_cap(body, config.max_output_tokens)
            tokens = prompt_tokens_bound(body) + cap
        reserve = functools.partial(
            self.limiter.budgets.reserve,
            caller,
            tokens,
            limits.tokens_per_minute,
            limits.tokens_per_day,
            limits.requests_per_minute,
        )
        return body, priority, await self._blocking(reserve)

    async def _account(
        self,
        tally: Tally,
        reservation: Reservation | None,
        answer: dict[str, Any] | None,
        error: BaseException | None,
    ) -> None:
        """The request is over: its budgets count what the backend reported (all of the
        reservation when it reported nothing, nothing if it never ran), and its caller's
        usage row counts it; the two writes at once, neither of which raises."""
        tally.ended(answer, error)
        writes: list[Callable[[], None]] = []
        if reservation is not None:
            used = used_tokens(answer) if tally.ran else None
            writes.append(
                functools.partial(self.limiter.budgets.settle, reservation, used, tally.ran)
            )
        if self.usage is not None and tally.counted:
            writes.append(functools.partial(self.usage.record, tally))
        loop = asyncio.get_running_loop()
        await asyncio.shield(
            asyncio.gather(*(loop.run_in_executor(_RELEASES, write) for write in writes))
        )

    def _timeout(
        self,
        name: str,
        config: ModelConfig,
        timeout_s: float,
        cut_by: Literal["model", "deadline", "lease"],
    ) -> UpstreamTimeout:
        if cut_by == "model":
            return UpstreamTimeout(
                f"model '{name}' did not answer within {config.timeout / 1000:g} s; "
                "its slot was released",
                timeout_ms=config.timeout,
            )
        message = f"model '{name}' did not answer within {timeout_s:g} s; its slot was released"
        if cut_by == "lease":
            return UpstreamTimeout(
                f"{message}. The lease table was slow to grant the slot, and a call never "
                "outlives its lease: retry later",
                timeout_ms=round(timeout_s * 1000),
            )
        # Stopped by the caller's deadline (e.g. API Gateway's 30 s), not the model's own.
        return UpstreamTimeout(
            f"{message}. The model may take up to {config.timeout / 1000:g} s, longer than "
            f"this synchronous request can wait: submit it as a job with POST /v1/jobs/{name}",
            timeout_ms=round(timeout_s * 1000),
            jobs_url=f"/v1/jobs/{name}",
        )


class _Stream:
    """The objects of one admitted streamed call (the first one already read), as an async
    iterator. The call ends once: the backend stream is closed, then its slot freed, when
    the answer ends or fails, when the deadline passes, or when the iterator is closed. A
    class rather than an async generator: closing a generator that never started runs none
    of its code, and a client gone before the first byte would keep the slot until the
    lease expired.

    The deadline holds however slowly the caller reads. A read of the backend times out by
    itself, but between reads the caller holds an object, possibly for long (its send to a
    slow client blocks): a timer then ends the call at the deadline, so Ollama stops before
    another instance can take the slot, and the caller gets the timeout error next."""

    def __init__(
        self,
        service: HermesService,
        name: str,
        config: ModelConfig,
        admission: Admission,
        chunks: AsyncIterator[dict[str, Any]],
        first: dict[str, Any],
        started: float,
        reservation: Reservation | None,
        tally: Tally,
    ) -> None:
        self._service, self._name, self._config = service, name, config
        self._reservation, self._tally = reservation, tally
        self._admission, self._chunks, self._started = admission, chunks, started
        self._first: dict[str, Any] | None = first  # not yet handed out
        self._last = first
        self._ending: asyncio.Future[None] | None = None
        self._reading = False  # a read of the backend is under way (it has its own timeout)
        self._late: UpstreamTimeout | None = None  # the deadline passed between reads
        when = _loop_time(admission.ends_at)
        self._timer = asyncio.get_running_loop().call_at(when, self._cut)

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._ending is not None:
            await asyncio.wait([self._ending])  # the slot is free before the caller hears
            late, self._late = self._late, None
            if late is not None:
                raise late  # cut at the deadline while the caller held an object: said once
            raise StopAsyncIteration
        if self._first is not None:
            first, self._first = self._first, None
            return first
        self._reading = True
        try:
            chunk = await asyncio.wait_for(
                anext(self._chunks), max(self._admission.left_s(), 0.001)
            )
        except StopAsyncIteration:
            await self._end(answer=self._last)
            raise
        except TimeoutError:
            error = self._timeout()
            await self._end(error=error)
            raise error from None
        except BaseException as error:
            await self._end(error=error)
            raise
        finally:
            self._reading = False
        self._last = chunk
        if self._admission.left_s() <= 0:
            self._cut()  # the timer fired during this read, which ended just in time
        return chunk

    def _cut(self) -> None:
        """At the deadline: end the call now, unless a read (which times out by itself) is
        under way; the caller gets the timeout error when it asks for the next object."""
        if self._ending is None and not self._reading:
            self._late = self._timeout()
            self._end_soon(error=self._late).add_done_callback(_log_failure)

    def _timeout(self) -> UpstreamTimeout:
        admission = self._admission
        return self._service._timeout(self._name, self._config, admission.run_s, admission.cut_by)

    async def aclose(self) -> None:
        """The caller is done (a client gone): the call ends now, if it has not yet."""
        await self._end(error=asyncio.CancelledError())

    async def _end(
        self, answer: dict[str, Any] | None = None, error: BaseException | None = None
    ) -> None:
        """End the call, if it has not ended yet, and wait for its end. A failure to end it
        (a release that failed) is raised to the caller that ended it, once."""
        first = self._ending is None
        ending = self._end_soon(answer, error)
        if first:
            await asyncio.shield(ending)
        else:
            await asyncio.wait([ending])

    def _end_soon(
        self, answer: dict[str, Any] | None = None, error: BaseException | None = None
    ) -> asyncio.Future[None]:
        """The end of the call, started once: a task of its own, so that it completes in a
        cancelled task (client gone) and can start from the timer."""
        if self._ending is None:
            self._timer.cancel()
            self._ending = asyncio.ensure_future(self._end_call(answer, error))
        return self._ending

    async def _end_call(self, answer: dict[str, Any] | None, error: BaseException | None) -> None:
        """Log the outcome, close the backend stream (Ollama sees the call end before the slot
        is freed), then free the slot."""
        if isinstance(error, HermesError):
            code, status = error.code, error.status
        elif error is None:
            code, status = "ok", 200
        else:
            code, status = ClientDisconnected.code, ClientDisconnected.status
        latency_ms = (time.perf_counter() - self._started) * 1000
        observability.finished(self._name, code, status, latency_ms, _usage(self._last))
        try:
            await _close_quietly(self._chunks)
        finally:
            try:
                self._tally.slot_s += await self._service._finish(
                    self._name, self._admission, answer=answer, error=error
                )
            finally:
                await self._service._account(self._tally, self._reservation, answer, error)


@contextlib.contextmanager
def observed(
    model: str, *, only_failures: bool = False, started: float | None = None
) -> Iterator[dict[str, Any]]:
    """Log and count the request when the block ends: its outcome is "ok" or the error's
    code. With `only_failures`, success is left to a later step (a stream's end)."""
    started = time.perf_counter() if started is None else started
    outcome: dict[str, Any] = {}
    try:
        yield outcome
    except HermesError as error:
        latency = (time.perf_counter() - started) * 1000
        observability.finished(model, error.code, error.status, latency, outcome.get("usage"))
        raise
    if not only_failures:
        latency = (time.perf_counter() - started) * 1000
        observability.finished(
            model,
            "ok",
            200,
            latency,
            outcome.get("usage"),
            outcome.get("prompt"),
            outcome.get("completion"),
        )


def _log_failure(ending: asyncio.Future[None]) -> None:
    """A stream ended by its deadline timer: nobody awaits that end, so a failure is logged."""
    if not ending.cancelled() and ending.exception() is not None:
        log.warning("ending a stream at its deadline failed: %r", ending.exception())


def _usage(answer: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt_tokens": answer.get("prompt_eval_count"),
        "completion_tokens": answer.get("eval_count"),
    }


def _loop_time(monotonic: float) -> float:
    """A time.monotonic() instant on the running loop's clock (asyncio.timeout_at's)."""
    return asyncio.get_running_loop().time() + (monotonic - time.monotonic())


async def _close_quietly(chunks: AsyncIterator[dict[str, Any]]) -> None:
    """Close the backend stream even from a cancelled task (anyio cancels level-triggered)."""
    import anyio

    # The connection is going away anyway: nothing to report if closing it fails.
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await chunks.aclose()  # type: ignore[attr-defined]


@lru_cache(maxsize=1)
def get_service() -> HermesService:
    """Built once per process so warm invocations reuse the boto3 and httpx connections."""
    settings = get_settings()
    traced = observability.start_tracing()  # before the clients exist: their calls traced
    backends = {
        host: client_for(config.kind, settings.host_url(host), config.token_parameter)
        for host, config in settings.hosts.items()
    }
    limiter = Limiter(client("dynamodb"), settings.lease_table, traced=traced)
    usage = Usage(limiter.table, settings.usage_table)
    return HermesService(settings, limiter, backends, usage)
