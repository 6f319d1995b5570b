"""Tokens per second of the embedded model server itself (no Hermes in between), to compare
llama.cpp builds and CPU backend variants on one machine:

    .venv/bin/python -m bench.model_speed                       # the installed build
    .venv/bin/python -m bench.model_speed --variant haswell     # force one CPU variant
    .venv/bin/python -m bench.model_speed --python /tmp/native-venv/bin/python   # another build

Each run: one warm-up completion, then `--runs` completions of `--tokens` tokens at
temperature 0 with the same prompt. Two speeds per completion: tokens per second of wall
time, and tokens per CPU-second of the server process (utime + stime from /proc). On a
machine shared with other work the first swings with the load; the second does not, and
with `--threads 1` (no thread spinning) it compares builds fairly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from local import cpu_variant
from local.embedded_model import ALIAS, ModelServer
from local.process import free_port

PROMPT = "The history of the lighthouse begins"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure(server: ModelServer, runs: int, tokens: int) -> tuple[list[float], list[float]]:
    """Tokens per wall second and per CPU-second of the server, one pair per completion."""
    assert server.child is not None
    wall, cpu = [], []
    with httpx.Client(trust_env=False, timeout=300) as client:
        for i in range(runs + 1):
            started, cpu_started = time.perf_counter(), cpu_seconds(server.child.pid)
            answer = client.post(f"{server.url}/v1/completions", json={
                "model": ALIAS, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
            }).json()  # fmt: skip
            elapsed = time.perf_counter() - started
            used = cpu_seconds(server.child.pid) - cpu_started
            if i:  # the first one warms up
                wall.append(answer["usage"]["completion_tokens"] / elapsed)
                cpu.append(answer["usage"]["completion_tokens"] / used)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter with llama_cpp")
    parser.add_argument("--variant", help="CPU backend variant to force (e.g. x64, haswell)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    backend = None
    if args.variant:
        lib_dir = cpu_variant.llama_cpp_lib_dir()
        assert lib_dir is not None, "llama_cpp is not installed"
        backend = lib_dir / f"libggml-cpu-{args.variant}.so"
    with tempfile.TemporaryDirectory() as tmp:
        server = ModelServer(
            free_port(),
            threads=args.threads,
            log=Path(tmp) / "model-server.log",
            python=args.python,
            backend=backend,
        ).start()
        try:
            wall, cpu = measure(server, args.runs, args.tokens)
        finally:
            server.stop()
    print(f"python: {args.python}")
    print(server.backend or "llama.cpp CPU backend: chosen by llama.cpp")
    print(
        f"{args.runs} x {args.tokens} tokens, {args.threads} threads: "
        f"{statistics.median(wall):.1f} tokens/s (median; max {max(wall):.1f}), "
        f"{statistics.median(cpu):.1f} tokens per CPU-second (median)"
    )


if __name__ == "__main__":
    main()
