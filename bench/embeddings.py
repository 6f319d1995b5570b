"""`python -m bench.embeddings [--requests N]`: what Hermes adds to an embedding request
(issue 23), against calling the backend directly in the same run.

One runner (`make run`'s process, DynamoDB Local) in front of the Ollama emulator, which
answers at once: a batch of 8 texts to /api/embed goes straight to the emulator, then through
Hermes, alternately on two keep-alive connections, so the machine's drift falls on both
alike. Printed: p50 and p95 of each and what Hermes adds (admission and release on the lease
table, the usage row, HTTP and validation)."""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from pathlib import Path

from bench.procs import Infra, Runner, http_client, write_models_file
from bench.report import load_average
from bench.stats import percentile

TEXTS = [f"document number {i} about the colour of the sky" for i in range(8)]
MODELS = {
    "models": {
        "embedder": {
            "max_concurrency": 4,
            "memory_cost": "low",
            "timeout": 30000,
            "backend_model": "gemma3:1b",
            "capabilities": ["embedding"],
        }
    }
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__)
    parser.add_argument("--requests", type=int, default=400, help="per path (default 400)")
    args = parser.parse_args(argv)
    load_at_start = load_average()
    with ExitStack() as stack:
        infra = Infra(stack, output_dir=Path("bench"))
        emulator, store = infra.emulator, infra.dynamodb
        models = write_models_file(infra.tmp, "models.json", MODELS)
        env = {
            "OLLAMA_URL": emulator.url,
            "HERMES_MODELS_FILE": str(models),
            "AWS_ENDPOINT_URL_DYNAMODB": store.url,
        }
        runner = stack.enter_context(Runner(env))
        direct = json.dumps({"model": "gemma3:1b", "input": TEXTS}).encode()
        hermes = json.dumps({"model": "embedder", "input": TEXTS}).encode()
        samples: dict[str, list[float]] = {"direct": [], "hermes": []}
        headers = {"content-type": "application/json"}
        with http_client(timeout=30) as to_backend, http_client(timeout=30) as to_hermes:
            for i in range(args.requests + 20):  # the first 20 rounds warm up
                for name, client, url, body in (
                    ("direct", to_backend, f"{emulator.url}/api/embed", direct),
                    ("hermes", to_hermes, f"{runner.url}/api/embed", hermes),
                ):
                    started = time.perf_counter()
                    answer = client.post(url, content=body, headers=headers)
                    elapsed = time.perf_counter() - started
                    if answer.status_code != 200 or len(answer.json()["embeddings"]) != 8:
                        raise RuntimeError(f"{url}: {answer.status_code} {answer.text[:200]}")
                    if i >= 20:
                        samples[name].append(elapsed)
    p50 = {name: percentile(values, 50) * 1000 for name, values in samples.items()}
    p95 = {name: percentile(values, 95) * 1000 for name, values in samples.items()}
    print(f"\n== Embeddings: a batch of 8 texts, {args.requests} requests per path")
    print(f"load average (1 min), start / end: {load_at_start} / {load_average()}")
    print("| path | p50 | p95 |")
    print("|---|---|---|")
    for name in samples:
        print(f"| {name} | {p50[name]:.2f} ms | {p95[name]:.2f} ms |")
    print(
        f"| added by Hermes | {p50['hermes'] - p50['direct']:+.2f} ms | "
        f"{p95['hermes'] - p95['direct']:+.2f} ms |"
    )


if __name__ == "__main__":
    main()
