"""The service layer: Hermes' rules, independent of how a request arrived.

generate = look the model up → validate → admit (limiter) → call the backend with
the model's deadline → release in `finally`. Every failure leaves as a HermesError.
"""

from __future__ import annotations

import asyncio
import math
import resource
import time
from functools import lru_cache
from typing import Any

from hermes import __version__
from hermes.backend import OllamaClient
from hermes.config import ModelConfig, Settings, get_settings
from hermes.errors import HermesError, ModelBusy, ModelNotConfigured, UpstreamTimeout
from hermes.limiter import Claim, Limiter
from hermes.schemas import parse_generate_request

STARTED_AT = time.monotonic()


def model_pool(name: str) -> str:
    return f"model#{name}"


class HermesService:
    def __init__(self, settings: Settings, limiter: Limiter, backend: OllamaClient) -> None:
        self.settings = settings
        self.limiter = limiter
        self.backend = backend

    def model(self, name: str) -> ModelConfig:
        config = self.settings.models.get(name)
        if config is None:
            configured = sorted(self.settings.models)
            raise ModelNotConfigured(
                f"model '{name[:100]}' is not configured; "
                f"configured models: {', '.join(configured)}",
                configured_models=configured,
            )
        return config

    def claims(self, name: str, config: ModelConfig) -> list[Claim]:
        return [Claim(model_pool(name), config.max_concurrency, 1, ModelBusy)]

    async def generate(
        self, model_name: str, body: Any, *, deadline_s: float | None = None
    ) -> dict[str, Any]:
        """Run one prompt; `deadline_s` is what the caller can still wait (Lambda time left)."""
        config = self.model(model_name)
        request = parse_generate_request(body, self.settings.max_prompt_chars)
        timeout_s = config.timeout / 1000
        if deadline_s is not None:
            timeout_s = max(0.001, min(timeout_s, deadline_s))
        lease_ms = math.ceil(timeout_s * 1000) + self.settings.lease_margin_ms
        # Blocking on purpose: an awaited acquire could be cancelled after DynamoDB granted
        # the lease but before the try/finally below owns it, leaking the slot until expiry.
        lease = self.limiter.acquire(
            self.claims(model_name, config), lease_ms, self.settings.retry_after_s
        )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                data = await self.backend.generate(
                    config.backend_model,
                    request.prompt,
                    timeout_s=timeout_s,
                    system=request.system,
                    options=request.options.model_dump(exclude_none=True)
                    if request.options
                    else None,
                    format=request.format,
                )
        except TimeoutError:
            raise UpstreamTimeout(
                f"model '{model_name}' did not answer within {timeout_s:g} s; "
                "its slot was released",
                timeout_ms=round(timeout_s * 1000),
            ) from None
        finally:
            self.limiter.release(lease)
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

    async def status(self) -> tuple[int, dict[str, Any]]:
        """Health and usage; every probe is bounded so this answers within ~2 s."""
        timeout = self.settings.probe_timeout_s
        names = sorted(self.settings.models)
        ollama_probe = _timed(self.backend.loaded_models(timeout), timeout)
        usage_probe = _timed(
            asyncio.to_thread(self.limiter.usage, [model_pool(n) for n in names]), timeout
        )
        (loaded, ollama_check), (usage, dynamodb_check) = await asyncio.gather(
            ollama_probe, usage_probe
        )
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
                    "backend_model": self.settings.models[name].backend_model,
                    "max_concurrency": self.settings.models[name].max_concurrency,
                    "in_flight": usage.get(model_pool(name)) if usage is not None else None,
                    "memory_cost": self.settings.models[name].memory_cost,
                    "timeout_ms": self.settings.models[name].timeout,
                }
                for name in names
            ],
            "ollama": {
                "loaded_models": [
                    {k: m.get(k) for k in ("name", "size", "size_vram", "expires_at")}
                    for m in loaded or []
                ]
            },
            "process": _process_memory(),
        }
        return (200 if state == "healthy" else 503), body


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


@lru_cache(maxsize=1)
def get_service() -> HermesService:
    """Built once per process so warm invocations reuse the boto3 and httpx connections."""
    import boto3  # deferred: a large import, paid on first use rather than by every test import
    from botocore.config import Config

    settings = get_settings()
    dynamodb = boto3.client(
        "dynamodb",
        config=Config(
            connect_timeout=1,
            read_timeout=2,
            retries={"mode": "standard", "max_attempts": 3},
            tcp_keepalive=True,
        ),
    )
    return HermesService(
        settings, Limiter(dynamodb, settings.lease_table), OllamaClient(settings.ollama_url)
    )
