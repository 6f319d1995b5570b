"""How much work each section does: the full run, or --quick for a smoke run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    latency_warmup: int = 300
    latency_count: int = 2000
    limiter_warmup: int = 300  # DynamoDB Local's JVM needs a few hundred calls to warm up
    limiter_count: int = 500
    uncontended_calls: int = 200
    contended_callers: int = 8
    contended_s: float = 3.0
    runners: int = 3
    saturation_clients: int = 12
    saturation_s: float = 10.0
    cold_runs: int = 5


QUICK = Scale(
    latency_warmup=50,
    latency_count=300,
    limiter_warmup=20,
    limiter_count=100,
    uncontended_calls=50,
    contended_s=1.0,
    runners=2,
    saturation_s=3.0,
    cold_runs=2,
)
FULL = Scale()
