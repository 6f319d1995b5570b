"""Section 4: how busy the model's slots stay when more callers want them than it has, and
how fairly the waiting callers are served.

Several runner processes (stand-ins for Lambda instances) share one DynamoDB Local; closed-loop
client threads call one model whose answers take SERVICE_MS. Utilization is the emulator's
busy time (the integral of requests in flight) over max_concurrency x the window. Fairness:
completed requests per client, and each request's wait against the ideal FIFO wait of that
closed loop. Each answer carries the emulator's own start and end (Hermes' Ollama-compatible
route passes them through), which also draws fairness.png."""

from __future__ import annotations

import datetime
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.memory import MemoryLog
from bench.plot import plot_fairness
from bench.procs import Infra, Runner, http_client, write_models_file
from bench.report import Section, load_average
from bench.scale import Scale
from bench.stats import median, percentile

SERVICE_MS = 100
SLOTS = 2
TAG = "gemma3:1b"
RETRY_PAUSE_S = 0.05  # what a client does with a 429 when Hermes does not wait
TARGET_UTILIZATION = 0.95
TARGET_FAIRNESS = 1.3  # completed requests per client, max / min
TARGET_WAIT_P99 = 1.5  # x the ideal FIFO wait
PLOT = "fairness.png"


def _model(queue_timeout_ms: int) -> dict[str, object]:
    return {
        "max_concurrency": SLOTS,
        "memory_cost": "medium",
        "timeout": 30000,
        "backend_model": TAG,
        "queue_timeout_ms": queue_timeout_ms,
    }


# Two names for the same backend model, so one set of runners serves both runs: each name
# has its own slot counter, and the runs are one after the other. A budget of 100 never binds.
MODELS = {
    "models": {"gemma": _model(0), "gemma_wait": _model(5000)},
    "hosts": {"default": {"memory_budget": 100}},
}


@dataclass(frozen=True)
class Answered:
    """One 200, in wall-clock seconds (time.time(), the same clock in every process here):
    sent by the client, the emulator's answer began and ended (from the answer's own
    `created_at` and `total_duration`), and the answer reached the client."""

    client: int
    sent: float
    entered: float
    left: float
    done: float

    @property
    def wait(self) -> float:
        return self.entered - self.sent

    @property
    def service(self) -> float:
        return self.left - self.entered


@dataclass
class Completed:
    """One client's requests: its 200s, and the times its 429s arrived."""

    ok: list[Answered] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)


def _emulator_times(answer: dict[str, Any]) -> tuple[float, float]:
    """(answer began, answer ended) at the emulator, wall clock: Ollama's `created_at` is
    stamped as the answer is made, `total_duration` (ns) is the time since the request came."""
    ended = datetime.datetime.fromisoformat(answer["created_at"]).timestamp()
    return ended - answer["total_duration"] / 1e9, ended


def client_loop(
    index: int, url: str, model: str, stop: threading.Event, retry_pause_s: float, out: Completed
) -> None:
    body = {"model": model, "prompt": "hi", "stream": False}
    with http_client(timeout=30) as client:
        while not stop.is_set():
            sent = time.time()
            response = client.post(url, json=body)
            done = time.time()
            if response.status_code == 200:
                entered, left = _emulator_times(response.json())
                out.ok.append(Answered(index, sent, entered, left, done))
            elif response.status_code == 429:
                out.busy.append(done)
                stop.wait(retry_pause_s)
            else:
                raise RuntimeError(f"POST {url} answered {response.status_code}: {response.text}")


@dataclass(frozen=True)
class Outcome:
    utilization: float
    peak_in_flight: int
    started: float  # wall clock: the emulator's counters were reset
    window_end: float  # wall clock: the emulator's counters were read
    window_s: float
    per_client: list[int]  # 200s completed within the window, per client
    within: list[Answered]  # the 200s completed within the window
    answered: list[Answered]  # every 200, also those finished after the window (the plot)
    busy: int  # 429s within the window

    @property
    def service_s(self) -> float:
        """S: the emulator's mean answer time, measured (the 100 ms delay plus its own work)."""
        return sum(a.service for a in self.within) / len(self.within)

    def ideal_wait_s(self, clients: int) -> float:
        """Ideal FIFO wait of a closed loop: N clients on c slots, each answer taking S;
        each request waits while the N - c others are served, c at a time."""
        return (clients - SLOTS) * self.service_s / SLOTS

    def handoff_gaps(self) -> list[float]:
        """For every slot freed within the window, the time until the next answer began:
        with more clients than slots the k-th answer to begin takes the slot freed by the
        (k - c)-th to end."""
        enters = sorted(a.entered for a in self.answered)
        leaves = sorted(a.left for a in self.answered)
        return [
            enters[k] - leaves[k - SLOTS]
            for k in range(SLOTS, len(enters))
            if self.started <= leaves[k - SLOTS] and enters[k] <= self.window_end
        ]


