"""GET /v1/status: health and live usage, every probe bounded so it answers within ~2 s.

Reads what the service knows (settings, backends, the limiter's usage); decides nothing.

Health does not cascade: a load balancer or a readiness probe that reads a 503 takes the whole
sidecar out of service, so one backend of several being down must not answer 503. The answer
is 200 while Hermes can admit requests (the lease table answers) and at least one model has a
backend able to serve it: `healthy`, or `degraded` with the failing hosts and the models left
without a backend named in `failing`. 503 `unhealthy` only when nothing can be admitted: the
lease table fails, or no model has a backend.
"""

from __future__ import annotations

import asyncio
import resource
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal

from hermes import __version__
from hermes.config import _env_float
from hermes.errors import HermesError
from hermes.limiter import Contended
from hermes.limiter.hosts import HostView
from hermes.limiter.records import waiting_attr
from hermes.placement import MEMORY_COUNTER, host_pool, model_counter, resident_models
from hermes.service import HermesService
from hermes.urls import public_url

STARTED_AT = time.monotonic()
# How often an instance probes each host, however often /v1/status is called: a status
# endpoint that probed on every call would let anyone who may call it (or a load balancer
# polling every instance) amplify traffic to the GPU hosts. Between probes it answers the
# last probe's result; concurrent calls share one probe.
# HERMES_STATUS_PROBE_INTERVAL_S, default 5 (0: probe on every call).
DEFAULT_PROBE_INTERVAL_S = 5.0


@dataclass
class _Probe:
    at: float  # time.monotonic() when it started
    result: asyncio.Future[tuple[Any, dict[str, Any]]]


_probes: weakref.WeakKeyDictionary[HermesService, dict[str, _Probe]] = weakref.WeakKeyDictionary()


async def _probe_host(
    service: HermesService, host: str, timeout_s: float
) -> tuple[Any, dict[str, Any]]:
    """The host's /api/ps, probed at most every HERMES_STATUS_PROBE_INTERVAL_S by this
    instance: a probe under way is shared (on this event loop), a finished one reused until
    it is that old."""
    interval_s = _env_float("HERMES_STATUS_PROBE_INTERVAL_S", DEFAULT_PROBE_INTERVAL_S, zero=True)
    probes = _probes.setdefault(service, {})
    last = probes.get(host)
    now = time.monotonic()
    if last is not None and now - last.at < interval_s:
        if last.result.done() and not last.result.cancelled():
            return last.result.result()
        if not last.result.done() and last.result.get_loop() is asyncio.get_running_loop():
            return await asyncio.shield(last.result)
    task = asyncio.ensure_future(_timed(service.backends[host].loaded_models(timeout_s), timeout_s))
    probes[host] = _Probe(now, task)
    return await asyncio.shield(task)


async def render_status(service: HermesService) -> tuple[int, dict[str, Any]]:
    """Health and usage; every probe is bounded so this answers within ~2 s."""
    timeout = service.settings.probe_timeout_s
    names = sorted(service.settings.models)
    hosts = sorted(service.settings.hosts)
    pools = [host_pool(h) for h in hosts]
    probes = [_probe_host(service, h, timeout) for h in hosts]
    probes.append(_timed(asyncio.to_thread(service.limiter.usage, pools, True), timeout))
    book = service.limiter.hosts
    pooled = dict(zip(hosts, pools, strict=True))
    # The records only: usage (above) reads the counters, less the leases that expired.
    probes.append(_timed(asyncio.to_thread(book.views, pooled, False), timeout))
    *host_results, (usage, dynamodb_check), (views, _) = await asyncio.gather(*probes)
    now_ms = int(time.time() * 1000)
    ollama_check = _combine([check for _, check in host_results])
    health = {
        host: _host_health(check, views.get(host) if views else None, now_ms)
        for host, (_, check) in zip(hosts, host_results, strict=True)
    }
    served = {name: _model_health(service.settings.models[name].pool, health) for name in names}
    no_backend = [name for name in names if served[name].state == "no_backend"]
    failing_hosts = [{"name": h, "error": health[h].error} for h in hosts if health[h].error]
    if dynamodb_check["status"] != "ok" or len(no_backend) == len(names):
        state = "unhealthy"  # nothing can be admitted
    elif failing_hosts:
        state = "degraded"
    else:
        state = "healthy"
    body = {
        "status": state,
        "checks": {"ollama": ollama_check, "dynamodb": dynamodb_check},
        "failing": {"hosts": failing_hosts, "models": no_backend},
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - STARTED_AT, 1),
        "models": [
            {
                "name": name,
                "backend_model": service.settings.models[name].backend_model,
                "max_concurrency": service.settings.models[name].max_concurrency,
                "in_flight": (
                    sum(
                        usage[host_pool(h)].get(model_counter(name), 0)
                        for h in service.settings.models[name].pool
                    )
                    if usage is not None
                    else None
                ),
                "max_concurrency_total": service.settings.models[name].max_concurrency_total,
                "hosts": list(service.settings.models[name].pool),
                "memory_cost": service.settings.models[name].memory_cost,
                "host": service.settings.models[name].host,
                "queue_timeout_ms": service.settings.models[name].queue_timeout_ms,
                "waiting": (
                    sum(
                        usage[host_pool(h)].get(waiting_attr(model_counter(name)), 0)
                        for h in service.settings.models[name].pool
                    )
                    if usage is not None
                    else None
                ),
                "max_waiting": service.settings.models[name].waiting_limit,
                "timeout_ms": service.settings.models[name].timeout,
                "state": served[name].state,
                "failing_hosts": list(served[name].failing_hosts),
            }
            for name in names
        ],
        "hosts": [
            {
                "name": host,
                "kind": service.settings.hosts[host].kind,
                "url": public_url(service.backends[host].base_url),
                "status": check["status"],
                "available": health[host].available,
                "error": health[host].error,
                "memory_budget": service.settings.hosts[host].memory_budget,
                "memory_in_use": (
                    usage[host_pool(host)].get(MEMORY_COUNTER, 0) if usage is not None else None
                ),
                "in_flight": (
                    {
                        name: usage[host_pool(host)].get(model_counter(name), 0)
                        for name in names
                        if host in service.settings.models[name].pool
                    }
                    if usage is not None
                    else None
                ),
                "max_loaded_models": service.settings.hosts[host].max_loaded_models,
                **_placement(views.get(host) if views else None, now_ms),
            }
            for host, (_, check) in zip(hosts, host_results, strict=True)
        ],
        "memory_weights": service.settings.memory_weights,
        "ollama": {
            "loaded_models": [
                {"host": host} | {k: m.get(k) for k in ("name", "size", "size_vram", "expires_at")}
                for host, (loaded, _) in zip(hosts, host_results, strict=True)
                for m in loaded or []
            ]
        },
        "process": _process_memory(),
    }
    return (503 if state == "unhealthy" else 200), body


