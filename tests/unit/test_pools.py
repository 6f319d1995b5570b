"""A model pool in one process (moto, three in-thread emulators as three hosts): failover
before the first byte, shared circuits, the model-wide cap, nothing leaked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hermes.aws import client
from hermes.errors import ModelBusy, UpstreamError, UpstreamUnavailable
from hermes.limiter import Counter
from hermes.placement import host_pool, model_counter
from hermes.service import HermesService, get_service, model_pool
from tests.support.models_file import use_models
from tests.support.ollama_emulator import OllamaEmulator

HOSTS = ("gpu1", "gpu2", "gpu3")


@pytest.fixture(scope="module")
def emulators() -> Iterator[dict[str, OllamaEmulator]]:
    with OllamaEmulator() as a, OllamaEmulator() as b, OllamaEmulator() as c:
        yield dict(zip(HOSTS, (a, b, c), strict=True))


@pytest.fixture
def service(
    aws: None,
    emulators: dict[str, OllamaEmulator],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[HermesService]:
    for emu in emulators.values():
        emu.reset()
    config = {
        "models": {
            "gemma": {
                "max_concurrency": 2,
                "memory_cost": "medium",
                "timeout": 10_000,
                "backend_model": "gemma3:1b",
                "hosts": list(HOSTS),
                "max_concurrency_total": 3,
            },
        },
        "hosts": {h: {"memory_budget": 8, "url": e.url} for h, e in emulators.items()},
    }
    use_models(monkeypatch, tmp_path, config)
    client.cache_clear()
    yield get_service()
    client.cache_clear()


def requests_per_host(emulators: dict[str, OllamaEmulator]) -> dict[str, int]:
    return {h: sum(e.stats()["requests"].values()) for h, e in emulators.items()}


def nothing_held(service: HermesService) -> None:
    pools = [host_pool(h) for h in HOSTS] + [model_pool("gemma")]
    usage = service.limiter.usage(pools)
    assert all(not any(counts.values()) for counts in usage.values()), usage


def open_hosts(service: HermesService) -> set[str]:
    views = service.limiter.hosts.views({h: host_pool(h) for h in HOSTS})
    return {h for h, v in views.items() if v.open_until}


def generate(service: HermesService, **kwargs: Any) -> dict[str, Any]:
    return asyncio.run(service.generate("gemma", {"prompt": "hi there"}, **kwargs))


def test_a_failing_host_is_retried_once_elsewhere_and_its_circuit_keeps_others_away(
    service: HermesService, emulators: dict[str, OllamaEmulator]
) -> None:
    emulators["gpu1"].set_behaviour("*", "error", status=500)
    assert generate(service)["result"].startswith("Echo:")  # gpu1 failed, gpu2 answered
    assert requests_per_host(emulators) == {"gpu1": 1, "gpu2": 1, "gpu3": 0}
    assert open_hosts(service) == {"gpu1"}
    for _ in range(4):
        generate(service)
    assert requests_per_host(emulators)["gpu1"] == 1  # every instance stays away from it
    nothing_held(service)


def test_a_streamed_request_is_retried_before_its_first_chunk(
    service: HermesService, emulators: dict[str, OllamaEmulator]
) -> None:
    emulators["gpu1"].set_behaviour("*", "error", status=502)

    async def stream() -> list[dict[str, Any]]:
        chunks = await service.open_stream("gemma", "/api/generate", {"prompt": "hi there"})
        return [chunk async for chunk in chunks]

    chunks = asyncio.run(stream())
    assert chunks[-1]["done"] and requests_per_host(emulators)["gpu2"] == 1
    nothing_held(service)


def test_retried_only_once_and_only_for_failures_of_the_host(
    service: HermesService, emulators: dict[str, OllamaEmulator]
) -> None:
    for emu in emulators.values():
        emu.set_behaviour("*", "error", status=500)
    with pytest.raises(UpstreamError):
        generate(service)
    assert sum(requests_per_host(emulators).values()) == 2  # once more, not three times
    for emu in emulators.values():
        emu.set_behaviour("*", "error", status=400)  # the request's fault: not retried
    with pytest.raises(UpstreamError):
        generate(service)
    assert requests_per_host(emulators)["gpu3"] == 1
    assert open_hosts(service) == {"gpu1", "gpu2"}
    nothing_held(service)


def test_every_circuit_open_answers_503_with_retry_after(
    service: HermesService, emulators: dict[str, OllamaEmulator]
) -> None:
    now = int(time.time() * 1000)
    for host in HOSTS:
        service.limiter.hosts.open_circuit(host_pool(host), now, now + 8_000)
    with pytest.raises(UpstreamUnavailable, match="every host of model 'gemma'") as raised:
        generate(service)
    assert 1 <= (raised.value.retry_after or 0) <= 8
    assert sum(requests_per_host(emulators).values()) == 0
    nothing_held(service)


def test_the_request_after_the_cooldown_probes_in_itself_and_is_served(
    service: HermesService, emulators: dict[str, OllamaEmulator]
) -> None:
    """Lambda freezes a sandbox when its handler returns: a probe left running beside a 503
    would hold the pool at 503 for every sandbox until its claim lapsed. The request that
    claims the probe runs it before it is placed, and is served by the host it reopened."""
    now = int(time.time() * 1000)
    for host in HOSTS:
        service.limiter.hosts.open_circuit(host_pool(host), now - 10_000, now - 1)
    answer = generate(service)
    assert answer["result"]
    assert len(open_hosts(service)) < len(HOSTS)
    assert sum(requests_per_host(emulators).values()) == 1  # one answer, after the probe(s)
    nothing_held(service)


def test_a_probe_that_fails_inside_the_request_reopens_its_circuit(
    service: HermesService, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(timeout_s: float) -> list[dict[str, Any]]:
        raise UpstreamUnavailable("connection refused")

    now = int(time.time() * 1000)
    for host in HOSTS:
        service.limiter.hosts.open_circuit(host_pool(host), now - 10_000, now - 1)
        monkeypatch.setattr(service.backends[host], "loaded_models", down)
    with pytest.raises(UpstreamUnavailable, match="every host of model 'gemma'"):
        generate(service)
    views = service.limiter.hosts.views({h: host_pool(h) for h in HOSTS})
    assert all(v.open_until > now and v.probe_until == 0 for v in views.values())
    nothing_held(service)


def test_the_model_wide_cap_holds_over_all_hosts(service: HermesService) -> None:
    cap = Counter(model_counter("gemma"), 3, 1, ModelBusy, "cap")
    held = [service.limiter.acquire(model_pool("gemma"), [cap], 60_000) for _ in range(3)]
    with pytest.raises(ModelBusy, match="over all of its hosts"):
        generate(service)
    service.limiter.release(held.pop())
    assert generate(service)["result"]
    for lease in held:
        service.limiter.release(lease)
    nothing_held(service)