def saturate(infra: Infra, runners: list[Runner], model: str, clients: int, seconds: float,
             retry_pause_s: float) -> Outcome:  # fmt: skip
    """Reset the emulator, hammer `model` for `seconds`, and read the emulator's counters
    while the clients are still running, so the window has no ramp-down tail."""
    emulator = infra.emulator
    emulator.reset()
    started = time.time()
    emulator.set_behaviour(TAG, "ok", delay_ms=SERVICE_MS)
    stop = threading.Event()
    results = [Completed() for _ in range(clients)]
    urls = [f"{runners[i % len(runners)].url}/api/generate" for i in range(clients)]
    threads = [
        threading.Thread(
            target=client_loop,
            args=(i, urls[i], model, stop, retry_pause_s, out),
            daemon=True,
        )
        for i, out in enumerate(results)
    ]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    window_end = time.time()
    stats = emulator.stats()
    stop.set()
    for thread in threads:
        thread.join(timeout=40)
    within = [[a for a in r.ok if a.done <= window_end] for r in results]
    return Outcome(
        utilization=stats["busy_time_s"][TAG] / (SLOTS * stats["elapsed_s"]),
        peak_in_flight=stats["peak_in_flight"][TAG],
        started=started,
        window_end=window_end,
        window_s=stats["elapsed_s"],
        per_client=[len(answers) for answers in within],
        within=[a for answers in within for a in answers],
        answered=[a for r in results for a in r.ok],
        busy=sum(1 for r in results for end in r.busy if end <= window_end),
    )


def warm_up(runners: list[Runner]) -> None:
    """First requests open each runner's connections to DynamoDB and the emulator."""
    for runner in runners:
        with http_client(timeout=10) as client:
            for model in MODELS["models"]:
                for _ in range(3):
                    client.post(
                        f"{runner.url}/api/generate",
                        json={"model": model, "prompt": "hi", "stream": False},
                    )


def _report(section: Section, label: str, outcome: Outcome, targeted: bool) -> None:
    section.add(
        f"{label}: slot utilization",
        f"{outcome.utilization:.1%}",
        f"≥ {TARGET_UTILIZATION:.0%}" if targeted else "",
        outcome.utilization >= TARGET_UTILIZATION if targeted else None,
    )
    section.add(
        f"{label}: peak in flight at the emulator",
        str(outcome.peak_in_flight),
        f"≤ {SLOTS}",
        outcome.peak_in_flight <= SLOTS,
    )
    section.add(
        f"{label}: answered 200 / 429 in {outcome.window_s:.1f} s",
        f"{len(outcome.within)} / {outcome.busy}",
    )


def _fairness(section: Section, outcome: Outcome, clients: int) -> None:
    low, high = min(outcome.per_client), max(outcome.per_client)
    ratio = high / low if low else float("inf")
    section.add(
        "with waiting: completed requests per client, max / min",
        f"{ratio:.2f} ({high} / {low}; all: {' '.join(map(str, outcome.per_client))})",
        f"≤ {TARGET_FAIRNESS:g}",
        ratio <= TARGET_FAIRNESS,
    )
    waits = [a.wait for a in outcome.within]
    ideal = outcome.ideal_wait_s(clients)
    p50, p99 = percentile(waits, 50), percentile(waits, 99)
    section.add(
        "with waiting: wait p99 / ideal FIFO wait",
        f"{p99 / ideal:.2f} ({p99 * 1000:.0f} ms / {ideal * 1000:.0f} ms)",
        f"≤ {TARGET_WAIT_P99:g}",
        p99 <= TARGET_WAIT_P99 * ideal,
    )
    section.add(
        "with waiting: wait p50 / p99 / max",
        f"{p50 * 1000:.0f} / {p99 * 1000:.0f} / {max(waits) * 1000:.0f} ms",
    )
    section.add(
        f"with waiting: ideal FIFO wait (N - c) x S / c, N = {clients}, c = {SLOTS}",
        f"{ideal * 1000:.0f} ms (S = {outcome.service_s * 1000:.1f} ms, the emulator's mean "
        "answer time as measured)",
    )
    gaps = outcome.handoff_gaps()
    gap = median(gaps)
    section.add(
        "with waiting: slot handoff gap (an answer ends → the next begins), p50 / p99",
        f"{gap * 1000:.1f} / {percentile(gaps, 99) * 1000:.1f} ms ({len(gaps)} handoffs)",
    )
    with_gap = (clients - SLOTS) * (outcome.service_s + gap) / SLOTS
    section.add(
        "with waiting: FIFO wait if each slot also idles the gap p50, (N - c) x (S + gap) / c; "
        "wait p99 / it",
        f"{with_gap * 1000:.0f} ms; {p99 / with_gap:.2f}",
    )


