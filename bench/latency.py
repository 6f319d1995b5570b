"""Section 1: what Hermes adds to a request, and what one limiter call costs.

The emulator answers instantly, so the difference between going to it directly and
going through Hermes is Hermes' own cost: HTTP parsing, FastAPI, two DynamoDB requests
(admit and release, one conditional UpdateItem each) and the call to the backend. The DynamoDB
round trips are measured apart, on the limiter, and taken out to give Hermes' own part."""

from __future__ import annotations

import json
import time
from typing import Any

from bench.memory import MemoryLog
from bench.procs import Infra, Runner, build_service, dynamodb_client, http_client
from bench.report import Section
from bench.scale import Scale
from bench.stats import ms, percentile

DIRECT_BODY = json.dumps({"model": "gemma3:1b", "prompt": "hi", "stream": False}).encode()
HERMES_BODY = json.dumps({"prompt": "hi"}).encode()
TARGET_ADDED_P50_S = 0.004
TARGET_OWN_P50_S = 0.001  # the added latency outside DynamoDB's round trips
ADMISSION_OP = RELEASE_OP = "UpdateItem"  # uncontended: one request each


def time_requests(url: str, body: bytes, warmup: int, count: int) -> list[float]:
    """Sequential POSTs on one keep-alive connection; seconds per measured request."""
    headers = {"content-type": "application/json"}
    samples: list[float] = []
    with http_client(timeout=10) as client:
        for i in range(warmup + count):
            started = time.perf_counter()
            response = client.post(url, content=body, headers=headers)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"POST {url} answered {response.status_code}: {response.text}")
            if i >= warmup:
                samples.append(elapsed)
    return samples


def _through_runner(
    emulator_url: str, warmup: int, count: int, extra_env: dict[str, str]
) -> tuple[list[float], str, float]:
    """Start a runner with the embedded store chosen by `extra_env`, load it, and return
    (samples, store description, peak RSS in MB) before stopping it."""
    with Runner({"OLLAMA_URL": emulator_url, **extra_env}) as runner:
        print(f"  runner up, store: {runner.store}", flush=True)
        samples = time_requests(f"{runner.url}/v1/llm/gemma", HERMES_BODY, warmup, count)
        store = runner.store.split(" on http")[0]  # the port means nothing in a report
        return samples, store, runner.peak_rss_mb()


def limiter_timings(infra: Infra, scale: Scale) -> dict[str, list[float]]:
    """acquire/release pairs in this process against DynamoDB Local, with the time spent on
    the wire (request sent → response read, botocore's before-send → before-parse) apart.
    Uncontended, each is one UpdateItem of the host's state item (admission: weights and
    lease id in; release: the mirror); a pair that made any other request is an error."""
    ddb = dynamodb_client(infra.dynamodb.url)
    service = build_service(ddb, _default_models_file(), infra.emulator.url)
    config = service.model("gemma")
    counters = service.counters("gemma", config)
    wire = WireTimer(ddb)
    found: dict[str, list[float]] = {
        k: [] for k in ("acquire", "release", "acquire_wire", "release_wire", "wire")
    }
    for i in range(scale.limiter_warmup + scale.limiter_count):
        wire.samples.clear()
        started = time.perf_counter()
        lease = service.limiter.acquire("host#default", counters, config.timeout + 5000)
        acquired = time.perf_counter()
        service.limiter.release(lease)
        released = time.perf_counter()
        if [op for op, _ in wire.samples] != [ADMISSION_OP, RELEASE_OP]:
            raise RuntimeError(f"an uncontended acquire + release made {wire.samples}")
        if i >= scale.limiter_warmup:
            found["acquire"].append(acquired - started)
            found["release"].append(released - acquired)
            found["acquire_wire"].append(wire.samples[0][1])
            found["release_wire"].append(wire.samples[1][1])
            found["wire"].append(wire.samples[0][1] + wire.samples[1][1])
    return found


class WireTimer:
    """Times each DynamoDB call's HTTP round trip: botocore's before-send → before-parse
    events. `samples` holds (operation, seconds) in call order."""

    def __init__(self, client: Any) -> None:
        self.samples: list[tuple[str, float]] = []
        self._sent = 0.0
        client.meta.events.register("before-send.dynamodb.*", self._on_send)
        client.meta.events.register("before-parse.dynamodb.*", self._on_parse)

    def _on_send(self, **_: Any) -> None:  # returning None: botocore still sends the request
        self._sent = time.perf_counter()

    def _on_parse(self, operation_model: Any, **_: Any) -> None:
        self.samples.append((operation_model.name, time.perf_counter() - self._sent))


def _default_models_file() -> Any:
    from hermes.config import DEFAULT_MODELS_FILE

    return DEFAULT_MODELS_FILE


