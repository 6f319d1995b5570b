"""What docs/pools.md promises about model pools, checked through the service and its Lambda
handlers (moto, in-thread emulators as hosts): a stream broken after its first chunk is not
replayed, residency is re-read from the servers, a failed probe reopens its circuit, and a
retry on another host stays within the request's deadline.

The pools' clock (circuits, residency records) is moved by hand where a claim names a
duration (30 s, the 10 s cooldown): the verdict then never depends on how loaded the machine
is, and the tests do not wait those durations out."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hermes.config import get_settings
from hermes.http import LAMBDA_SAFETY_S
from hermes.placement import host_pool
from hermes.pools import RESIDENCY_STALE_S
from hermes.service import HermesService, get_service, model_pool
from local.process import free_port
from tests.support.lambda_calls import LambdaContext, event, load_function, logged
from tests.support.models_file import use_models
from tests.support.ollama_emulator import CUT_AFTER, OllamaEmulator
from tests.support.polling import wait_until

HOSTS = ("gpu1", "gpu2", "gpu3")
TAG = "gemma3:1b"


@pytest.fixture(scope="module")
def emulators() -> Iterator[dict[str, OllamaEmulator]]:
    with OllamaEmulator() as a, OllamaEmulator() as b, OllamaEmulator() as c:
        yield dict(zip(HOSTS, (a, b, c), strict=True))


@pytest.fixture(autouse=True)
def fresh(aws: None, emulators: dict[str, OllamaEmulator]) -> None:
    for emu in emulators.values():
        emu.reset()


def use_pool(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, urls: dict[str, str], timeout_ms: int = 10_000
) -> None:
    """gemma on a pool of the given hosts (name → URL), 2 slots per host."""
    config = {
        "models": {
            "gemma": {
                "max_concurrency": 2,
                "memory_cost": "medium",
                "timeout": timeout_ms,
                "backend_model": TAG,
                "hosts": list(urls),
                "max_concurrency_total": 4,
            },
        },
        "hosts": {h: {"memory_budget": 8, "url": url} for h, url in urls.items()},
    }
    use_models(monkeypatch, tmp_path, config)


class PoolClock:
    """The pools' clock (circuits, residency records, probe and load claims), which stands
    still but when the test moves it: `ahead_s` after the moment it was made. However slow
    the machine, a record is exactly as old as the test says."""

    def __init__(self) -> None:
        self.start_s = time.time()
        self.ahead_s = 0.0

    def now_ms(self) -> int:
        return int((self.start_s + self.ahead_s) * 1000)


def with_clock(
    service: HermesService, monkeypatch: pytest.MonkeyPatch, clock: PoolClock | None = None
) -> PoolClock:
    """The service's pools on `clock` (a new one if None): instances sharing one agree on
    the time, as Lambda hosts do within milliseconds."""
    clock = clock or PoolClock()
    monkeypatch.setattr(service.pools, "_now_ms", clock.now_ms)
    return clock


def served(emulators: dict[str, OllamaEmulator]) -> dict[str, int]:
    return {h: e.stats()["requests"].get(TAG, 0) for h, e in emulators.items()}


def ps_reads(emulators: dict[str, OllamaEmulator]) -> dict[str, int]:
    return {h: e.stats()["meta_calls"].get("/api/ps", 0) for h, e in emulators.items()}


def generate(service: HermesService) -> dict[str, Any]:
    return asyncio.run(service.generate("gemma", {"prompt": "hi there"}))


def host_of_next(service: HermesService, emulators: dict[str, OllamaEmulator]) -> str:
    """Runs one request through the service; the host that served it."""
    before = served(emulators)
    assert generate(service)["result"].startswith("Echo:")
    after = served(emulators)
    [host] = [h for h in HOSTS if after[h] != before[h]]
    return host


def on_the_server(emulator: OllamaEmulator, keep_alive: int | None = None) -> None:
    """Another client of that Ollama server (not Hermes) runs gemma there: loads it, or with
    keep_alive 0 unloads it once its answer is done."""
    body: dict[str, Any] = {"model": TAG, "prompt": "elsewhere", "stream": False}
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    httpx.post(f"{emulator.url}/api/generate", json=body, timeout=10).raise_for_status()


def resident_on(emulator: OllamaEmulator) -> bool:
    return TAG in emulator.stats()["resident"]


def nothing_held(service: HermesService, hosts: tuple[str, ...] = HOSTS) -> None:
    pools = [host_pool(h) for h in hosts] + [model_pool("gemma")]
    usage = service.limiter.usage(pools)
    assert all(not any(counts.values()) for counts in usage.values()), usage


# -- a stream broken after its first chunk -----------------------------------------------------


def test_a_pooled_stream_broken_after_its_first_chunk_is_not_retried_and_ends_in_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulators: dict[str, OllamaEmulator]
) -> None:
    """docs/pools.md, Failover: "A request whose host fails before any byte reached the
    caller (…streamed: before the first chunk) is retried once on another host of its pool
    within its deadline; a stream that breaks after its first chunk cannot be replayed and
    ends with an error line." And its slot is freed like any other call's."""
    # Given gemma on three hosts, the first of which (where a fresh pool places first) cuts
    # its streams after CUT_AFTER chunks
    use_pool(monkeypatch, tmp_path, {h: e.url for h, e in emulators.items()})
    emulators["gpu1"].set_behaviour(TAG, "cut_stream")
    # When a caller streams from it through the Ollama API
    response = load_function("ollama_api").handler(event("ollama_generate.json"), LambdaContext())
    # Then the chunks it already had are followed by an error line, in the same 200 answer
    assert response["statusCode"] == 200, response
    lines = [json.loads(line) for line in response["body"].splitlines()]
    *chunks, last = lines
    assert len(chunks) == CUT_AFTER and all(c["done"] is False for c in chunks), lines
    assert "".join(c["response"] for c in chunks).startswith("Echo:")
    assert last["code"] == "upstream_error" and "mid-answer" in last["error"], last
    # And no other host was asked to replay it
    assert served(emulators) == {"gpu1": 1, "gpu2": 0, "gpu3": 0}
    # And its slot (host and model-wide) is free again
    nothing_held(get_service())


