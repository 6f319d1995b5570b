"""GET /v1/status: health and live usage, every probe bounded so it answers within ~2 s.

Reads what the service knows (settings, backends, the limiter's usage); decides nothing.
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from hermes import __version__
from hermes.errors import HermesError
from hermes.service import MEMORY_COUNTER, HermesService, host_pool, model_counter

STARTED_AT = time.monotonic()


async def render_status(service: HermesService) -> tuple[int, dict[str, Any]]:
    """Health and usage; every probe is bounded so this answers within ~2 s."""
    timeout = service.settings.probe_timeout_s
    names = sorted(service.settings.models)
    hosts = sorted(service.settings.hosts)
    pools = [host_pool(h) for h in hosts]
    probes = [_timed(service.backends[h].loaded_models(timeout), timeout) for h in hosts]
    probes.append(_timed(asyncio.to_thread(service.limiter.usage, pools), timeout))
    *host_results, (usage, dynamodb_check) = await asyncio.gather(*probes)
    ollama_check = _combine([check for _, check in host_results])
    if dynamodb_check["status"] != "ok":
        state = "unhealthy"
    elif ollama_check["status"] != "ok":
        state = "degraded"
    else:
        state = "healthy"
    body = {
        "status": state,
        "checks": {"ollama": ollama_check, "dynamodb": dynamodb_check},
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - STARTED_AT, 1),
        "models": [
            {
                "name": name,
                "backend_model": service.settings.models[name].backend_model,
                "max_concurrency": service.settings.models[name].max_concurrency,
                "in_flight": (
                    usage[host_pool(service.settings.models[name].host)].get(model_counter(name), 0)
                    if usage is not None
                    else None
                ),
                "memory_cost": service.settings.models[name].memory_cost,
                "host": service.settings.models[name].host,
                "queue_timeout_ms": service.settings.models[name].queue_timeout_ms,
                "timeout_ms": service.settings.models[name].timeout,
            }
            for name in names
        ],
        "hosts": [
            {
                "name": host,
                "kind": service.settings.hosts[host].kind,
                "url": public_url(service.backends[host].base_url),
                "status": check["status"],
                "memory_budget": service.settings.hosts[host].memory_budget,
                "memory_in_use": (
                    usage[host_pool(host)].get(MEMORY_COUNTER, 0) if usage is not None else None
                ),
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
    return (200 if state == "healthy" else 503), body


def public_url(url: str) -> str:
    """A URL safe to show: no user, password or query (which may carry a token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


async def _timed(probe: Any, timeout_s: float) -> tuple[Any, dict[str, Any]]:
    """Await a probe with a hard deadline; returns (value or None, check record)."""
    started = time.perf_counter()
    try:
        value = await asyncio.wait_for(probe, timeout_s * 1.5)
    except HermesError as exc:
        return None, _check("error", started, exc.message)
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
