"""Hermes' one error type and its kinds: each carries its HTTP status and stable code.

The table in DESIGN.md §2 is implemented here and nowhere else; handlers only
turn a `HermesError` into their event's response shape.
"""

from __future__ import annotations

from typing import Any, ClassVar


class HermesError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, retry_after: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "code": self.code, **self.extra}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class InvalidRequest(HermesError):
    status, code = 400, "invalid_request"


class Forbidden(HermesError):
    """The caller asked for what only an admin may see (another caller's usage)."""

    status, code = 403, "forbidden"


class ModelNotConfigured(HermesError):
    status, code = 404, "model_not_configured"


class ModelNotFound(HermesError):
    status, code = 404, "model_not_found"


class RouteNotFound(HermesError):
    status, code = 404, "not_found"


class MethodNotAllowed(HermesError):
    status, code = 405, "method_not_allowed"


class PromptTooLarge(HermesError):
    status, code = 413, "prompt_too_large"


class ModelBusy(HermesError):
    status, code = 429, "model_busy"


class HostBusy(HermesError):
    status, code = 429, "host_busy"


class QueueFull(HermesError):
    """The model's queue holds max_waiting requests already: each would hold a Lambda
    instance while it waits, beyond what the functions' reserved concurrency covers."""

    status, code = 429, "queue_full"


class CallerBusy(HermesError):
    """The caller has as many requests in flight as its max_concurrency allows."""

    status, code = 429, "caller_busy"


class QuotaExceeded(HermesError):
    """The caller's tokens or requests for the current UTC minute or day are used up."""

    status, code = 429, "quota_exceeded"


class UpstreamError(HermesError):
    status, code = 502, "upstream_error"


class UpstreamUnavailable(HermesError):
    status, code = 503, "upstream_unavailable"


class LimiterUnavailable(HermesError):
    status, code = 503, "limiter_unavailable"


class UpstreamTimeout(HermesError):
    status, code = 504, "upstream_timeout"


class ClientDisconnected(HermesError):
    """The client left before its answer was ready: nobody receives this one (nginx's 499)."""

    status, code = 499, "client_disconnected"


class InternalError(HermesError):
    """A bug: reported without details so nothing internal leaks to callers."""


class JobNotFound(HermesError):
    status, code = 404, "job_not_found"


class RequestInProgress(HermesError):
    """A retry arrived while the first call with the same request id is still running."""

    status, code = 409, "request_in_progress"


class QueueUnavailable(HermesError):
    status, code = 503, "queue_unavailable"


class ResultTooLarge(HermesError):
    """A job's answer does not fit its job record. Only a job ever reads it; 507 (Insufficient
    Storage) keeps it out of the retryable statuses: the same prompt would answer as much."""

    status, code = 507, "result_too_large"


def is_retryable(error: HermesError) -> bool:
    """Worth trying again later: capacity, availability and timeouts, not bad input."""
    return error.status in (409, 429, 500, 502, 503, 504)
