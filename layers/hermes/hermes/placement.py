"""Placement: which host of a model's pool a request goes to. Pure ranking of what every
instance shares (hermes.limiter.hosts views); hermes.pools acts on it.

In order (issue 13):
  0. the model is loaded there (or being loaded for it) and a slot is free;
  1. it is loaded there, no slot is free, and the request can wait for one: the queue there
     is expected to move within the request's wait, so no second host is made to load it;
  2. a free slot where loading it evicts nothing;
  3. … evicts only idle models (Ollama drops the least recently used idle one);
  4. … must evict a model in use, the cheapest first (fewest requests in flight);
  5. no slot free now: where to wait, loaded hosts first.
A host already cold-loading another model is not asked to load a second one (tiers 2-4).
Within a tier: the least busy host, then the models file's order.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from hermes.limiter.hosts import HostView

MEMORY_COUNTER = "memory"


def host_pool(host: str) -> str:
    """The limiter pool of an Ollama host: its memory in use and its models' in-flight
    counts, and (hermes.limiter.hosts) what is loaded there and its circuit."""
    return f"host#{host}"


def model_counter(model: str) -> str:
    return f"inflight_{model}"


# A model not seen for this long is no longer taken as loaded (Ollama's default keep_alive:
# a model idle that long is unloaded). Views are corrected from /api/ps when stale.
RESIDENT_MS = 300_000

Strategy = Literal["residency", "random", "round_robin"]
STRATEGIES: tuple[Strategy, ...] = ("residency", "random", "round_robin")
_rotation = itertools.count()
WAIT_WHERE_LOADED = 1  # the tier of "loaded there, and a slot frees within the wait"


@dataclass(frozen=True)
class Demand:
    """What one request needs on any host of its pool."""

    model: str
    counter: str  # its in-flight counter in the pool's state
    capacity: int  # max_concurrency per host
    weight: int  # on the host's memory budget
    wait_s: float  # how long it may wait for a slot
    call_s: float | None  # how long a call of this model takes lately (None: unknown)


@dataclass(frozen=True)
class HostLimits:
    memory_budget: int
    max_loaded_models: int | None


@dataclass(frozen=True)
class Candidate:
    host: str
    tier: int
    free: bool  # the view shows a slot and memory free now
    resident: bool  # loaded there (or being loaded for this model)
    evicts: tuple[str, ...] = ()  # what the server drops to load it, predicted

    @property
    def cold(self) -> bool:
        return not self.resident


def resident_models(view: HostView, now_ms: int) -> dict[str, int]:
    """Models loaded on the host as far as the shared view knows: {model: last seen}."""
    return {m: t for m, t in view.resident.items() if now_ms - t < RESIDENT_MS}


def rank(
    demand: Demand,
    views: Sequence[HostView],
    limits: dict[str, HostLimits],
    now_ms: int,
    strategy: Strategy = "residency",
) -> list[Candidate]:
    """Every host of `views` (already without open circuits), best first."""
    candidates = [_candidate(demand, v, limits[v.host], now_ms) for v in views]
    if strategy != "residency":
        # The baselines of the benchmark: the order ignores residency (LiteLLM's
        # simple-shuffle, round robin); a host with a free slot is still tried first.
        order = list(range(len(candidates)))
        if strategy == "random":
            random.shuffle(order)
        else:
            start = next(_rotation) % max(len(order), 1)
            order = order[start:] + order[:start]
        shuffled = [candidates[i] for i in order]
        return sorted(shuffled, key=lambda c: 0 if c.free else 1)
    position = {v.host: i for i, v in enumerate(views)}
    busy = {v.host: v.counters.get(demand.counter, 0) + v.waiting for v in views}
    copies: dict[str, int] = {}
    for v in views:
        for m in in_memory(v, now_ms):
            copies[m] = copies.get(m, 0) + 1
    by_host = {v.host: v for v in views}

    def cost(c: Candidate) -> tuple[int, int, int]:
        """What an eviction destroys: requests in flight on the evicted models, then how many
        of them are loaded nowhere else (their next request is a load), then how recently
        they were used (the least recently used goes first, as Ollama's own choice)."""
        view = by_host[c.host]
        in_flight = sum(view.counters.get(model_counter(m), 0) for m in c.evicts)
        sole = sum(1 for m in c.evicts if copies.get(m, 0) <= 1)
        recent = max((view.resident.get(m, 0) for m in c.evicts), default=0)
        return in_flight, sole, recent

    return sorted(
        candidates,
        key=lambda c: (c.tier, cost(c), busy[c.host], position[c.host]),
    )


def _candidate(demand: Demand, view: HostView, limits: HostLimits, now_ms: int) -> Candidate:
    counters = view.counters
    free = (
        view.waiting == 0
        and counters.get(demand.counter, 0) + 1 <= demand.capacity
        and counters.get(MEMORY_COUNTER, 0) + demand.weight <= limits.memory_budget
    )
    loaded = in_memory(view, now_ms)
    loading = view.loading_now(now_ms)
    resident = demand.model in loaded or loading == demand.model
    if resident:
        if free:
            return Candidate(view.host, 0, True, True)
        # Unknown call time (no call of the model ended in this process yet): no promise that
        # a slot frees in time, so another host may load it.
        call_s = demand.call_s
        within = (
            call_s is not None
            and demand.wait_s > 0
            and (view.waiting + 1) * call_s / demand.capacity <= demand.wait_s
        )
        tier = WAIT_WHERE_LOADED if within else 5
        return Candidate(view.host, tier, False, True)
    evicts = evictions(loaded, view, limits, demand.model)
    if not free or (loading is not None and loading != demand.model):
        return Candidate(view.host, 5, free, False, evicts)
    in_use = [m for m in evicts if counters.get(model_counter(m), 0) > 0]
    tier = 2 if not evicts else (3 if not in_use else 4)
    return Candidate(view.host, tier, True, False, evicts)


def in_memory(view: HostView, now_ms: int) -> dict[str, int]:
    """The models the host holds: those the record says, and any with a request in flight
    there (a record can lag behind: the server cannot run a model it has not loaded)."""
    held = resident_models(view, now_ms)
    prefix = model_counter("")
    for counter, count in view.counters.items():
        if counter.startswith(prefix) and count > 0:
            held.setdefault(counter[len(prefix) :], now_ms)
    return held


def evictions(
    loaded: dict[str, int], view: HostView, limits: HostLimits, model: str
) -> tuple[str, ...]:
    """What loading `model` makes the server drop: Ollama evicts the least recently used idle
    model; when all are busy, the request waits for one, which we count as evicting the
    least busy."""
    others = {m: t for m, t in loaded.items() if m != model}
    if limits.max_loaded_models is None or len(others) < limits.max_loaded_models:
        return ()
    excess = len(others) - limits.max_loaded_models + 1

    def order(m: str) -> tuple[int, int]:
        return (view.counters.get(model_counter(m), 0), others[m])

    return tuple(sorted(others, key=order)[:excess])