def run(infra: Infra, scale: Scale, memory: MemoryLog) -> Section:
    section = Section(4, "Slot utilization and fairness under saturation")
    infra.dynamodb.reset_tables()
    models_file = write_models_file(infra.tmp, "utilization-models.json", MODELS)
    env = {
        "OLLAMA_URL": infra.emulator.url,
        "AWS_ENDPOINT_URL_DYNAMODB": infra.strict_dynamodb.url,  # conflicts as on DynamoDB
        "HERMES_MODELS_FILE": str(models_file),
    }
    with ExitStack() as stack:
        print(f"  starting {scale.runners} runners on one DynamoDB Local", flush=True)
        runners = [Runner(env) for _ in range(scale.runners)]
        for runner in runners:
            stack.callback(runner.stop)
        _start_all(runners)
        warm_up(runners)

        clients, seconds = scale.saturation_clients, scale.saturation_s
        no_wait = saturate(infra, runners, "gemma", clients, seconds, RETRY_PAUSE_S)
        _report(section, "without waiting", no_wait, targeted=False)
        load_before = load_average()
        waiting = saturate(infra, runners, "gemma_wait", clients, seconds, 0)
        load_after = load_average()
        _report(section, "with waiting", waiting, targeted=True)
        _fairness(section, waiting, clients)
        section.add(
            "with waiting: load average (1 min) of the machine before / after the run",
            f"{load_before} / {load_after} on {len(os.sched_getaffinity(0))} CPUs",
        )

        peaks = [runner.peak_rss_mb() for runner in runners]
        per_runner = ", ".join(f"{p:.1f}" for p in peaks)
        memory.record("runners after section 4 (largest)", max(peaks), f"each: {per_runner} MB")

    plot = plot_fairness(
        Path(infra.output_dir) / PLOT,
        waiting.answered,
        waiting.started,
        waiting.window_end,
        SLOTS,
        waiting.ideal_wait_s(clients),
        f"{clients} closed-loop clients over {scale.runners} runners, max_concurrency {SLOTS}, "
        f"{SERVICE_MS} ms answers, waiting on",
    )
    print(f"  plot: {plot}", flush=True)
    section.extra_markdown = (
        f"![Wait per request and requests in flight at the emulator over time]({plot.name})\n\n"
        f"`{plot.name}`, the run with waiting: above, each request's wait (coloured by client) "
        "at the time it was sent, with the ideal FIFO wait and the target; below, the requests "
        f"in flight at the emulator (from each answer's own start and end), with the limit of "
        f"{SLOTS}. The grey band is past the measured window (the clients' last answers)."
    )
    section.note(
        f"{scale.runners} runner processes sharing one DynamoDB Local; {clients} closed-loop "
        f"client threads (spread over the runners) call one model with max_concurrency {SLOTS} "
        f"for {seconds:g} s per run; the emulator takes {SERVICE_MS} ms per answer. Utilization "
        f"= emulator busy_time_s[{TAG}] / ({SLOTS} x elapsed_s), read while the clients still "
        "run. Requests go to Hermes' Ollama-compatible POST /api/generate "
        '(`{"model": "gemma_wait", "prompt": "hi", "stream": false}`): the same admission as '
        "POST /v1/llm (HermesService.complete), and the answer keeps the emulator's own "
        "`created_at` and `total_duration`, so the client learns when the emulator began and "
        "ended each answer."
    )
    section.note(
        "Without waiting: queue_timeout_ms 0, Hermes answers 429 at once and the client sleeps "
        f"{RETRY_PAUSE_S * 1000:.0f} ms before retrying. With waiting: queue_timeout_ms 5000 "
        "(the limiter's FIFO queue: a ticket, then a handoff in the holder's release); clients "
        "just loop."
    )
    section.note(
        "Wait = when the emulator began the answer (its `created_at` less its `total_duration`) "
        "minus when the client sent the request, both wall clock on this machine: the HTTP "
        "request to Hermes, admission (queueing included) and Hermes' call to the emulator up "
        "to its start, so about 1-2 ms more than admission alone. Ideal FIFO wait of a closed "
        "loop of N clients on c slots with service time S: each request waits while the N - c "
        "others are served, c at a time: (N - c) x S / c, with S the emulator's mean answer "
        "time measured in the same window (end - start of each answer), not the nominal "
        f"{SERVICE_MS} ms. Completed requests per client and wait percentiles count the 200s "
        "that reached their client within the window."
    )
    section.note(
        "Slot handoff gap: with more clients than slots, the k-th answer to begin takes the "
        f"slot freed by the (k - {SLOTS})-th to end; the gap between the two is what a slot "
        "idles per handoff (release transaction, the next waiter learning of its grant, its "
        "call to the emulator). Utilization ≈ S / (S + gap). The FIFO wait with that gap "
        "separates the order of service (how far p99 is above it) from the idle slot time "
        "(how far it is above the ideal)."
    )
    return section


def _start_all(runners: list[Runner]) -> None:
    """Start the runners together (each takes seconds to import and build its apps), all
    from this thread: a runner dies with the thread that started it."""
    for runner in runners:
        runner.launch()
    for runner in runners:
        runner.ready()