# -- residency re-read and a failed probe, through the service ---------------------------------


def test_residency_is_re_read_from_the_servers_when_a_hosts_record_is_30_s_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulators: dict[str, OllamaEmulator]
) -> None:
    """docs/pools.md: "Residency is learned … from a re-read of `/api/ps` … by one instance
    when a host's record is 30 s old", and placement goes "Where the model is loaded and a
    slot is free" first. A model loaded or unloaded by someone else is seen at the next
    re-read, not before; a second instance at the same moment does not read again."""
    assert RESIDENCY_STALE_S == 30  # the figure the docs give
    use_pool(monkeypatch, tmp_path, {h: e.url for h, e in emulators.items()})
    service = get_service()
    clock = with_clock(service, monkeypatch)
    # Given gemma loaded on gpu3 by another client of that server; Hermes has no record yet
    on_the_server(emulators["gpu3"])
    # When the first request comes: every host's record is older than 30 s (there is none)
    host = host_of_next(service, emulators)
    # Then each server's /api/ps was read once, and the request went where gemma is loaded
    # (gpu1 would be first in order among hosts without it)
    assert ps_reads(emulators) == {"gpu1": 1, "gpu2": 1, "gpu3": 1}
    assert host == "gpu3"

    # Given gemma moved behind Hermes' back: unloaded from gpu3, loaded on gpu2
    on_the_server(emulators["gpu3"], keep_alive=0)
    on_the_server(emulators["gpu2"])
    wait_until(lambda: not resident_on(emulators["gpu3"]), 10, "gemma unloaded from gpu3")
    # When a request comes 29 s later: the records are not 30 s old yet
    clock.ahead_s = RESIDENCY_STALE_S - 1
    host = host_of_next(service, emulators)
    # Then nothing was re-read, and the request still went where the record says
    assert ps_reads(emulators) == {"gpu1": 1, "gpu2": 1, "gpu3": 1}
    assert host == "gpu3"

    # When gpu3 drops gemma again, and a request comes 31 s after the first read
    on_the_server(emulators["gpu3"], keep_alive=0)
    wait_until(lambda: not resident_on(emulators["gpu3"]), 10, "gemma unloaded from gpu3")
    clock.ahead_s = RESIDENCY_STALE_S + 1
    host = host_of_next(service, emulators)
    # Then every host was re-read once more, and the request went where gemma is now loaded
    assert ps_reads(emulators) == {"gpu1": 2, "gpu2": 2, "gpu3": 2}
    assert host == "gpu2"

    # When another instance serves a request at the same moment
    get_service.cache_clear()
    other = get_service()
    assert other is not service
    with_clock(other, monkeypatch, clock)
    assert host_of_next(other, emulators) == "gpu2"
    # Then it placed on the shared records without reading the servers again
    assert ps_reads(emulators) == {"gpu1": 2, "gpu2": 2, "gpu3": 2}
    nothing_held(other)


