"""Section 8: admission on a store as strict as real DynamoDB (tests/support/conflict_store.py:
a transaction holds its items for its commit, 10 ms, and overlapping ones are cancelled),
against the same store with nothing cancelled and against plain DynamoDB Local, which
serializes transactions.

1. Saturation (issue 18, item 2): 3 runners, one host, two models with max_concurrency 6
   each, 300 ms answers, 30 closed-loop clients with waiting on: every answer's status, the
   peak in flight per model at the emulator, and slot utilization with and without conflicts.
2. Ceiling: admissions per second one host sustains for 1, 10 and 100 concurrent callers
   (each its own Limiter: one Lambda instance), each an admission and a release in a loop on
   a model whose capacity never binds, and where refusals (429 "contended") or 503s start.

    .venv/bin/python -m bench.run --only conflicts
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.plot import plot_ceiling
from bench.procs import Infra, Runner, dynamodb_client, http_client, write_models_file
from bench.report import Section
from bench.scale import Scale
from hermes.errors import HermesError, HostBusy, LimiterUnavailable, ModelBusy
from hermes.limiter import Counter, Limiter
from tests.support.conflict_store import ConflictingDynamoDB

SERVICE_MS = 300
SLOTS = 6
CLIENTS = 30
TAGS = {"gemma": "gemma3:1b", "mistral": "mistral:7b"}
COMMIT_S = 0.010
TARGET_RATIO = 0.9  # utilization with conflicts / without
CEILING_CALLERS = (1, 10, 100)
CEILING_TARGET = 100  # admissions per second per host
PLOT = "conflicts.png"
SETTLE_S = 1.0  # after a window's setting changes, before it is measured
ROUNDS = 4  # alternating windows with and without cancellations, each


def _model(tag: str) -> dict[str, object]:
    return {
        "max_concurrency": SLOTS,
        "memory_cost": "medium",
        "timeout": 30000,
        "backend_model": tag,
        "queue_timeout_ms": 10000,
    }


MODELS = {
    "models": {name: _model(tag) for name, tag in TAGS.items()},
    "hosts": {"default": {"memory_budget": 100}},  # never binds: the slots do
}


@dataclass
class Load:
    """What one saturation run saw."""

    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    utilization: float = 0.0
    peak: dict[str, int] = field(default_factory=dict)
    window_s: float = 0.0
    answered: int = 0
    transactions: int = 0
    conflicts: int = 0


def saturate(infra: Infra, store_url: str, seconds: float, runners: int = 3) -> Load:
    """One saturation run of `seconds` on `store_url` (see `saturate_windows`)."""
    return saturate_windows(infra, store_url, [("run", seconds, None)], runners)["run"]


Window = tuple[str, float, Callable[[], None] | None]  # label, seconds, what to set first


def saturate_windows(
    infra: Infra, store_url: str, windows: list[Window], runners: int = 3
) -> dict[str, Load]:
    """Start `runners` on `store_url`, warm them up, run CLIENTS closed-loop clients (half on
    each model, spread over the runners), and measure each window in turn: its setup is
    called, the load settles for SETTLE_S, then the emulator's busy time over the window
    gives its utilization. Windows with the same label add up, so alternating two settings
    lets the machine's drift fall on both alike."""
    infra.dynamodb.reset_tables()
    models_file = write_models_file(infra.tmp, "conflicts-models.json", MODELS)
    env = {
        "OLLAMA_URL": infra.emulator.url,
        "AWS_ENDPOINT_URL_DYNAMODB": store_url,
        "HERMES_MODELS_FILE": str(models_file),
    }
    loads = {label: Load() for label, _, _ in windows}
    busy = {label: 0.0 for label in loads}
    current: list[Load | None] = [None]  # where answers are counted (None: settling)
    with ExitStack() as stack:
        started = [Runner(env) for _ in range(runners)]
        for runner in started:
            stack.callback(runner.stop)
            runner.launch()
        for runner in started:
            runner.ready()
        for runner in started:  # first requests open each runner's connections
            with http_client(timeout=30) as client:
                for model in TAGS:
                    client.post(f"{runner.url}/v1/llm/{model}", json={"prompt": "warm"})
        emulator = infra.emulator
        emulator.reset()
        for tag in TAGS.values():
            emulator.set_behaviour(tag, "ok", delay_ms=SERVICE_MS)
        stop = threading.Event()
        lock = threading.Lock()

        def client_loop(index: int) -> None:
            model = list(TAGS)[index % len(TAGS)]
            url = f"{started[index % len(started)].url}/v1/llm/{model}"
            with http_client(timeout=60) as client:
                while not stop.is_set():
                    response = client.post(url, json={"prompt": "hi"})
                    with lock:
                        load = current[0]
                        if load is None:
                            continue
                        load.statuses[response.status_code] += 1
                        if response.status_code != 200:
                            load.errors[response.json().get("error", "")[:80]] += 1

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for label, seconds, setup in windows:
            with lock:
                current[0] = None
            if setup is not None:
                setup()
            time.sleep(SETTLE_S)
            before = emulator.stats()
            with lock:
                current[0] = loads[label]
            time.sleep(seconds)
            after = emulator.stats()
            loads[label].window_s += after["elapsed_s"] - before["elapsed_s"]
            busy[label] += sum(
                after["busy_time_s"].get(tag, 0.0) - before["busy_time_s"].get(tag, 0.0)
                for tag in TAGS.values()
            )
        with lock:
            current[0] = None
        stats = emulator.stats()
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    for label, load in loads.items():
        load.utilization = busy[label] / (SLOTS * len(TAGS) * load.window_s)
        # The peak over the whole run: every window's is at most this.
        load.peak = {model: stats["peak_in_flight"].get(tag, 0) for model, tag in TAGS.items()}
        load.answered = load.statuses[200]
    return loads