def _direct_and_hermes(
    section: Section, emulator_url: str, scale: Scale, memory: MemoryLog
) -> float:
    """The target figure: direct vs through a runner on its embedded default store.
    Returns the added p50 in seconds."""
    warmup, count = scale.latency_warmup, scale.latency_count
    direct = time_requests(f"{emulator_url}/api/generate", DIRECT_BODY, warmup, count)
    d50, d99 = percentile(direct, 50), percentile(direct, 99)
    section.add("direct to the emulator, p50 / p99", f"{ms(d50)} / {ms(d99)}")

    # No AWS_ENDPOINT_URL_DYNAMODB: the runner starts its embedded default store itself.
    hermes, store, rss = _through_runner(emulator_url, warmup, count, {})
    memory.record("runner after section 1 (embedded default store)", rss, store)
    h50, h99 = percentile(hermes, 50), percentile(hermes, 99)
    section.add("through Hermes (embedded default store), p50 / p99", f"{ms(h50)} / {ms(h99)}")
    section.add(
        "added latency, p50",
        ms(h50 - d50),
        f"≤ {TARGET_ADDED_P50_S * 1000:g} ms",
        h50 - d50 <= TARGET_ADDED_P50_S,
    )
    section.add("added latency, p99", ms(h99 - d99))
    section.add("ratio Hermes / direct, p50", f"{h50 / d50:.1f}x")
    section.note(f"Default store: {store}.")

    moto, moto_store, moto_rss = _through_runner(
        emulator_url, warmup, count, {"HERMES_LOCAL_STORE": "moto"}
    )
    memory.record(
        "runner after section 1 with HERMES_LOCAL_STORE=moto", moto_rss, moto_store, targeted=False
    )
    m50, m99 = percentile(moto, 50), percentile(moto, 99)
    section.add("through Hermes (HERMES_LOCAL_STORE=moto), p50 / p99", f"{ms(m50)} / {ms(m99)}")
    section.add("added latency with moto, p50", ms(m50 - d50))
    section.note(f"Comparison store: {moto_store}.")
    return h50 - d50


def _limiter_rows(section: Section, infra: Infra, scale: Scale, added_s: float) -> None:
    limiter = limiter_timings(infra, scale)
    p50 = {key: percentile(samples, 50) for key, samples in limiter.items()}
    for op, what in (("acquire", ADMISSION_OP), ("release", RELEASE_OP)):
        section.add(
            f"limiter {op} (1 {what}) against DynamoDB Local, p50 (of which HTTP round trip)",
            f"{ms(p50[op])} ({ms(p50[op + '_wire'])})",
        )
    section.add(
        "DynamoDB part of the added latency, p50: the 2 round trips (admit + release)",
        ms(p50["wire"]),
    )
    own = added_s - p50["wire"]
    section.add(
        "Hermes' own part of the added latency, p50 (added - DynamoDB round trips)",
        ms(own),
        f"≤ {TARGET_OWN_P50_S * 1000:g} ms",
        own <= TARGET_OWN_P50_S,
    )
    section.add(
        "of which botocore building, signing and parsing the 2 requests, p50",
        ms(p50["acquire"] + p50["release"] - p50["wire"]),
    )


def run(infra: Infra, scale: Scale, memory: MemoryLog) -> Section:
    section = Section(1, "Added latency")
    emulator = infra.emulator
    emulator.reset()  # every behaviour back to "ok", no delay: the emulator answers at once
    n = f"{scale.latency_warmup} warm-up + {scale.latency_count} measured"
    print(f"  {n} sequential requests per path", flush=True)
    section.note(
        f"{n} sequential requests per path, one keep-alive httpx.Client, POST /api/generate "
        '`{"model":"gemma3:1b","prompt":"hi","stream":false}` direct vs POST /v1/llm/gemma '
        '`{"prompt":"hi"}` through a local runner (uvicorn, access log off), emulator answering '
        "instantly. Client, emulator, runner and DynamoDB Local share the machine's CPUs."
    )
    added = _direct_and_hermes(section, emulator.url, scale, memory)
    _limiter_rows(section, infra, scale, added)
    section.note(
        f"Limiter: {scale.limiter_count} acquire + release pairs (after {scale.limiter_warmup} "
        "warm-up) in the benchmark process, on a boto3 client from hermes.aws.client's factory "
        "(same botocore Config). The HTTP round trip is botocore's before-send → before-parse: "
        "sending the request, DynamoDB Local's work and reading the answer; the rest is "
        "botocore building, signing and parsing. Hermes' own part = added latency p50 (through "
        "the runner) - p50 of the two round trips of an acquire + release pair (in this "
        "process): it holds HTTP, FastAPI, the service, botocore's own work and the call to "
        "the backend, and nothing of DynamoDB's."
    )
    section.note("For scale: LiteLLM's proxy adds ~18 ms at p50 on such a machine.")
    return section