@dataclass(frozen=True)
class HostHealth:
    available: bool  # requests may be placed there (at once, or after one probe)
    error: str | None  # why the host counts as failing; None when it is fine


ModelState = Literal["ok", "degraded", "no_backend"]


@dataclass(frozen=True)
class ModelHealth:
    state: ModelState  # ok; degraded (some hosts of its pool fail); no_backend (all do)
    failing_hosts: tuple[str, ...]


def _host_health(check: dict[str, Any], view: HostView | None, now_ms: int) -> HostHealth:
    """A host fails when its probe fails or its circuit is not closed. It stays available
    while half-open: the next request probes it, and this status probe has just had an
    answer. Counting it out would be a trap: a balancer that takes Hermes out of service
    sends no request, and without one the circuit never closes. (`view` is None when the
    lease table did not answer: the probe alone decides.)"""
    if check["status"] != "ok":
        return HostHealth(False, check.get("error") or "its probe failed")
    circuit = _circuit(view, now_ms) if view is not None else "closed"
    if circuit == "open" and view is not None:
        seconds = (view.open_until - now_ms) / 1000
        return HostHealth(False, f"its circuit is open for {seconds:.1f} s more: a call failed")
    if circuit == "half_open":
        return HostHealth(True, "its circuit is half-open: the next request probes it")
    return HostHealth(True, None)


def _model_health(pool: tuple[str, ...], health: dict[str, HostHealth]) -> ModelHealth:
    failing = tuple(h for h in pool if health[h].error)
    if not any(health[h].available for h in pool):
        return ModelHealth("no_backend", failing)
    return ModelHealth("degraded" if failing else "ok", failing)


def _circuit(view: HostView, now_ms: int) -> str:
    """closed; open (no request goes there until the cooldown ends); half_open (cooldown
    over: the next request's instance probes it)."""
    if not view.open_until:
        return "closed"
    return "open" if view.open_until > now_ms else "half_open"


def _placement(view: HostView | None, now_ms: int) -> dict[str, Any]:
    """What placement shares about a host: its circuit and what is loaded there."""
    if view is None:
        return {"circuit": None, "resident_models": None, "loading": None}
    resident = resident_models(view, now_ms)
    return {
        "circuit": _circuit(view, now_ms),
        "circuit_open_until_ms": view.open_until or None,
        "resident_models": sorted(resident, key=lambda m: -resident[m]),
        "loading": view.loading_now(now_ms),
    }


async def _timed(probe: Any, timeout_s: float) -> tuple[Any, dict[str, Any]]:
    """Await a probe with a hard deadline; returns (value or None, check record)."""
    started = time.perf_counter()
    try:
        value = await asyncio.wait_for(probe, timeout_s * 1.5)
    except HermesError as exc:
        return None, _check("error", started, exc.message)
    except Contended as exc:  # throttled reads: DynamoDB is there, but not answering them
        return None, _check("error", started, f"the lease table is busy ({exc.code})")
    except TimeoutError:
        return None, _check("error", started, f"no answer within {timeout_s * 1.5:g} s")
    return value, _check("ok", started)


def _combine(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """One check for all Ollama hosts: ok only when every host answered."""
    failed = [c for c in checks if c["status"] != "ok"]
    combined = dict(failed[0] if failed else checks[0])
    combined["latency_ms"] = max(c["latency_ms"] for c in checks)
    return combined


def _check(status: str, started: float, error: str | None = None) -> dict[str, Any]:
    check: dict[str, Any] = {
        "status": status,
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
    }
    if error:
        check["error"] = error
    return check


def _process_memory() -> dict[str, float]:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/statm") as statm:
            rss_pages = int(statm.read().split()[1])
        rss_mb = rss_pages * resource.getpagesize() / 2**20
    except OSError:
        rss_mb = peak_kb / 1024
    return {"rss_mb": round(rss_mb, 1), "peak_rss_mb": round(peak_kb / 1024, 1)}
