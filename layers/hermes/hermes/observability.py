"""Logs and metrics, with powertools, created once and shared.

- One structured JSON log line per finished request: model, outcome, status, latency, wait,
  token counts, with the Lambda request id and correlation id that `instrument` binds.
  Prompt and completion text are never logged unless HERMES_LOG_PROMPTS=1.
- CloudWatch metrics as EMF lines (namespace Hermes; on Lambda powertools adds the
  `service` dimension to every one, which the dashboard's SEARCH schemas name):
  - Requests (model, outcome; and caller, outcome), Latency (model), WaitTime (model),
    LimiterErrors (none). The caller dimension is bounded by the models file: a caller its
    `callers` section names is itself, any other `*` (ids from JWTs or IAM are unbounded);
  - SlotTime, busy slot time: its sum per period is the average in flight (model; and
    model, host);
  - InFlight and SlotUtilization when a grant from the queue tells them (model; and model,
    host);
  - ModelLoads and LoadTime (model, host): a host loaded a model into memory;
  - CircuitOpened and CircuitClosed (host): a host's shared circuit breaker;
  - HostRetries (model, host): a request moved off a failed host to another.
  template.yaml's HermesDashboard graphs them (tests/template checks it names only these).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit, single_metric

from hermes.callers import CALLER, EVERY_OTHER

NAMESPACE = "Hermes"
logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME") or "hermes")


def _log_prompts() -> bool:
    return os.environ.get("HERMES_LOG_PROMPTS") == "1"


def _metric(name: str, unit: MetricUnit, value: float, **dimensions: str) -> None:
    # single_metric does not honour POWERTOOLS_METRICS_DISABLED by itself.
    if os.environ.get("POWERTOOLS_METRICS_DISABLED", "").lower() == "true":
        return
    with single_metric(name=name, unit=unit, value=value, namespace=NAMESPACE) as metric:
        for key, dimension in dimensions.items():
            metric.add_dimension(name=key, value=dimension)


def admitted(
    model: str, in_flight: int | None, capacity: int, wait_ms: float, host: str | None = None
) -> None:
    """`in_flight`: the model's count right after this admission, when the limiter knows it
    (a grant from the queue); a direct admission is a transaction, which returns no values.
    With `host` (the host placement chose), the same two by model and host as well."""
    if in_flight is not None:
        utilization = 100 * in_flight / capacity
        _metric("InFlight", MetricUnit.Count, in_flight, model=model)
        _metric("SlotUtilization", MetricUnit.Percent, utilization, model=model)
        if host is not None:
            _metric("InFlight", MetricUnit.Count, in_flight, model=model, host=host)
            _metric("SlotUtilization", MetricUnit.Percent, utilization, model=model, host=host)
    _metric("WaitTime", MetricUnit.Milliseconds, wait_ms, model=model)


def held(model: str, seconds: float, host: str | None = None) -> None:
    """A slot's busy time: Sum(SlotTime) / period = the model's average in flight, whichever
    way it was admitted (utilization = that / max_concurrency); with `host`, by model and
    host as well."""
    _metric("SlotTime", MetricUnit.Milliseconds, seconds * 1000, model=model)
    if host is not None:
        _metric("SlotTime", MetricUnit.Milliseconds, seconds * 1000, model=model, host=host)


def model_loaded(model: str, host: str, load_ms: float) -> None:
    """A host loaded the model into memory (a cold model, or one evicted): how often, how
    long."""
    _metric("ModelLoads", MetricUnit.Count, 1, model=model, host=host)
    _metric("LoadTime", MetricUnit.Milliseconds, load_ms, model=model, host=host)
    logger.info("model loaded", extra={"model": model, "host": host, "load_ms": round(load_ms, 1)})


def circuit_opened(host: str, reason: str) -> None:
    """The host's circuit breaker opened: placement avoids the host until a probe succeeds."""
    _metric("CircuitOpened", MetricUnit.Count, 1, host=host)
    logger.warning("circuit opened", extra={"host": host, "reason": reason})


def circuit_closed(host: str) -> None:
    """A probe succeeded: the host takes requests again."""
    _metric("CircuitClosed", MetricUnit.Count, 1, host=host)
    logger.info("circuit closed", extra={"host": host})


def retried(model: str, failed_host: str, reason: str) -> None:
    """A request failed on `failed_host` before any answer went out and is tried on another
    host; counted against the host that failed."""
    _metric("HostRetries", MetricUnit.Count, 1, model=model, host=failed_host)
    logger.warning(
        "retrying on another host", extra={"model": model, "host": failed_host, "reason": reason}
    )


def finished(
    model: str,
    outcome: str,
    status: int,
    latency_ms: float,
    usage: dict[str, Any] | None = None,
    prompt: str | None = None,
    completion: str | None = None,
) -> None:
    """The one line (and metrics) per request, success or not, with its caller."""
    caller = CALLER.get()
    _metric("Requests", MetricUnit.Count, 1, model=model, outcome=outcome)
    _metric("Requests", MetricUnit.Count, 1, caller=_caller_dimension(caller), outcome=outcome)
    _metric("Latency", MetricUnit.Milliseconds, latency_ms, model=model)
    if outcome == "limiter_unavailable":
        _metric("LimiterErrors", MetricUnit.Count, 1)
    fields: dict[str, Any] = {
        "model": model,
        "caller": caller,
        "outcome": outcome,
        "status": status,
        "latency_ms": round(latency_ms, 1),
        **{k: v for k, v in (usage or {}).items() if v is not None},
    }
    if _log_prompts():
        fields |= {"prompt": prompt, "completion": completion}
    logger.info("request finished", extra=fields)


def _caller_dimension(caller: str) -> str:
    """The caller as a metric dimension: itself if the models file names it, else `*`."""
    from hermes.config import ConfigError, get_settings

    try:
        named = get_settings().callers or {}
    except ConfigError:
        named = {}
    return caller if caller in named else EVERY_OTHER


@lru_cache(maxsize=1)
def start_tracing() -> bool:
    """On Lambda with active tracing, patch botocore and httpx so every DynamoDB and backend
    call is an X-Ray subsegment. Elsewhere (local runner, tests) nothing is imported."""
    on_lambda = "AWS_LAMBDA_FUNCTION_NAME" in os.environ and "AWS_XRAY_DAEMON_ADDRESS" in os.environ
    if not on_lambda or os.environ.get("POWERTOOLS_TRACE_DISABLED", "").lower() == "true":
        return False
    from aws_lambda_powertools import Tracer

    Tracer(service=logger.service, patch_modules=["botocore", "httpx"])
    return True


def instrument(handler: Callable[..., Any], *, http: bool) -> Callable[..., Any]:
    """Bind the Lambda request id (and, for API Gateway events, the request's own id as the
    correlation id) to every log line of the invocation."""
    path = correlation_paths.API_GATEWAY_HTTP if http else None
    wrapped: Callable[..., Any] = logger.inject_lambda_context(
        handler, correlation_id_path=path, clear_state=True
    )
    return wrapped
