"""Section 7: a model pool over several GPU hosts (issue 13). Hermes' placement (residency:
what is loaded where, shared in DynamoDB) against random placement (LiteLLM's default
simple-shuffle) and round robin, on the identical seeded request sequence.

Three emulated Ollama hosts that each keep at most 2 models loaded (a load takes
LOAD_DELAY_MS, an answer ANSWER_MS), five models served by all three, a skewed workload (two
hot models, three cold) from client threads (a seeded pause before each request) spread over
three runner processes that share one DynamoDB Local. Per strategy the runners are restarted
with HERMES_PLACEMENT, the lease table is emptied and every emulator unloads everything and
zeroes its counters.

Phase 1 measures model loads (the emulators' own count) per 1,000 requests and latency.
Phase 2 goes on with another seeded sequence and kills one host (SIGKILL: open connections are
reset) when half of it has been answered, and counts the requests that failed."""

from __future__ import annotations

import os
import random
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.memory import MemoryLog
from bench.plot import plot_placement
from bench.procs import Infra, Runner, http_client, write_models_file
from bench.report import Section, load_average
from bench.scale import QUICK, Scale
from bench.stats import percentile
from tests.support.emulator_process import EmulatorProcess

SEED = 13
HOSTS = ("gpu1", "gpu2", "gpu3")
# name: (backend tag, share of the requests). Two hot models, three cold.
MODELS: dict[str, tuple[str, float]] = {
    "hot_a": ("hot-a:7b", 0.40),
    "hot_b": ("hot-b:7b", 0.30),
    "cold_c": ("cold-c:7b", 0.10),
    "cold_d": ("cold-d:7b", 0.10),
    "cold_e": ("cold-e:7b", 0.10),
}
MAX_LOADED_MODELS = 2
LOAD_DELAY_MS = 400
ANSWER_MS = 75
MAX_CONCURRENCY = 2
# Each client pauses before each request (seeded, exponential with this mean): interactive
# callers, so the hot models' slots are not saturated and latency shows placement, not the
# queue of a saturated model (section 4 measures that).
THINK_MS = 200
QUEUE_TIMEOUT_MS = 2000
COOLDOWN_S = 5
KILLED = "gpu1"  # the first host listed: residency's tie-break puts the most there
STRATEGIES = ("residency", "random", "round_robin")
TARGET_LOAD_RATIO = 1 / 3  # Hermes' loads at most a third of random's
PLOT = "placement.png"


@dataclass(frozen=True)
class Plan:
    clients: int
    measured_per_client: int  # phase 1
    kill_per_client: int  # phase 2


FULL_PLAN = Plan(clients=8, measured_per_client=60, kill_per_client=30)
QUICK_PLAN = Plan(clients=8, measured_per_client=12, kill_per_client=6)


@dataclass(frozen=True)
class Call:
    """One request as its client saw it (wall clock)."""

    client: int
    model: str
    sent: float
    done: float
    status: int  # 0: no HTTP answer at all
    error: str = ""

    @property
    def latency(self) -> float:
        return self.done - self.sent

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Killed:
    """Phase 2: the host killed halfway, and what the clients saw."""

    calls: list[Call]
    killed_at: float
    url: str
    circuit_soon: str  # as /v1/status showed it 1 s after the kill
    circuit: str  # … and right after the phase

    @property
    def failed(self) -> list[Call]:
        return [c for c in self.calls if not c.ok]

    def mid_answer_on_killed(self, call: Call) -> bool:
        """Under way when the host died, and the error names that host: its answer was cut
        (a non-streamed request has sent no byte to its caller, so Hermes may retry it)."""
        return call.sent <= self.killed_at <= call.done and self.url in call.error

    @property
    def not_mid_answer(self) -> list[Call]:
        return [c for c in self.failed if not self.mid_answer_on_killed(c)]

    @property
    def in_flight_at_kill(self) -> int:
        return sum(1 for c in self.calls if c.sent <= self.killed_at <= c.done)


