"""boto3 clients, created once per process so warm invocations reuse their connections."""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def client(service: str) -> Any:
    import boto3  # deferred: a large import, paid on first use rather than by every importer
    from botocore.config import Config

    return boto3.client(  # type: ignore[call-overload]
        service,
        # DynamoDB answers in milliseconds; a call that hears nothing for 2 s is retried
        # (3 attempts in all: botocore's "max_attempts" would count retries only, and give 4).
        # "legacy" mode, because its DynamoDB policy backs off 50 then 100 ms, where
        # "standard" mode waits up to 1 then 2 s: throttling and conflicts are ridden out by
        # the limiter itself, with jitter and within each request's deadline, and a release
        # near an invocation's end cannot afford seconds inside one call. Worst case for one
        # call: 3 x (1 + 2) s + 0.15 s, after the limiter's own first try on its light client
        # (2 s) for the calls it makes that way. The limiter stays safe whatever the latency (a
        # holder's run time comes from the lease as granted, and a write whose answer is
        # lost is withdrawn), so these only bound how long a caller waits.
        config=Config(
            connect_timeout=1,
            read_timeout=2,
            retries={"mode": "legacy", "total_max_attempts": 3},
            tcp_keepalive=True,
            # Hermes builds every request itself; client-side validation only costs
            # ~0.4 ms per call on the admission path.
            parameter_validation=False,
        ),
    )