def test_a_probe_that_fails_reopens_the_circuit_for_another_cooldown(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    emulators: dict[str, OllamaEmulator],
    log_lines: io.StringIO,
) -> None:
    """docs/pools.md, Failover: "A connection failure … from a host opens its circuit,
    shared by all instances, for HERMES_CIRCUIT_COOLDOWN_S (10 s): nobody places there.
    After the cooldown one instance wins the probe claim and asks the host's /api/ps: an
    answer closes the circuit, a failure opens it for another cooldown." Driven by requests
    only; the host is a real address where nothing listens."""
    down = f"http://127.0.0.1:{free_port()}"
    use_pool(monkeypatch, tmp_path, {"gpu1": down, "gpu2": emulators["gpu2"].url})
    service = get_service()
    clock = with_clock(service, monkeypatch)
    cooldown_s = get_settings().circuit_cooldown_s
    assert cooldown_s == 10  # the documented default

    def gpu1() -> Any:
        return service.limiter.hosts.views({"gpu1": host_pool("gpu1")})["gpu1"]

    def opened() -> list[dict[str, Any]]:
        return [line for line in logged(log_lines, "circuit opened") if line["host"] == "gpu1"]

    # Given a request that finds gpu1 unreachable: its circuit opens, gpu2 serves
    assert host_of_next(service, emulators) == "gpu2"
    first = gpu1()
    assert first.open_until > clock.now_ms() and len(opened()) == 1
    # When a request comes during the cooldown
    clock.ahead_s = cooldown_s / 2
    assert host_of_next(service, emulators) == "gpu2"
    # Then nobody probed the host: the circuit is as it was
    assert (gpu1().open_until, gpu1().probe_until, len(opened())) == (first.open_until, 0, 1)
    # When a request comes after the cooldown, and its probe of gpu1 fails too
    clock.ahead_s = cooldown_s + 1
    probed_at = clock.now_ms()
    assert host_of_next(service, emulators) == "gpu2"
    # Then the circuit is open again for another whole cooldown, not half-open, and its probe
    # claim is gone (the next probe comes after that cooldown, by whoever wins it)
    again = gpu1()
    assert again.open_until >= probed_at + cooldown_s * 1000, (again, probed_at)
    assert again.probe_until == 0
    assert len(opened()) == 2
    # And a request during that new cooldown still stays away from the host
    clock.ahead_s = cooldown_s + 1 + cooldown_s / 2
    assert host_of_next(service, emulators) == "gpu2"
    assert (gpu1().open_until, len(opened())) == (again.open_until, 2)
    nothing_held(service, ("gpu1", "gpu2"))


# -- a retry on another host within the deadline -----------------------------------------------


def test_a_retry_on_another_host_stays_within_the_lambdas_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulators: dict[str, OllamaEmulator]
) -> None:
    """docs/pools.md, Failover: a request whose host fails before any byte reached the
    caller "is retried once on another host of its pool within its deadline"; and Bounded
    waiting: "It never waits past its own deadline (the Lambda's remaining time)". The first
    host fails slowly (2 s, then a 500), the others never answer: the retry gets only what
    is left of the deadline, not the model's 20 s timeout, nor a fresh deadline of its own."""
    first_s = 2.0  # how long the first host takes to fail
    remaining_s = 7.5  # the Lambda's time left when the request arrives
    deadline_s = remaining_s - LAMBDA_SAFETY_S  # what the handler gives the request (4 s)
    # Room for the answer to leave on a loaded machine, and yet less than the first attempt:
    # a retry given a fresh deadline takes at least first_s + deadline_s, past the bound.
    slack_s = 1.5
    assert first_s + slack_s < deadline_s and slack_s < first_s
    use_pool(monkeypatch, tmp_path, {h: e.url for h, e in emulators.items()}, timeout_ms=20_000)
    llm = load_function("llm")
    # Given a pool in use (gemma loaded on gpu1, the records fresh: the request measured
    # below spends its time on the hosts, not on a first look at them)
    assert llm.handler(event("llm_generate.json"), LambdaContext())["statusCode"] == 200
    before = served(emulators)
    assert before == {"gpu1": 1, "gpu2": 0, "gpu3": 0}
    # And then gpu1 failing slowly, gpu2 and gpu3 never answering
    emulators["gpu1"].set_behaviour(TAG, "error", status=500, delay_ms=int(first_s * 1000))
    for host in ("gpu2", "gpu3"):
        emulators[host].set_behaviour(TAG, "hang")
    # When a request runs through the LLM function with 7.5 s left
    started = time.monotonic()
    response = llm.handler(
        event("llm_generate.json"), LambdaContext(remaining_ms=int(remaining_s * 1000))
    )
    elapsed = time.monotonic() - started
    body = json.loads(response["body"])
    # Then it failed on gpu1, was retried on another host once, and cut at the deadline there
    assert (response["statusCode"], body["code"]) == (504, "upstream_timeout"), body
    counts = {h: n - before[h] for h, n in served(emulators).items()}
    assert counts["gpu1"] == 1 and counts["gpu2"] + counts["gpu3"] == 1, (counts, body)
    # And both attempts together took no longer than the deadline: at least the first host's
    # 2 s, and at most the deadline plus the slack (a retry given a fresh deadline would take
    # 2 + 4 = 6 s or more, one given the model's timeout 22 s)
    assert first_s <= elapsed <= deadline_s + slack_s, elapsed
    assert elapsed < remaining_s  # never past the Lambda's own end
    # And the call left on the hanging host was closed, and every slot is free
    wait_until(
        lambda: all(not any(e.stats()["in_flight"].values()) for e in emulators.values()),
        10,
        "the retried call closed on its host",
    )
    nothing_held(get_service())
