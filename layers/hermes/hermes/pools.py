"""Model pools across hosts: shared views, circuits, and what answers teach about residency.

The service asks `candidates` where a request may go (hermes.placement ranks), and tells
`answered` / `failed` what happened. Everything here is shared through the lease table
(hermes.limiter.hosts), so every instance places with the same knowledge:

- Residency: learned from each answer (and its `load_duration`), and re-read from the
  server's own `/api/ps` (`/v1/models` for OpenAI-compatible servers) by one instance once a
  host's record is RESIDENCY_STALE_S old.
- Circuits: a connection failure or a 5xx opens a host's circuit for the cooldown (every
  instance stops placing there); after it, one instance claims the probe (`/api/ps`), which
  closes the circuit or opens it for another cooldown.

Probes and refreshes run inside the request that claimed them, before it is placed (bounded
by HERMES_PROBE_TIMEOUT_S): Lambda freezes a sandbox the moment its handler returns, so work
left running beside the answer would stall, with its claim, until that sandbox's next invoke,
if any. A claim still lapses (PROBE_CLAIM_S) should its instance die mid-probe, and a probe
ends its circuit only while its own claim holds (the claim is the circuit's epoch), so a
late one changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

from hermes import observability
from hermes.backends import OllamaClient
from hermes.config import ModelConfig, Settings
from hermes.errors import (
    HermesError,
    LimiterUnavailable,
    ModelBusy,
    UpstreamError,
    UpstreamUnavailable,
)
from hermes.limiter import Contended
from hermes.limiter.hosts import HostBook, HostView
from hermes.placement import (
    RESIDENT_MS,
    Candidate,
    Demand,
    HostLimits,
    Strategy,
    evictions,
    host_pool,
    in_memory,
    model_counter,
    rank,
    resident_models,
)

T = TypeVar("T")
Blocking = Callable[[Callable[[], T]], Awaitable[T]]

RESIDENCY_STALE_S = 30
PROBE_CLAIM_S = 10  # a probe that never reports (its instance died mid-probe) is retried after this
# A cold load is claimed for the model's whole timeout at most: a call that never reports
# (its instance died) frees the host for another load after that.
CALL_S_SMOOTHING = 0.2  # weight of the newest call in a model's moving average call time
# An answer whose load_duration is at least this long was a cold load (a resident model
# reports a few milliseconds).
COLD_LOAD_MS = 100


def host_failed(error: HermesError) -> bool:
    """A failure of the host rather than of the request: unreachable, 5xx, or the connection
    broke off. These open the circuit and may be retried on another host."""
    if isinstance(error, UpstreamUnavailable):
        return True
    if isinstance(error, UpstreamError):
        status = error.extra.get("upstream_status")
        return status is None or int(status) >= 500
    return False


class HostPools:
    def __init__(
        self,
        settings: Settings,
        book: HostBook,
        backends: dict[str, OllamaClient],
        blocking: Blocking[Any],
        strategy: Strategy = "residency",
    ) -> None:
        self.settings = settings
        self.book = book
        self.backends = backends
        self.blocking = blocking
        self.strategy = strategy
        self._call_s: dict[str, float] = {}

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    async def views(self, hosts: tuple[str, ...]) -> dict[str, HostView]:
        pools = {h: host_pool(h) for h in hosts}
        views: dict[str, HostView] = await self.blocking(lambda: self.book.views(pools))
        return views

    async def candidates(
        self, name: str, config: ModelConfig, wait_s: float, exclude: frozenset[str]
    ) -> tuple[list[Candidate], dict[str, HostView]]:
        """The hosts that may serve this request, best first (none when every circuit of the
        pool is open), and the views they were ranked on."""
        try:
            views = await self.views(config.pool)
        except Contended:
            raise ModelBusy(
                f"model '{name}': the lease table is busy; retry later", retry_after=1
            ) from None
        now = self._now_ms()
        due = [h for h in config.pool if h not in exclude and self._due(views[h], now)]
        if due:  # in this request, before placing it: nothing is left to run after it
            checked = await asyncio.gather(*(self._check(views[h], now) for h in due))
            views = views | {view.host: view for view in checked}
        usable = [views[h] for h in config.pool if h not in exclude and not views[h].open_until]
        demand = Demand(
            model=name,
            counter=model_counter(name),
            capacity=config.max_concurrency,
            weight=self.settings.weight(config),
            wait_s=wait_s,
            call_s=self._call_s.get(name),
        )
        limits = {h: self._limits(h) for h in config.pool}
        return rank(demand, usable, limits, now, self.strategy), views

    def _limits(self, host: str) -> HostLimits:
        config = self.settings.hosts[host]
        return HostLimits(config.memory_budget, config.max_loaded_models)

    def reopens_at(self, views: dict[str, HostView]) -> float:
        """Seconds until the first open circuit among `views` may be probed."""
        now = self._now_ms()
        soonest = min((v.open_until for v in views.values() if v.open_until), default=now)
        return max(soonest - now, 0) / 1000

    async def claim_load(self, host: str, name: str, config: ModelConfig) -> bool:
        now = self._now_ms()
        return bool(
            await self.blocking(
                lambda: self.book.claim_load(host_pool(host), name, now, now + config.timeout)
            )
        )

    async def make_room(self, host: str, name: str, view: HostView) -> None:
        """Before this request's cold load of `name` on `host`: the server's own list (its
        least recently used order decides what it evicts), and the models the load will
        evict forgotten now, so that no request is sent for them meanwhile (each would be a
        load of its own). The answer's re-read corrects any misprediction."""
        with contextlib.suppress(HermesError):  # unreachable: the record's own guess
            view = replace(view, resident=await self._resync(host))
        now = self._now_ms()
        evicted = evictions(in_memory(view, now), view, self._limits(host), name)
        await self.blocking(lambda: self.book.forget(host_pool(host), evicted))

    async def answered(
        self,
        host: str,
        name: str,
        candidate: Candidate,
        view: HostView,
        answer: dict[str, Any] | None,
        call_s: float,
        claimed: bool,
    ) -> None:
        """The call on `host` ended well: remember its time, and the model as loaded there
        (and what its load evicted) when the shared view did not know it yet or saw it long
        ago. `answer` is the backend's last object (with load_duration, in ns), if any."""
        previous = self._call_s.get(name)
        self._call_s[name] = (
            call_s if previous is None else previous + CALL_S_SMOOTHING * (call_s - previous)
        )
        load_ns = (answer or {}).get("load_duration")
        load_ms = round(load_ns / 1e6) if isinstance(load_ns, int | float) else None
        cold = load_ms is not None and load_ms >= COLD_LOAD_MS
        now = self._now_ms()
        seen = resident_models(view, now).get(name)
        if cold:
            observability.model_loaded(name, host, float(load_ms or 0))
        if not (cold or claimed or seen is None or now - seen > RESIDENCY_STALE_S * 1000):
            return  # the shared view is fresh: no write for this answer
        evicted: tuple[str, ...] = ()
        if cold or (candidate.cold and load_ns is None):  # (a server without load_duration)
            # Predicted as the server decides, on what it held just before: the record never
            # lists more models than the host keeps (corrected by /api/ps when stale).
            evicted = evictions(resident_models(view, now), view, self._limits(host), name)
        pool = host_pool(host)
        await self.blocking(
            lambda: self.book.resident(
                pool, name, now, load_ms if cold else None, evicted, loaded=claimed
            )
        )
        if cold:  # what the load evicted, as the server itself says
            with contextlib.suppress(HermesError):  # unreachable: the prediction stands
                await self._resync(host)

    async def release_claim(self, host: str, name: str) -> None:
        await self.blocking(lambda: self.book.end_load(host_pool(host), name))

    async def failed(self, host: str, error: HermesError, probe: int | None = None) -> None:
        """The host failed a call: open its circuit for every instance. `probe`: the failed
        call was the probe holding this claim, which reopens the circuit only while it holds."""
        now = self._now_ms()
        until = now + self.settings.circuit_cooldown_s * 1000
        opened = await self.blocking(
            lambda: self.book.open_circuit(host_pool(host), now, until, probe=probe)
        )
        if opened:
            observability.circuit_opened(host, error.message)

    @staticmethod
    def _due(view: HostView, now: int) -> bool:
        """A half-open circuit nobody probes yet, or a closed one whose residency is stale."""
        if view.open_until:
            return view.open_until <= now and view.probe_until <= now
        return now - view.ps_at > RESIDENCY_STALE_S * 1000

    async def _check(self, view: HostView, now: int) -> HostView:
        """Probe the host, or refresh what it holds, if this instance wins the claim: the
        view as it stands after."""
        return await (self._probe if view.open_until else self._refresh)(view, now)

    async def _probe(self, view: HostView, now: int) -> HostView:
        """The probe of a half-open circuit: closes it when the host answers /api/ps."""
        host, pool, claim = view.host, host_pool(view.host), now + PROBE_CLAIM_S * 1000
        if not await self.blocking(lambda: self.book.claim_probe(pool, now, claim)):
            return view  # another instance probes
        try:
            resident = await self._resync(host)
        except LimiterUnavailable:
            return view  # the lease table failed, not the host: the claim lapses
        except Exception as exc:  # anything failing in the probe is its answer
            error = exc if isinstance(exc, HermesError) else UpstreamUnavailable(repr(exc))
            await self.failed(host, error, probe=claim)
            return view
        if not await self.blocking(lambda: self.book.close_circuit(pool, claim)):
            return view  # the claim lapsed meanwhile: a newer probe decides
        observability.circuit_closed(host)
        return replace(view, open_until=0, probe_until=0, resident=resident, ps_at=now)

    async def _refresh(self, view: HostView, now: int) -> HostView:
        """Re-read what a host holds, if this instance wins the claim; a host that fails to
        answer has its circuit opened (and is not placed on)."""
        pool, stale_ms = host_pool(view.host), RESIDENCY_STALE_S * 1000
        if not await self.blocking(lambda: self.book.claim_refresh(pool, now, stale_ms)):
            return view
        try:
            return replace(view, resident=await self._resync(view.host), ps_at=now)
        except Exception as exc:
            error = exc if isinstance(exc, HermesError) else UpstreamUnavailable(repr(exc))
            if not host_failed(error):
                return view  # the lease table failed, not the host
            await self.failed(view.host, error)
            return replace(view, open_until=now + self.settings.circuit_cooldown_s * 1000)

    async def _resync(self, host: str) -> dict[str, int]:
        """Ask the server what it has loaded (/api/ps, or /v1/models) and write that down, in
        its own least-recently-used order; {model: last used}. Raises its HermesError."""
        asked_at = self._now_ms()
        loaded = await self.backends[host].loaded_models(self.settings.probe_timeout_s)
        now = self._now_ms()
        known = [n for n, c in self.settings.models.items() if host in c.pool]
        resident = self._used(host, loaded, now)
        await self.blocking(
            lambda: self.book.refreshed(host_pool(host), resident, known, now, asked_at)
        )
        return resident

    def _used(self, host: str, loaded: list[dict[str, Any]], now: int) -> dict[str, int]:
        """{model of this host's pools: last used} from the server's /api/ps entries."""
        used = {
            _bare(str(m.get("model") or m.get("name") or "")): _last_used(m, now) for m in loaded
        }
        return {
            n: used[tag]
            for n, c in self.settings.models.items()
            if host in c.pool and (tag := _bare(c.backend_model)) in used
        }


def _last_used(entry: dict[str, Any], now_ms: int) -> int:
    """When the server last used a loaded model: /api/ps reports its expiry, last use +
    keep_alive; with Ollama's default keep_alive that order is the server's own LRU order.
    Clamped so an unusual keep_alive never makes a loaded model look unloaded, or future."""
    try:
        expires = datetime.fromisoformat(str(entry.get("expires_at")).replace("Z", "+00:00"))
    except ValueError:
        return now_ms
    used = int(expires.timestamp() * 1000) - RESIDENT_MS
    return max(now_ms - RESIDENT_MS // 2, min(used, now_ms))


def _bare(tag: str) -> str:
    return tag.removesuffix(":latest")