@dataclass
class Outcome:
    strategy: str
    calls: list[Call]
    wall_s: float
    loads: dict[str, dict[str, int]]  # host: {tag: loads}
    evictions: int
    requests: dict[str, int]  # host: requests the emulator answered
    resident: dict[str, list[str]]  # host: tags loaded at the end (the emulator)
    believed: dict[str, list[str]]  # host: resident_models in /v1/status (Hermes' view)
    killed: Killed | None = None
    load_times: list[float] = field(default_factory=list)

    @property
    def ok(self) -> list[Call]:
        return [c for c in self.calls if c.ok]

    @property
    def total_loads(self) -> int:
        return sum(sum(per.values()) for per in self.loads.values())

    @property
    def loads_per_1000(self) -> float:
        return 1000 * self.total_loads / len(self.calls)

    def latency_ms(self, q: float) -> float:
        return percentile([c.latency for c in self.ok], q) * 1000


def models_config(emulators: dict[str, EmulatorProcess]) -> dict[str, Any]:
    model = {
        "max_concurrency": MAX_CONCURRENCY,
        "memory_cost": "low",
        "timeout": 30000,
        "hosts": list(HOSTS),
        "queue_timeout_ms": QUEUE_TIMEOUT_MS,
    }
    return {
        "models": {name: {**model, "backend_model": tag} for name, (tag, _) in MODELS.items()},
        "hosts": {
            host: {"memory_budget": 8, "url": emu.url, "max_loaded_models": MAX_LOADED_MODELS}
            for host, emu in emulators.items()
        },
    }


Work = list[list[tuple[str, float]]]  # per client: (model, pause before it in s), in order


def sequences(seed: int, clients: int, per_client: int) -> Work:
    """Each client's requests, in order: the same lists for every strategy."""
    rng = random.Random(seed)
    names = list(MODELS)
    weights = [share for _, share in MODELS.values()]
    return [
        [(rng.choices(names, weights)[0], rng.expovariate(1000 / THINK_MS)) for _ in range(n)]
        for n in [per_client] * clients
    ]


def drive(runners: list[Runner], work: Work, answered: list[int]) -> list[Call]:
    """Closed-loop clients, client i on runner i mod 3, each sending its list in order
    (POST /api/generate, not streamed) after each pause. `answered[0]` counts the answers
    as they come."""
    calls: list[list[Call]] = [[] for _ in work]
    lock = threading.Lock()

    def client(index: int) -> None:
        url = f"{runners[index % len(runners)].url}/api/generate"
        with http_client(timeout=60) as http:
            for model, pause_s in work[index]:
                time.sleep(pause_s)
                body = {"model": model, "prompt": "hi", "stream": False}
                sent = time.time()
                try:
                    response = http.post(url, json=body)
                    status, error = response.status_code, ""
                    if status != 200:
                        error = response.text[:300]
                except Exception as exc:  # a runner that died: counted, not raised
                    status, error = 0, repr(exc)
                calls[index].append(Call(index, model, sent, time.time(), status, error))
                with lock:
                    answered[0] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return [c for per in calls for c in per]


def status(runner: Runner) -> dict[str, Any]:
    with http_client(timeout=10) as http:
        return http.get(f"{runner.url}/v1/status").json()  # type: ignore[no-any-return]


def hermes_view(runner: Runner) -> tuple[dict[str, list[str]], dict[str, str]]:
    """What placement believes per host: resident models and circuit (/v1/status)."""
    hosts = status(runner)["hosts"]
    return (
        {h["name"]: list(h.get("resident_models") or []) for h in hosts},
        {h["name"]: str(h.get("circuit")) for h in hosts},
    )


def start_emulators(stack: ExitStack) -> dict[str, EmulatorProcess]:
    tags = ",".join(tag for tag, _ in MODELS.values())
    emulators = {}
    for host in HOSTS:
        emu = EmulatorProcess(max_loaded_models=MAX_LOADED_MODELS, load_delay_ms=LOAD_DELAY_MS)
        emu.command += ["--models", tags]  # the last --models wins
        emulators[host] = stack.enter_context(emu)
    return emulators


