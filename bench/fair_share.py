"""`python -m bench.fair_share`: callers sharing a contended model, and whether their limits
overshoot (issue 20).

Three runners on one DynamoDB Local and the Ollama emulator; gemma has 4 slots and requests
wait for them. Each scenario runs twice in the same session, in arrival order (no `callers`
section: the baseline) and with fair share (a `callers` section), on fresh runners:
- backlog: `flood` keeps 12 requests going, `other` one at a time, equal weights: other's
  wait (its time beyond the answer's) at p50 / p95;
- weights: `heavy` (weight 3) and `light` (weight 1) keep 8 requests going each: their
  completions, the ratio, and Jain's fairness index of completions per unit of weight
  (1.0: exactly in proportion to the weights).
Then the limits, fair share on: `flood` capped at max_concurrency 2 floods 12 requests (the
emulator's peak in flight against the cap), and `budget` with tokens_per_minute 1000 sends
requests of num_predict 100 from 4 clients (the tokens the emulator served per UTC minute
against the limit). Overshoot's target is 0 for both."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from bench.procs import Runner
from bench.report import load_average
from bench.stats import percentile
from local.dynamodb_local import DynamoDBLocal
from tests.support.callers_load import API_KEYS, ask, closed_loop
from tests.support.emulator_process import EmulatorProcess

GEMMA = {
    "max_concurrency": 4,
    "memory_cost": "low",
    "timeout": 30_000,
    "backend_model": "gemma3:1b",
    "queue_timeout_ms": 60_000,
    "max_waiting": 100,
}
FAIR = {"heavy": {"weight": 3}, "flood": {}, "*": {}}
LIMITED = {"flood": {"max_concurrency": 2}, "budget": {"tokens_per_minute": 1000}, "*": {}}
BACKLOG_ANSWER_S, WEIGHTS_ANSWER_MS = 1.0, 300


def runners(stack: ExitStack, tmp: Path, name: str, callers: Any, env: dict[str, str]) -> list:
    path = tmp / f"{name}.json"
    models: dict[str, Any] = {"models": {"gemma": GEMMA}}
    if callers is not None:
        models["callers"] = callers
    path.write_text(json.dumps(models))
    started = [Runner({**env, "HERMES_MODELS_FILE": str(path)}) for _ in range(3)]
    for runner in started:
        stack.callback(runner.stop)
        runner.launch()
    return [runner.ready() for runner in started]


def backlog(started: list, emulator: EmulatorProcess) -> dict[str, str]:
    emulator.set_behaviour("gemma3:1b", "ok", delay_ms=int(BACKLOG_ANSWER_S * 1000))
    until = time.monotonic() + 22
    starts = [i * BACKLOG_ANSWER_S / 4 for i in range(4)] + [BACKLOG_ANSWER_S * 1.1] * 8
    with ThreadPoolExecutor(1) as pool:
        flood = pool.submit(closed_loop, started, "flood", 12, until, starts)
        time.sleep(2 * BACKLOG_ANSWER_S + 0.5)
        other = closed_loop(started, "other", 1, until)
        flooded = flood.result()
    waits = [(answered - sent - BACKLOG_ANSWER_S) * 1000 for sent, answered in other]
    return {
        "other's wait p50 / p95": f"{percentile(waits, 50):.0f} / {percentile(waits, 95):.0f} ms",
        "completions flood / other": f"{len(flooded)} / {len(other)}",
    }


def weights(started: list, emulator: EmulatorProcess) -> dict[str, str]:
    emulator.set_behaviour("gemma3:1b", "ok", delay_ms=WEIGHTS_ANSWER_MS)
    began = time.monotonic()
    until = began + 16
    with ThreadPoolExecutor(2) as pool:
        runs = {c: pool.submit(closed_loop, started, c, 8, until) for c in ("heavy", "light")}
        done = {caller: run.result() for caller, run in runs.items()}
    counts = {
        caller: sum(began + 4 <= answered <= until - 1 for _, answered in answers)
        for caller, answers in done.items()
    }
    shares = [counts["heavy"] / 3, counts["light"] / 1]
    jain = sum(shares) ** 2 / (len(shares) * sum(x * x for x in shares))
    return {
        "completions heavy (w 3) / light (w 1)": f"{counts['heavy']} / {counts['light']}",
        "ratio (target 3.0)": f"{counts['heavy'] / max(counts['light'], 1):.2f}",
        "Jain's index of completions per weight": f"{jain:.3f}",
    }


def overshoot(started: list, emulator: EmulatorProcess) -> dict[str, str]:
    emulator.reset()
    emulator.set_behaviour("gemma3:1b", "ok", delay_ms=200)
    with ThreadPoolExecutor(12) as pool:
        list(
            pool.map(
                lambda i: [
                    ask(started[i % 3], "flood", "/v1/llm/gemma", {"prompt": "hi"})
                    for _ in range(10)
                ],
                range(12),
            )
        )
    peak = emulator.stats()["peak_in_flight"]["gemma3:1b"]
    emulator.reset()
    emulator.set_behaviour("gemma3:1b", "ok", tokens=100)
    body = {"prompt": "count", "options": {"num_predict": 100}}
    codes: defaultdict[int, int] = defaultdict(int)
    with ThreadPoolExecutor(4) as pool:
        for answers in pool.map(
            lambda i: [ask(started[i % 3], "budget", "/v1/llm/gemma", body) for _ in range(15)],
            range(4),
        ):
            for answer in answers:
                codes[answer.status_code] += 1
    per_minute: defaultdict[int, int] = defaultdict(int)
    for at, _, prompt, completion in emulator.stats()["served"]:
        per_minute[int(at // 60)] += prompt + completion
    most = max(per_minute.values())
    return {
        "flood's peak in flight (max_concurrency 2)": f"{peak}: overshoot {max(0, peak - 2)}",
        "budget's most tokens in a UTC minute (tokens_per_minute 1000)": (
            f"{most}: overshoot {max(0, most - 1000)} ({dict(codes)} answers)"
        ),
    }


def main() -> None:
    load_at_start = load_average()
    results: dict[str, dict[str, dict[str, str]]] = {}
    with ExitStack() as outer, TemporaryDirectory(prefix="hermes-fair-") as directory:
        tmp = Path(directory)
        store = DynamoDBLocal().start()
        outer.callback(store.stop)
        store.create_tables()
        emulator = outer.enter_context(EmulatorProcess())
        env = {
            "AWS_ENDPOINT_URL_DYNAMODB": store.url,
            "OLLAMA_URL": emulator.url,
            "HERMES_API_KEYS": API_KEYS,
            "HERMES_LEASE_MARGIN_MS": "500",
        }
        for label, callers in (("arrival order", None), ("fair share", FAIR)):
            with ExitStack() as stack:
                print(f"== {label}", flush=True)
                started = runners(stack, tmp, label.replace(" ", "-"), callers, env)
                results[label] = {
                    "backlog": backlog(started, emulator),
                    "weights": weights(started, emulator),
                }
        with ExitStack() as stack:
            print("== limits", flush=True)
            started = runners(stack, tmp, "limits", LIMITED, env)
            limits = overshoot(started, emulator)
    print(f"\n== Callers sharing gemma (4 slots) over 3 runners; load {load_at_start} → "
          f"{load_average()}")  # fmt: skip
    print("| scenario | figure | arrival order | fair share |")
    print("|---|---|---|---|")
    for scenario in ("backlog", "weights"):
        for figure in results["fair share"][scenario]:
            cells = [results[label][scenario][figure] for label in results]
            print(f"| {scenario} | {figure} | {' | '.join(cells)} |")
    print("\n| limit | measured |")
    print("|---|---|")
    for figure, text in limits.items():
        print(f"| {figure} | {text} |")


if __name__ == "__main__":
    main()
