"""`python -m bench.callers [--quick]`: what a caller's limits add to a request (issue 20).

Three services in this process on one DynamoDB Local and the Ollama emulator (instant
answers), the same model, differing only in the models file's `callers` section:
- bare: no section and no usage row, as before callers existed;
- none: no section; each request ADDs to its usage row (GET /v1/usage), as every request does;
- capped: the caller has a max_concurrency (a lease of its own pool, taken with the slot);
- budgeted: a max_concurrency and tokens_per_minute, tokens_per_day, requests_per_minute (a
  reservation transaction before the call, a settlement after it).
All but `bare` write the usage row.
Requests go round-robin over the three, one at a time, so the machine's drift falls on all
of them alike; the table gives each one's latency (service.generate, start to answer) and its
DynamoDB requests, and what each adds to `bare` at p50."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter as Tally
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from bench.procs import (
    AWS_ENV,
    build_service,
    dynamodb_client,
    patched_env,
    quiet_in_process_hermes,
    write_models_file,
)
from bench.report import load_average
from bench.stats import percentile
from local.dynamodb_local import DynamoDBLocal
from tests.support.emulator_process import EmulatorProcess

MODEL = {
    "max_concurrency": 4,
    "memory_cost": "low",
    "timeout": 30000,
    "backend_model": "gemma3:1b",
}
HUGE = 10**9
CONFIGS: dict[str, dict[str, Any] | None] = {
    "bare": None,
    "none": None,
    "capped": {"bench": {"max_concurrency": 100}},
    "budgeted": {
        "bench": {
            "max_concurrency": 100,
            "tokens_per_minute": HUGE,
            "tokens_per_day": HUGE,
            "requests_per_minute": HUGE,
        }
    },
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.callers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100 requests per service")
    parser.add_argument("--requests", type=int, help="per service (default 400; quick 100)")
    args = parser.parse_args(argv)
    count = args.requests or (100 if args.quick else 400)
    quiet_in_process_hermes()
    from hermes.callers import acting_as

    load_at_start = load_average()
    with ExitStack() as stack, patched_env(AWS_ENV):
        tmp = Path(stack.enter_context(TemporaryDirectory(prefix="hermes-callers-")))
        store = DynamoDBLocal().start()
        stack.callback(store.stop)
        store.create_tables()
        emulator = stack.enter_context(EmulatorProcess())
        services = {}
        for name, callers in CONFIGS.items():
            config = {"models": {"gemma": MODEL}} | ({"callers": callers} if callers else {})
            path = write_models_file(tmp, f"{name}.json", config)
            services[name] = build_service(
                dynamodb_client(store.url), path, emulator.url, usage=name != "bare"
            )
        samples: dict[str, list[float]] = {name: [] for name in services}
        calls: dict[str, Tally[str]] = {name: Tally() for name in services}
        loop = asyncio.new_event_loop()
        with acting_as("bench"):
            for i in range(count + 20):  # the first 20 rounds warm up
                for name, service in services.items():
                    light = service.limiter._table.light
                    before = Tally(light.calls) if light else Tally()
                    started = time.perf_counter()
                    loop.run_until_complete(service.generate("gemma", {"prompt": "hi"}))
                    if i >= 20:
                        samples[name].append(time.perf_counter() - started)
                        calls[name] += (Tally(light.calls) if light else Tally()) - before
        loop.close()
    base = percentile(samples["bare"], 50)
    print(f"\n== What a caller's limits add ({count} requests each, round-robin)")
    print(f"load average (1 min), start / end: {load_at_start} / {load_average()}")
    print("| service | p50 | p95 | added at p50 | DynamoDB requests per request |")
    print("|---|---|---|---|---|")
    for name, values in samples.items():
        p50, p95 = percentile(values, 50), percentile(values, 95)
        per = ", ".join(f"{op} {n / count:g}" for op, n in sorted(calls[name].items()))
        added = "—" if name == "bare" else f"{(p50 - base) * 1000:+.2f} ms"
        print(f"| {name} | {p50 * 1000:.2f} ms | {p95 * 1000:.2f} ms | {added} | {per} |")


if __name__ == "__main__":
    main()