def reset_emulators(emulators: dict[str, EmulatorProcess]) -> None:
    for emu in emulators.values():
        emu.reset()  # counters zeroed, every model unloaded, behaviours cleared
        emu.set_behaviour("*", "ok", delay_ms=ANSWER_MS)


def run_strategy(
    infra: Infra,
    emulators: dict[str, EmulatorProcess],
    models_file: Path,
    strategy: str,
    plan: Plan,
) -> Outcome:
    infra.dynamodb.reset_tables()  # an empty lease table: no residency, counts or circuits
    reset_emulators(emulators)
    env = {
        "OLLAMA_URL": emulators[HOSTS[0]].url,
        "AWS_ENDPOINT_URL_DYNAMODB": infra.dynamodb.url,
        "HERMES_MODELS_FILE": str(models_file),
        "HERMES_PLACEMENT": strategy,
        "HERMES_CIRCUIT_COOLDOWN_S": str(COOLDOWN_S),
    }
    with ExitStack() as stack:
        runners = [Runner(env) for _ in range(3)]
        for runner in runners:
            stack.callback(runner.stop)
        for runner in runners:
            runner.launch()
        for runner in runners:
            runner.ready()

        work = sequences(SEED, plan.clients, plan.measured_per_client)
        started = time.monotonic()
        calls = drive(runners, work, [0])
        wall_s = time.monotonic() - started
        stats = {host: emu.stats() for host, emu in emulators.items()}
        believed, _ = hermes_view(runners[0])
        outcome = Outcome(
            strategy=strategy,
            calls=calls,
            wall_s=wall_s,
            loads={h: dict(s.get("loads", {})) for h, s in stats.items()},
            evictions=sum(sum(s.get("evictions", {}).values()) for s in stats.values()),
            requests={h: sum(s.get("requests", {}).values()) for h, s in stats.items()},
            resident={h: list(s.get("resident", [])) for h, s in stats.items()},
            believed=believed,
        )
        outcome.killed = kill_phase(runners, emulators[KILLED], plan)
    emulators[KILLED].restart()  # back, empty, for the next strategy
    return outcome


def kill_phase(runners: list[Runner], victim: EmulatorProcess, plan: Plan) -> Killed:
    """Another seeded sequence; the host dies once half of it has been answered."""
    work = sequences(SEED + 1, plan.clients, plan.kill_per_client)
    half = plan.clients * plan.kill_per_client // 2
    answered = [0]
    killed_at = [0.0]
    soon = ["unknown"]
    done = threading.Event()

    def killer() -> None:
        while answered[0] < half and not done.is_set():
            time.sleep(0.005)
        killed_at[0] = time.time()
        victim.kill()
        time.sleep(1)
        soon[0] = hermes_view(runners[1])[1][KILLED]

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    calls = drive(runners, work, answered)
    done.set()
    thread.join()
    _, circuits = hermes_view(runners[0])
    return Killed(calls, killed_at[0], victim.url, soon[0], circuits[KILLED])


def _fmt_hosts(per_host: dict[str, list[str]]) -> str:
    return "; ".join(f"{h}: {', '.join(sorted(m)) or '—'}" for h, m in sorted(per_host.items()))


