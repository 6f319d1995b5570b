"""The DynamoDB adapter of the limiter: ClientError codes become domain outcomes.

A cancelled transaction (a condition failed, or a conflict with another transaction) is
`Cancelled`, with each item's reason; anything else is `LimiterUnavailable` (503, fail
closed: nothing runs without a committed write)."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from hermes.errors import LimiterUnavailable
from hermes.limiter.records import STATE_SK, key

log = logging.getLogger("hermes.limiter")

# BatchGetItem takes at most 100 keys per call.
BATCH_GET_MAX_KEYS = 100
# Answers "still in progress" to a retried transaction before giving up (LimiterUnavailable:
# an admission is then withdrawn by its exact key).
IN_PROGRESS_TRIES = 6
_CANCEL_CODES = {"None", "ConditionalCheckFailed", "TransactionConflict", None}


class Cancelled(Exception):
    """A transaction that DynamoDB cancelled: per item, its reason (and ALL_OLD item)."""

    def __init__(self, reasons: list[dict[str, Any]]) -> None:
        self.reasons = reasons
        self.conflict = any(r.get("Code") == "TransactionConflict" for r in reasons)

    def failed(self, index: int) -> bool:
        return (
            index < len(self.reasons)
            and self.reasons[index].get("Code") == "ConditionalCheckFailed"
        )

    def item(self, index: int) -> dict[str, Any]:
        if index < len(self.reasons):
            return dict(self.reasons[index].get("Item") or {})
        return {}


class Table:
    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.name = name

    def transact(self, items: list[dict[str, Any]]) -> None:
        """One transaction, exactly once. Every attempt carries the same ClientRequestToken
        (botocore's retries after a timeout, and ours after TransactionInProgress), so an
        attempt that landed but whose answer was lost is answered, not applied again. A new
        token here could admit twice: the landed lease would hold its slot until expiry."""
        token = uuid.uuid4().hex
        for attempt in range(IN_PROGRESS_TRIES):
            try:
                self.client.transact_write_items(TransactItems=items, ClientRequestToken=token)
                return
            except ClientError as exc:
                response: dict[str, Any] = dict(exc.response)
                code = response.get("Error", {}).get("Code", "")
                if code == "TransactionInProgressException":
                    # Our own earlier attempt is still being applied: ask again, same token.
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if code == "TransactionCanceledException":
                    reasons = response.get("CancellationReasons") or []
                    if {r.get("Code") for r in reasons} <= _CANCEL_CODES:
                        raise Cancelled(reasons) from None
                if code == "TransactionConflictException":
                    raise Cancelled([{"Code": "TransactionConflict"}]) from None
                log.error("DynamoDB TransactWriteItems failed: %s", code)
                raise unavailable(code) from None
            except BotoCoreError as exc:
                log.error("DynamoDB TransactWriteItems failed: %s", exc)
                raise unavailable("") from None
        log.error("DynamoDB TransactWriteItems stayed in progress")
        raise unavailable("TransactionInProgressException")

    def call(self, operation: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, operation)(**kwargs)
        except ClientError as exc:
            response: dict[str, Any] = dict(exc.response)  # loosen botocore's TypedDict
            code = response.get("Error", {}).get("Code", "")
            log.error("DynamoDB %s failed: %s", operation, code)
            raise unavailable(code) from None
        except BotoCoreError as exc:
            log.error("DynamoDB %s failed: %s", operation, exc)
            raise unavailable("") from None

    def get(self, pk: str, sk: str, consistent: bool) -> dict[str, Any] | None:
        answer = self.call(
            "get_item", TableName=self.name, Key=key(pk, sk), ConsistentRead=consistent
        )
        item: dict[str, Any] | None = answer.get("Item")
        return item

    def batch_get(self, keys: Sequence[dict[str, Any]], consistent: bool) -> list[dict[str, Any]]:
        """The items that exist among `keys` (any number: BATCH_GET_MAX_KEYS per call)."""
        found: list[dict[str, Any]] = []
        for start in range(0, len(keys), BATCH_GET_MAX_KEYS):
            request: dict[str, Any] = {
                self.name: {
                    "Keys": list(keys[start : start + BATCH_GET_MAX_KEYS]),
                    "ConsistentRead": consistent,
                }
            }
            for _ in range(3):
                answer = self.call("batch_get_item", RequestItems=request)
                found += answer.get("Responses", {}).get(self.name, [])
                request = answer.get("UnprocessedKeys") or {}
                if not request:
                    break
            else:
                raise LimiterUnavailable("the lease table did not answer every key; retry later")
        return found

    def states(self, pools: Sequence[str]) -> list[dict[str, Any]]:
        return self.batch_get([key(p, STATE_SK) for p in pools], consistent=True)

    def query(self, **kwargs: Any) -> dict[str, Any]:
        answer: dict[str, Any] = self.call("query", TableName=self.name, **kwargs)
        return answer


def unavailable(code: str) -> LimiterUnavailable:
    return LimiterUnavailable(
        f"the lease table is unavailable ({code or 'unreachable'}); no request is admitted",
        retry_after=1,
    )


def pause() -> None:
    """After a transaction conflict: a short random pause so that the writers spread out."""
    time.sleep(random.uniform(0.002, 0.02))