@dataclass
class Ceiling:
    callers: int
    admitted: int
    busy: int
    unavailable: int
    seconds: float
    conflicts: int = 0

    @property
    def per_s(self) -> float:
        return self.admitted / self.seconds


def _loop(callers: int, seconds: float, caller: Callable[[], Callable[[], str]]) -> Ceiling:
    """`callers` threads, each calling its own `caller()` (one admission and release; it
    answers "admitted", "busy" or "unavailable") as fast as it can for `seconds`."""
    tally = collections.Counter[str]()
    lock = threading.Lock()
    stop = threading.Event()

    def run_one() -> None:
        once = caller()
        while not stop.is_set():
            outcome = once()
            with lock:
                tally[outcome] += 1

    threads = [threading.Thread(target=run_one) for _ in range(callers)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    elapsed = time.monotonic() - started
    return Ceiling(callers, tally["admitted"], tally["busy"], tally["unavailable"], elapsed)


def ceiling(endpoint_url: str, callers: int, seconds: float) -> Ceiling:
    """Each caller its own Limiter (a Lambda instance) on one shared client, admitting and
    releasing on one host."""
    ddb = dynamodb_client(endpoint_url)
    counters = [
        Counter("inflight_wide", 100_000, 1, ModelBusy, "model 'wide'"),
        Counter("memory", 100_000, 1, HostBusy, "the memory budget of host 'bench'"),
    ]
    pool = f"host#ceiling-{callers}-{time.monotonic_ns()}"

    def caller() -> Callable[[], str]:
        limiter = Limiter(ddb, "LeaseTable", notice_poller=False)

        def once() -> str:
            try:
                lease = limiter.acquire(pool, counters, 30_000)
            except LimiterUnavailable:
                return "unavailable"
            except HermesError:
                return "busy"
            limiter.release(lease)
            return "admitted"

        return once

    return _loop(callers, seconds, caller)


def single_writes(endpoint_url: str, callers: int, seconds: float) -> Ceiling:
    """The baseline of docs/design/conflicts.md §4: each caller does what a direct admission
    and release would be there, two single-item conditional UpdateItems on one item (add
    within a capacity, then subtract), which hold nothing for a commit."""
    ddb = dynamodb_client(endpoint_url)
    key = {"pk": {"S": f"host#single-{callers}-{time.monotonic_ns()}"}, "sk": {"S": "state"}}

    def write(delta: int) -> bool:
        try:
            ddb.update_item(
                TableName="LeaseTable",
                Key=key,
                UpdateExpression="SET c = if_not_exists(c, :zero) + :d",
                ConditionExpression="attribute_not_exists(c) OR c <= :room",
                ExpressionAttributeValues={
                    ":d": {"N": str(delta)},
                    ":zero": {"N": "0"},
                    ":room": {"N": "99999"},
                },
            )
            return True
        except Exception:  # a conflict with a transaction, throttling: counted as busy
            return False

    return _loop(callers, seconds, lambda: lambda: "admitted" if write(1) and write(-1) else "busy")


def run(infra: Infra, scale: Scale, _: Any) -> Section:
    section = Section(8, "Admission under transaction conflicts (a store as strict as DynamoDB)")
    seconds = 20.0 if scale.saturation_s >= 10 else 8.0
    with ConflictingDynamoDB(infra.dynamodb.url, commit_s=COMMIT_S) as store:
        print(
            f"  saturation, {CLIENTS} clients: {ROUNDS} x {seconds / ROUNDS:g} s with "
            "cancellations and without, alternating, on the conflict-faithful store",
            flush=True,
        )
        # Transactions forwarded while cancellations were on (store counters are cumulative).
        marks = {"at": 0, "strict": 0}

        def setting(cancels: bool) -> Callable[[], None]:
            def apply() -> None:
                now = store.transactions_forwarded
                if store.cancels:
                    marks["strict"] += now - marks["at"]
                marks["at"] = now
                store.cancels = cancels

            return apply

        windows: list[Window] = []
        for _ in range(ROUNDS):
            windows += [
                ("conflicts", seconds / ROUNDS, setting(True)),
                ("no cancellations", seconds / ROUNDS, setting(False)),
            ]
        store.reset()
        loads = saturate_windows(infra, store.url, windows)
        setting(True)()
        strict, same = loads["conflicts"], loads["no cancellations"]
        strict.transactions = marks["strict"]
        strict.conflicts = sum(store.conflicts.values())  # none while cancellations are off
        print("  saturation: plain DynamoDB Local", flush=True)
        plain = saturate(infra, infra.dynamodb.url, seconds / 2)
        _report_saturation(section, strict, same, plain)
        series: dict[str, list[float]] = {
            "Limiter, strict store": [],
            "Limiter, plain DynamoDB Local": [],
            "2 bare UpdateItems, strict store (the store's own ceiling)": [],
        }
        for callers in CEILING_CALLERS:
            store.reset()
            strict_ceiling = ceiling(store.url, callers, scale.contended_s * 2)
            strict_ceiling.conflicts = sum(store.conflicts.values())
            plain_ceiling = ceiling(infra.dynamodb.url, callers, scale.contended_s * 2)
            _report_ceiling(section, strict_ceiling, plain_ceiling)
            single = single_writes(store.url, callers, scale.contended_s * 2)
            for line, result in zip(series, (strict_ceiling, plain_ceiling, single), strict=True):
                series[line].append(result.per_s)
            section.add(
                f"ceiling, {callers} caller(s), strict store, two bare UpdateItems (the shape of "
                "admit + release, no limiter around them): pairs/s (failed)",
                f"{single.per_s:.0f} ({single.busy})",
            )
    plot = plot_ceiling(
        Path(infra.output_dir) / PLOT,
        CEILING_CALLERS,
        series,
        CEILING_TARGET,
        f"One host's admissions/s; strict store: {COMMIT_S * 1000:.0f} ms commits, "
        "overlapping transactions cancelled",
    )
    print(f"  plot: {plot}", flush=True)
    section.extra_markdown = (
        f"![Admissions per second per host against concurrent callers]({plot.name})\n\n"
        f"`{plot.name}`: the ceiling rows as lines. Admission and release are single-item "
        "conditional writes of the host's state item, which no transaction holds while nobody "
        "waits: the limiter follows the store's own ceiling (two bare UpdateItems) instead of "
        "the plateau of one transaction per admission (31-37/s before, bench history)."
    )
    section.note(
        f"Saturation: 3 runner processes (Lambda instances) on one host; gemma and mistral with "
        f"max_concurrency {SLOTS} each, queue_timeout_ms 10000; the emulator answers in "
        f"{SERVICE_MS} ms; {CLIENTS} closed-loop clients (15 per model) POST /v1/llm. On the "
        f"conflict-faithful store, {ROUNDS} windows of {seconds / ROUNDS:g} s with "
        f"cancellations alternate with {ROUNDS} without (the same runners and clients "
        f"throughout, {SETTLE_S:g} s to settle after each switch, answers counted per window), "
        "so the machine's drift falls on both alike; plain DynamoDB Local gets one run of "
        f"{seconds / 2:g} s. Utilization = the emulator's busy time of both models / "
        f"({2 * SLOTS} slots x the window). The conflicting store holds a transaction's items "
        f"for its {COMMIT_S * 1000:.0f} ms commit from its arrival and cancels overlapping "
        "transactions (TransactionConflict), as DynamoDB does. 'No cancellations' is the same "
        "store, process and commit time with nothing cancelled: the run without conflicts "
        "that the target compares with (the proxy's own CPU and latency cancel out). Plain "
        "DynamoDB Local serializes transactions and has no proxy in front."
    )
    section.note(
        "Ceiling: N threads in one process, each with a Limiter of its own (one Lambda "
        "instance each, as with N concurrent invocations), one shared botocore client, "
        "acquire + release in a loop on a model whose capacity (100,000) never binds: every "
        "refusal is contention (429 'contended'), every 503 a failure. The figure is the "
        "admissions per second that host sustained; each admission is two conditional "
        "UpdateItems of the host's state item (admit, release). The bare rows are the same "
        "loop as two conditional UpdateItems on one item with no limiter around them (add "
        "within a capacity, subtract): the store's own ceiling on this machine, the "
        "baseline the limiter is compared with in the same run."
    )
    return section


def _report_saturation(section: Section, strict: Load, same: Load, plain: Load) -> None:
    runs = (("conflicts", strict), ("no cancellations", same), ("DynamoDB Local", plain))
    for label, load in runs:
        others = {k: v for k, v in load.statuses.items() if k != 200}
        section.add(
            f"saturation, {label}: answers 200 / other",
            f"{load.statuses[200]} / {sum(others.values())} {dict(others) or ''}".rstrip(),
            "every answer 200" if label == "conflicts" else "",
            (not others) if label == "conflicts" else None,
        )
        section.add(
            f"saturation, {label}: peak in flight per model",
            ", ".join(f"{m} {p}" for m, p in load.peak.items()),
            f"<= {SLOTS}",
            all(p <= SLOTS for p in load.peak.values()),
        )
        section.add(f"saturation, {label}: slot utilization", f"{load.utilization:.1%}")
        for error, count in load.errors.most_common(3):
            section.note(f"saturation, {label}: {count} x '{error}'")
    ratio = strict.utilization / same.utilization if same.utilization else 0.0
    section.add(
        "saturation: utilization with conflicts / the same store without cancellations",
        f"{ratio:.2f}",
        f">= {TARGET_RATIO}",
        ratio >= TARGET_RATIO,
    )
    section.add(
        "saturation: utilization with conflicts / plain DynamoDB Local (no proxy, no commit time)",
        f"{strict.utilization / plain.utilization if plain.utilization else 0.0:.2f}",
    )
    share = strict.conflicts / max(strict.transactions + strict.conflicts, 1)
    section.add(
        "saturation, conflicts: transactions cancelled by a conflict",
        f"{strict.conflicts} of {strict.transactions + strict.conflicts} ({share:.0%})",
    )


def _report_ceiling(section: Section, strict: Ceiling, plain: Ceiling) -> None:
    for label, result in (("conflicts", strict), ("DynamoDB Local", plain)):
        extra = f", {result.conflicts} conflicts" if label == "conflicts" else ""
        section.add(
            f"ceiling, {result.callers} caller(s), {label}: admissions/s (429 / 503)",
            f"{result.per_s:.0f} ({result.busy} / {result.unavailable}{extra})",
            f">= {CEILING_TARGET}" if label == "conflicts" and result.callers == 100 else "",
            result.per_s >= CEILING_TARGET
            if label == "conflicts" and result.callers == 100
            else None,
        )