def run(infra: Infra, scale: Scale, memory: MemoryLog) -> Section:
    section = Section(7, "Model placement across hosts")
    plan = QUICK_PLAN if scale == QUICK else FULL_PLAN
    outcomes: dict[str, Outcome] = {}
    load_before = load_average()
    with ExitStack() as stack:
        print(f"  starting {len(HOSTS)} emulated hosts", flush=True)
        emulators = start_emulators(stack)
        config = models_config(emulators)
        models_file = write_models_file(infra.tmp, "placement-models.json", config)
        for strategy in STRATEGIES:
            print(f"  {strategy}: 3 runners, {plan.clients} clients", flush=True)
            outcome = outcomes[strategy] = run_strategy(
                infra, emulators, models_file, strategy, plan
            )
            _print_outcome(outcome)
    load_after = load_average()
    _report(section, outcomes)
    section.add(
        "load average (1 min) of the machine before / after the section",
        f"{load_before} / {load_after} on {len(os.sched_getaffinity(0))} CPUs",
    )
    plot = plot_placement(
        Path(infra.output_dir) / PLOT,
        {s: [c.latency for c in o.ok] for s, o in outcomes.items()},
        {s: o.loads_per_1000 for s, o in outcomes.items()},
        f"3 hosts x {MAX_LOADED_MODELS} loaded models, 5 models (2 hot, 3 cold), "
        f"{plan.clients} clients over 3 runners; load {LOAD_DELAY_MS} ms, answer {ANSWER_MS} ms",
    )
    print(f"  plot: {plot}", flush=True)
    section.extra_markdown = (
        f"![Model loads per 1,000 requests and latency per placement strategy]({plot.name})\n\n"
        f"`{plot.name}`: left, model loads per 1,000 requests (the emulators' own count); "
        "middle, p50 and p95 latency as the clients measured it; right, the latency "
        "distribution of every answered request of phase 1."
    )
    _notes(section, plan)
    return section


def _print_outcome(o: Outcome) -> None:
    loads = ", ".join(f"{h} {sum(v.values())}" for h, v in sorted(o.loads.items()))
    print(
        f"    {len(o.calls)} requests in {o.wall_s:.1f} s: {o.total_loads} loads ({loads}), "
        f"{o.evictions} evictions, p50 {o.latency_ms(50):.0f} ms, p95 {o.latency_ms(95):.0f} ms, "
        f"{len(o.calls) - len(o.ok)} failed",
        flush=True,
    )
    for call in [c for c in o.calls if not c.ok][:3]:
        print(f"      failed: {call.status} {call.model}: {call.error[:200]}", flush=True)
    print(f"    answered per host: {o.requests}", flush=True)
    print(f"    loads per host: {o.loads}", flush=True)
    print(f"    loaded at the end (emulators): {_fmt_hosts(o.resident)}", flush=True)
    print(f"    resident_models in /v1/status: {_fmt_hosts(o.believed)}", flush=True)
    if o.killed is not None:
        k = o.killed
        print(
            f"    kill {KILLED}: {len(k.calls)} requests, {len(k.failed)} failed "
            f"({len(k.not_mid_answer)} not mid-answer on {KILLED}); "
            f"{k.in_flight_at_kill} in flight at the kill; circuit 1 s after the kill: "
            f"{k.circuit_soon}, at the end: {k.circuit}",
            flush=True,
        )
        for call in k.failed[:5]:
            print(f"      {call.status} {call.model}: {call.error[:200]}", flush=True)


