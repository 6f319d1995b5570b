"""Section 6: with a real model (Gemma 3 270M on llama-cpp-python, the embedded default),
what share of end-to-end latency is Hermes', and tokens per second direct vs through Hermes.

Requests alternate direct / through Hermes with the same prompt and a fixed token budget
(temperature 0), so both see the same machine load."""

from __future__ import annotations

import time

from bench.memory import MemoryLog
from bench.procs import Infra, Runner, http_client, write_models_file
from bench.report import Section
from bench.scale import Scale
from local.dynamodb_local import free_port
from local.embedded_model import ALIAS, ModelServer, available

PROMPT = "The history of the lighthouse begins"
TOKENS = 48


def run(infra: Infra, scale: Scale, _: MemoryLog) -> Section:
    section = Section(6, "Real model: overhead share and tokens per second")
    if not available():
        section.note(
            "skipped: llama-cpp-python or the Gemma package is not installed (make install)"
        )
        return section
    server = ModelServer(free_port()).start()
    try:
        models = write_models_file(infra.tmp, "real.json", {
            "models": {"gemma": {"max_concurrency": 1, "memory_cost": "low", "timeout": 120000,
                                 "backend_model": ALIAS, "host": "cpu"}},
            "hosts": {"cpu": {"memory_budget": 4, "kind": "openai", "url": server.url}},
        })  # fmt: skip
        env = {"HERMES_MODELS_FILE": str(models), "HERMES_EMBEDDED_MODEL": "0",
               "AWS_ENDPOINT_URL_DYNAMODB": infra.dynamodb.url}  # fmt: skip
        with Runner(env) as runner, http_client(timeout=300) as client:
            direct, hermes = [], []
            for i in range(scale.cold_runs + 1):  # the first pair warms the model up
                started = time.perf_counter()
                answer = client.post(f"{server.url}/v1/completions", json={
                    "model": ALIAS, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0,
                }).json()  # fmt: skip
                direct_s = time.perf_counter() - started
                started = time.perf_counter()
                via = client.post(f"{runner.url}/v1/llm/gemma", json={
                    "prompt": PROMPT, "options": {"num_predict": TOKENS, "temperature": 0},
                }).json()  # fmt: skip
                hermes_s = time.perf_counter() - started
                if i:
                    direct.append((direct_s, answer["usage"]["completion_tokens"]))
                    hermes.append((hermes_s, via["usage"]["completion_tokens"]))
    finally:
        server.stop()
    direct_s = sorted(s for s, _ in direct)[len(direct) // 2]
    hermes_s = sorted(s for s, _ in hermes)[len(hermes) // 2]
    direct_tps = sum(t for _, t in direct) / sum(s for s, _ in direct)
    hermes_tps = sum(t for _, t in hermes) / sum(s for s, _ in hermes)
    section.add("requests (each way)", f"{len(direct)} x {TOKENS} tokens, temperature 0")
    section.add("end-to-end latency direct / through Hermes, median",
                f"{direct_s * 1000:.0f} ms / {hermes_s * 1000:.0f} ms")  # fmt: skip
    share = max(0.0, hermes_s - direct_s) / hermes_s
    section.add(
        "Hermes' share of end-to-end latency",
        f"{share:.1%} ({(hermes_s - direct_s) * 1000:.1f} ms)",
    )
    section.add("tokens per second direct / through Hermes", f"{direct_tps:.1f} / {hermes_tps:.1f}")
    section.note(
        "A CPU model on 2 shared cores varies by more than Hermes' few ms: read the share "
        "as 'small', not to the decimal."
    )
    return section
