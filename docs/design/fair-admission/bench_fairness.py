"""Limiter-level version of bench §4: 12 closed-loop clients, one model with 2 slots, 100 ms
of service. Prints slot utilization, completions per client, wait percentiles against the
ideal FIFO wait ((clients - slots) x service / slots), and the handoff gap (release called →
next holder sees its lease).

  PYTHONPATH=.:layers/hermes:docs/design/fair-admission \
      .venv/bin/python docs/design/fair-admission/bench_fairness.py [seconds] [clients]
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import uuid

import boto3
from botocore.config import Config

from fair_limiter import Counter, FairLimiter, Lease, lease_table_definition
from hermes.errors import ModelBusy
from local.dynamodb_local import DynamoDBLocal

SLOTS, SERVICE_S = 2, 0.1


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 6.0
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    db = DynamoDBLocal().start()
    try:
        table = f"Bench-{uuid.uuid4().hex[:6]}"
        db.client().create_table(**lease_table_definition(table))
        # One limiter (one client) per "runner", 3 runners as in bench §4.
        limiters = [
            FairLimiter(
                boto3.client(
                    "dynamodb",
                    endpoint_url=db.url,
                    region_name="us-east-1",
                    aws_access_key_id="l",
                    aws_secret_access_key="l",  # noqa: S106
                    config=Config(max_pool_connections=16),
                ),
                table,
            )
            for _ in range(3)
        ]
        counters = [Counter("inflight_gemma", SLOTS, 1, ModelBusy, "gemma")]
        # Warm DynamoDB Local's JVM up (a cold one answers in tens of ms), then time one of
        # each request the handoff makes.
        warm = FairLimiter(limiters[0]._ddb, table)
        for _ in range(400):
            warm.release(warm.acquire("host#warm", counters, 30_000))
        timed = time.monotonic()
        for _ in range(100):
            warm.release(warm.acquire("host#warm", counters, 30_000))
        print(f"uncontended acquire+release: {(time.monotonic() - timed) * 10:.1f} ms")
        stop = threading.Event()
        lock = threading.Lock()
        busy = [0.0]
        waits: list[float] = []
        done = [0] * clients
        released_at: list[float] = []
        gaps: list[float] = []
        window = [0.0, 0.0]

        def client(i: int) -> None:
            limiter = limiters[i % 3]
            while not stop.is_set():
                asked = time.monotonic()
                got = limiter.enqueue(
                    "host#gpu", counters, 30_000, wait_until_ms=int(time.time() * 1000) + 5_000
                )
                lease = got if isinstance(got, Lease) else limiter.wait(got)
                if lease is None:
                    continue
                admitted = time.monotonic()
                with lock:
                    if released_at:
                        gaps.append(admitted - released_at.pop(0))
                time.sleep(SERVICE_S)
                finished = time.monotonic()
                with lock:
                    if window[0] <= admitted and finished <= window[1]:
                        busy[0] += finished - admitted
                        waits.append(admitted - asked)
                        done[i] += 1
                    released_at.append(time.monotonic())
                limiter.release(lease)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        start = time.monotonic()
        window[:] = [start + 1.0, start + 1.0 + seconds]  # 1 s warm-up
        for t in threads:
            t.start()
        time.sleep(seconds + 1.5)
        stop.set()
        for t in threads:
            t.join(10)
        waits.sort()
        ideal = (clients - SLOTS) * SERVICE_S / SLOTS
        p = lambda q: waits[min(len(waits) - 1, int(q * len(waits)))]  # noqa: E731
        print(
            f"clients {clients}, slots {SLOTS}, service {SERVICE_S * 1000:.0f} ms, {seconds:.0f} s"
        )
        print(f"utilization {busy[0] / (SLOTS * seconds):.1%}")
        ratio = max(done) / max(1, min(done))
        print(f"completed per client min/max {min(done)}/{max(done)} (ratio {ratio:.2f})")
        p50, p99 = p(0.5) * 1000, p(0.99) * 1000
        print(
            f"wait p50/p99/max {p50:.0f}/{p99:.0f}/{waits[-1] * 1000:.0f} ms; "
            f"ideal FIFO wait {ideal * 1000:.0f} ms; p99/ideal {p(0.99) / ideal:.2f}"
        )
        gap = statistics.median(gaps) * 1000
        print(f"handoff gap (release called -> next admitted) p50 {gap:.1f} ms")
    finally:
        db.stop()


if __name__ == "__main__":
    main()