def _report(section: Section, outcomes: dict[str, Outcome]) -> None:
    hermes, rand, rr = outcomes["residency"], outcomes["random"], outcomes["round_robin"]
    for o in outcomes.values():
        section.add(
            f"{o.strategy}: model loads per 1,000 requests",
            f"{o.loads_per_1000:.1f} ({o.total_loads} loads, {o.evictions} evictions, "
            f"{len(o.calls)} requests in {o.wall_s:.1f} s)",
        )
    ratio = hermes.loads_per_1000 / rand.loads_per_1000 if rand.total_loads else float("inf")
    section.add(
        "residency: model loads / random's",
        f"{ratio:.2f} ({hermes.loads_per_1000:.1f} / {rand.loads_per_1000:.1f} per 1,000)",
        "≤ 0.33",
        ratio <= TARGET_LOAD_RATIO,
    )
    for o in outcomes.values():
        failed = len(o.calls) - len(o.ok)
        section.add(
            f"{o.strategy}: latency p50 / p95 / p99",
            f"{o.latency_ms(50):.0f} / {o.latency_ms(95):.0f} / {o.latency_ms(99):.0f} ms"
            + (f" ({failed} failed)" if failed else ""),
        )
    best_other = min(rand.latency_ms(95), rr.latency_ms(95))
    section.add(
        "residency: p95 latency vs the better of random and round robin",
        f"{hermes.latency_ms(95):.0f} ms vs {best_other:.0f} ms",
        "lower than both",
        hermes.latency_ms(95) < best_other,
    )
    for o in outcomes.values():
        k = o.killed
        assert k is not None
        mid = len(k.failed) - len(k.not_mid_answer)
        row = (
            f"{len(k.not_mid_answer)} (of {len(k.calls)}; failed in all: {len(k.failed)}, "
            f"of which mid-answer on {KILLED}: {mid}; {k.in_flight_at_kill} in flight at the "
            f"kill; {KILLED}'s circuit 1 s after the kill / at the end: {k.circuit_soon} / "
            f"{k.circuit})"
        )
        targeted = o.strategy == "residency"
        section.add(
            f"{o.strategy}: {KILLED} killed halfway, failed requests not mid-answer on it",
            row,
            "0" if targeted else "",
            len(k.not_mid_answer) == 0 if targeted else None,
        )
    for o in outcomes.values():
        section.add(
            f"{o.strategy}: loaded at the end of phase 1, emulators / Hermes' view",
            f"{_fmt_hosts(o.resident)} / {_fmt_hosts(o.believed)}",
        )


def _notes(section: Section, plan: Plan) -> None:
    shares = ", ".join(f"{name} {share:.0%}" for name, (_, share) in MODELS.items())
    section.note(
        f"`python -m bench.run --only placement` (`--quick`: fewer requests). {len(HOSTS)} "
        f"Ollama emulator processes, each one host with max_loaded_models {MAX_LOADED_MODELS} "
        f"and a load delay of {LOAD_DELAY_MS} ms, answering in {ANSWER_MS} ms; the least "
        "recently used idle model is evicted to load another. Five models, every one on all "
        f"three hosts (max_concurrency {MAX_CONCURRENCY} per host, memory_cost low, memory "
        f"budget 8, queue_timeout_ms {QUEUE_TIMEOUT_MS}). 3 runner processes on one DynamoDB "
        f"Local; {plan.clients} client threads (client i on runner i mod 3), each pausing "
        f"before each request (exponential, mean {THINK_MS} ms: interactive callers that do "
        "not saturate the hot models' slots), then POST /api/generate "
        '`{"model": ..., "prompt": "hi", "stream": false}` and wait for the answer.'
    )
    section.note(
        f"Workload: seeded (seed {SEED}) models and pauses per client, shares {shares}; phase 1 "
        f"{plan.measured_per_client} requests per client, phase 2 {plan.kill_per_client} "
        f"(seed {SEED + 1}). Each client sends the same list in the same order under every "
        "strategy; how the clients interleave follows the answers. Before each strategy: "
        "runners restarted with HERMES_PLACEMENT, tables recreated (an empty lease table), "
        "every emulator reset (nothing loaded, counters zero). Loads: the emulators' "
        "`loads`, summed over hosts and models, from a cold start (the first load of each "
        "model counts). Latency: sent → answer received at the client, every 200 of phase 1."
    )
    section.note(
        "random and round_robin are Hermes with another ranking (hermes.placement.rank): the "
        "host order ignores residency (shuffled as LiteLLM's simple-shuffle, or rotated), a host "
        "with a free slot first. Everything else is Hermes' in all three: the shared limits "
        "per host, one cold load per host at a time, circuits and the retry on another host."
    )
    section.note(
        f"Phase 2: {KILLED} is SIGKILLed once half of the phase's requests were answered "
        f"(HERMES_CIRCUIT_COOLDOWN_S={COOLDOWN_S}) and stays down to the end of the phase. "
        f"Mid-answer on {KILLED}: a request under way when it died whose error names its "
        "URL; every other failure counts against the target. A non-streamed request has sent "
        "nothing to its caller when its host dies, so Hermes may retry it elsewhere too."
    )
