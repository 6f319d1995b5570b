"""Placement ranks the hosts of a pool from the shared views (hermes.placement, pure)."""

from __future__ import annotations

import pytest

from hermes.limiter.hosts import HostView
from hermes.placement import Demand, HostLimits, rank

NOW = 1_000_000_000
LIMITS = {h: HostLimits(memory_budget=8, max_loaded_models=2) for h in ("a", "b", "c")}


def demand(wait_s: float = 0.0, call_s: float | None = None, capacity: int = 2) -> Demand:
    return Demand("m", "inflight_m", capacity, 2, wait_s, call_s)


def view(host: str, resident: dict[str, int] | None = None, **counters: int) -> HostView:
    waiting = counters.pop("waiting", 0)
    return HostView(
        host,
        counters=counters,
        waiting=waiting,
        resident={m: NOW - age for m, age in (resident or {}).items()},
    )


def order(candidates: list) -> list[str]:
    return [c.host for c in candidates]


def test_a_host_with_the_model_loaded_and_a_free_slot_comes_first() -> None:
    views = [view("a"), view("b", {"m": 1000}), view("c", {"x": 5})]
    ranked = rank(demand(), views, LIMITS, NOW)
    assert order(ranked)[0] == "b" and ranked[0].tier == 0 and not ranked[0].cold


def test_loading_without_evicting_beats_evicting_an_idle_model_beats_evicting_a_busy_one() -> None:
    views = [
        view("a", {"x": 10, "y": 20}, inflight_x=1, inflight_y=1, memory=4),  # both busy
        view("b", {"x": 10, "y": 20}),  # both idle: evicts the least recently used
        view("c", {"x": 10}),  # room for a second model
    ]
    ranked = rank(demand(), views, LIMITS, NOW)
    assert order(ranked) == ["c", "b", "a"]
    assert [c.tier for c in ranked] == [2, 3, 4]
    assert ranked[1].evicts == ("y",)  # y was used longest ago (20 ms before x)


def test_a_busy_eviction_picks_the_model_with_fewest_requests_in_flight() -> None:
    views = [
        view("a", {"x": 10, "y": 20}, inflight_x=2, inflight_y=2, memory=4),
        view("b", {"x": 10, "y": 20}, inflight_x=1, inflight_y=2, memory=4),
    ]
    ranked = rank(demand(), views, LIMITS, NOW)
    assert order(ranked) == ["b", "a"]
    assert ranked[0].evicts == ("x",)


def test_no_second_host_loads_the_model_while_the_loaded_one_frees_a_slot_within_the_wait() -> None:
    full = {"inflight_m": 2, "memory": 4}
    views = [view("a", {"m": 5}, waiting=1, **full), view("b")]
    # Two ahead of it (1 waiting + itself) on 2 slots of ~1 s calls: ~1 s, within 5 s.
    assert order(rank(demand(wait_s=5, call_s=1.0), views, LIMITS, NOW))[0] == "a"
    # The same queue with 0.5 s of wait: load it on b instead.
    ranked = rank(demand(wait_s=0.5, call_s=1.0), views, LIMITS, NOW)
    assert order(ranked)[0] == "b" and ranked[0].cold
    # No call of the model has ended yet: nothing promises a slot in time.
    assert order(rank(demand(wait_s=5, call_s=None), views, LIMITS, NOW))[0] == "b"
    # Without waiting at all, a free host is the only way to run now.
    assert order(rank(demand(wait_s=0), views, LIMITS, NOW))[0] == "b"


def test_a_host_loading_another_model_is_not_asked_to_load_a_second() -> None:
    loading = HostView("a", loading=("x", NOW + 5_000))
    ranked = rank(demand(), [loading, view("b", {"y": 1, "z": 2}, inflight_y=1)], LIMITS, NOW)
    assert order(ranked) == ["b", "a"] and ranked[1].tier == 5
    # ...but the load of *this* model counts as loaded: requests join it.
    joining = HostView("a", loading=("m", NOW + 5_000))
    assert rank(demand(), [view("b"), joining], LIMITS, NOW)[0].host == "a"
    # A lapsed claim (its instance died) holds nothing.
    lapsed = HostView("a", loading=("x", NOW - 1))
    assert rank(demand(), [lapsed], LIMITS, NOW)[0].tier == 2


def test_residency_older_than_keep_alive_is_not_trusted() -> None:
    views = [view("a", {"m": 301_000}), view("b", {"m": 1_000})]
    ranked = rank(demand(), views, LIMITS, NOW)
    assert [c.resident for c in ranked] == [True, False] and ranked[0].host == "b"


def test_the_least_busy_of_equal_hosts_comes_first() -> None:
    views = [view("a", {"m": 1}, inflight_m=1, memory=2), view("b", {"m": 1})]
    assert order(rank(demand(), views, LIMITS, NOW)) == ["b", "a"]


@pytest.mark.parametrize("strategy", ["random", "round_robin"])
def test_baselines_ignore_residency_but_try_free_hosts_first(strategy: str) -> None:
    views = [view("a", {"m": 1}, inflight_m=2, memory=4), view("b"), view("c")]
    firsts = {order(rank(demand(), views, LIMITS, NOW, strategy))[0] for _ in range(40)}  # type: ignore[arg-type]
    assert firsts == {"b", "c"}  # never the full host first, and not always the same host


def test_an_idle_eviction_prefers_a_model_loaded_elsewhere_too_then_the_least_recently_used() -> (
    None
):
    views = [
        # (model: ms since last used) Ollama drops each host's least recently used idle model.
        view("a", {"x": 10, "y": 20}),  # drops y, loaded nowhere else, used 20 ms ago
        view("b", {"x": 10, "z": 30}),  # drops z, which c has too: no load lost
        view("c", {"z": 50, "w": 60}),  # drops w, loaded nowhere else, used 60 ms ago
    ]
    ranked = rank(demand(), views, LIMITS, NOW)
    assert [(c.host, c.evicts) for c in ranked] == [("b", ("z",)), ("c", ("w",)), ("a", ("y",))]


def test_a_model_with_requests_in_flight_on_a_host_is_loaded_there_whatever_the_record_says() -> (
    None
):
    views = [view("a"), view("b", {}, inflight_m=1, inflight_x=1, inflight_y=1, memory=6)]
    limits = {"a": HostLimits(8, 2), "b": HostLimits(8, 3)}
    ranked = rank(demand(), views, limits, NOW)
    assert (ranked[0].host, ranked[0].tier, ranked[0].resident) == ("b", 0, True)
