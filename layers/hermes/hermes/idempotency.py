"""At-most-once execution per request id, with powertools idempotency on DynamoDB.

A retried direct invoke or a redelivered SQS message with the same id gets the stored
result instead of a second model call. Only successes are stored: a failure raises, which
makes powertools delete its in-progress record, so a later retry runs again (a busy model
must not be remembered as a permanent answer). Results are stored zlib-compressed (`packed`),
as job records are: DynamoDB's 400 KB item holds a few MB of generated text that way.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from hermes.config import get_settings
from hermes.errors import RequestInProgress

# The most a compressed result may take in a record: base64 adds a third (280 KB -> 373 KB)
# and the record's other attributes must fit the 400 KB item too.
MAX_RESULT_BYTES = 280_000


@lru_cache(maxsize=4)
def _persistence(key: str) -> Any:
    """One persistence layer per key: powertools configures a layer (its key's JMESPath)
    once, on first use, and keeps that. Shared, the first of a process's keys would win: in
    the local runner, where the LLM function's direct invokes (request_id) and the worker's
    jobs (job_id) share a process, the other would skip idempotency altogether."""
    from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer

    from hermes.aws import client

    return DynamoDBPersistenceLayer(
        table_name=get_settings().idempotency_table, boto3_client=client("dynamodb")
    )


def once(
    function: Callable[[dict[str, Any]], dict[str, Any]],
    data: dict[str, Any],
    *,
    key: str,
    context: Any = None,
    same_request: str | None = None,
    scope: str | None = None,
) -> dict[str, Any]:
    """Run `function(data)` at most once per `data[key]` (within the retention window), and
    per `data[scope]` when given (a direct invoke's caller: one caller's request id never
    returns another's answer). `same_request` is a JMESPath over `data`; a repeat whose
    selection differs is refused."""
    from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
    from aws_lambda_powertools.utilities.idempotency.exceptions import (
        IdempotencyAlreadyInProgressError,
        IdempotencyValidationError,
    )

    from hermes.errors import InvalidRequest

    config = IdempotencyConfig(
        event_key_jmespath=f"[{scope}, {key}]" if scope else key,
        payload_validation_jmespath=same_request or "",
        expires_after_seconds=get_settings().job_retention_s,
    )
    if context is not None and hasattr(context, "get_remaining_time_in_millis"):
        config.register_lambda_context(context)  # in-progress records expire with the Lambda

    def call(data: dict[str, Any]) -> dict[str, Any]:
        return function(data)

    wrapped = idempotent_function(
        call,
        data_keyword_argument="data",
        persistence_store=_persistence(key),
        config=config,
        key_prefix=f"hermes.{key}",  # request ids and job ids never share a namespace
    )
    try:
        result: dict[str, Any] = wrapped(data=data)
    except IdempotencyAlreadyInProgressError:
        raise RequestInProgress(
            f"a request with {key} '{data[key]}' is still running; retry later", retry_after=2
        ) from None
    except IdempotencyValidationError:
        raise InvalidRequest(
            f"{key} '{data[key]}' was already used for a different request"
        ) from None
    return result


def pack(value: Any) -> bytes:
    return zlib.compress(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def unpack(data: bytes) -> Any:
    return json.loads(zlib.decompress(data))


def packed(result: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A result as stored in a record, `{"z": <base64 of its compressed JSON>}`, and the
    compressed size (the caller compares it with MAX_RESULT_BYTES before storing)."""
    data = pack(result)
    return {"z": base64.b64encode(data).decode()}, len(data)


def unpacked(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored result as it was returned (records stored before compression are plain)."""
    if set(stored) == {"z"}:
        result: dict[str, Any] = unpack(base64.b64decode(stored["z"]))
        return result
    return stored
