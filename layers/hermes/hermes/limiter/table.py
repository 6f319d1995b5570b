"""The DynamoDB adapter of the limiter: ClientError codes become domain outcomes.

- A transaction cancelled because a condition failed is `Cancelled`, with each item's reason.
- A transaction conflict (real DynamoDB cancels a transaction that touches an item another
  transaction is still committing, and fails a single-item write to such an item) and
  throttling (`ThrottlingError` / `ProvisionedThroughputExceeded` reasons, the throughput
  exceptions once botocore's own retries are spent) are `Contended`: DynamoDB is there and
  busy. Callers retry them with `Backoff` (exponential, full jitter) within their deadline;
  an admission that runs out of time answers 429, never 503.
- Anything else is `LimiterUnavailable` (503, fail closed: nothing runs without a committed
  write), which is what the LimiterErrors alarm counts."""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from hermes.errors import LimiterUnavailable
from hermes.limiter.light_client import LightCallFailed, LightClient
from hermes.limiter.records import STATE_SK, key

log = logging.getLogger("hermes.limiter")

# BatchGetItem takes at most 100 keys per call.
BATCH_GET_MAX_KEYS = 100
# Answers "still in progress" to a retried transaction before giving up (LimiterUnavailable:
# an admission is then withdrawn by its exact key).
IN_PROGRESS_TRIES = 6
# Cancellation reasons and error codes that mean "busy, try again" rather than "no".
CONTENDED_REASONS = {"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"}
CONTENDED_CODES = {
    "TransactionConflictException",
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
}
_CANCEL_CODES = {"None", "ConditionalCheckFailed", None}
# Backoff after contention: full jitter over an exponential ceiling (AWS's advice for
# optimistic concurrency). The base is about one commit of a real transaction (~10 ms), so a
# retry rarely lands on the commit that cancelled it; the cap keeps a retry within a
# fraction of a model's answer time.
BACKOFF_BASE_S = 0.01
BACKOFF_CAP_S = 0.25
# A release or handoff retries sooner and never pauses long: while it backs off, its slot is
# idle and the waiters behind it wait; an admission or a queue entry backing off idles nothing.
RELEASE_BACKOFF_BASE_S = 0.004
RELEASE_BACKOFF_CAP_S = 0.04
# How long a read (BatchGetItem's unprocessed keys, a throttled query) is retried when its
# caller set no deadline of its own.
READ_PATIENCE_S = 2.0


class Cancelled(Exception):
    """A transaction whose condition failed: per item, its reason (and ALL_OLD item)."""

    def __init__(self, reasons: list[dict[str, Any]]) -> None:
        self.reasons = reasons

    def failed(self, index: int) -> bool:
        return (
            index < len(self.reasons)
            and self.reasons[index].get("Code") == "ConditionalCheckFailed"
        )

    def item(self, index: int) -> dict[str, Any]:
        if index < len(self.reasons):
            return dict(self.reasons[index].get("Item") or {})
        return {}


class Contended(Exception):
    """DynamoDB is busy for now (a transaction conflict or throttling): retry with Backoff."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code
        self.throttled = "Conflict" not in code


class Backoff:
    """Retries after contention until `until_ms` (epoch ms by `clock`): each `wait` sleeps a
    random time in the upper three quarters of an exponentially growing ceiling, and says
    False instead once that sleep would end past the deadline. The deadline is kept on the
    monotonic clock (a limiter's clock may be a test's, which does not move by itself)."""

    def __init__(
        self,
        until_ms: int,
        clock: Callable[[], float] = time.time,
        base_s: float = BACKOFF_BASE_S,
        cap_s: float = BACKOFF_CAP_S,
    ) -> None:
        self._deadline = time.monotonic() + (until_ms - clock() * 1000) / 1000
        self._base_s, self._cap_s = base_s, cap_s
        self.tries = 0

    def wait(self) -> bool:
        ceiling = min(self._cap_s, self._base_s * 2**self.tries)
        delay = random.uniform(ceiling / 4, ceiling)
        if time.monotonic() + delay >= self._deadline:
            return False
        self.tries += 1
        time.sleep(delay)
        return True

    def left_ms(self) -> int:
        return int((self._deadline - time.monotonic()) * 1000)


class Table:
    def __init__(self, client: Any, name: str, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.name = name
        self.clock = clock
        # How long DynamoDB has been taking to answer (a moving average): a release close to
        # its deadline chooses the path that still fits.
        self.latency_s = 0.01
        self.light: LightClient | None = None  # calls without boto3, when set (light_client)

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.latency_s = 0.7 * self.latency_s + 0.3 * (time.monotonic() - started)

    def backoff(self, patience_s: float = READ_PATIENCE_S) -> Backoff:
        return Backoff(int((self.clock() + patience_s) * 1000), self.clock)

    def transact(self, items: list[dict[str, Any]]) -> None:
        """One transaction, exactly once. Every attempt carries the same ClientRequestToken
        (botocore's retries after a timeout, and ours after TransactionInProgress), so an
        attempt that landed but whose answer was lost is answered, not applied again. A new
        token here could admit twice: the landed lease would hold its slot until expiry.
        Raises Cancelled (a condition failed), Contended (conflict, throttling: nothing was
        written, retry) or LimiterUnavailable."""
        token = uuid.uuid4().hex
        for attempt in range(IN_PROGRESS_TRIES):
            try:
                with self._timed():
                    request = {"TransactItems": items, "ClientRequestToken": token}
                    self.send("transact_write_items", request)
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
                    codes = {r.get("Code") for r in reasons}
                    contended = codes & CONTENDED_REASONS
                    if contended:
                        raise Contended(min(contended)) from None
                    if codes <= _CANCEL_CODES:
                        raise Cancelled(reasons) from None
                if code in CONTENDED_CODES:
                    raise Contended(code) from None
                log.error("DynamoDB TransactWriteItems failed: %s", code)
                raise unavailable(code) from None
            except BotoCoreError as exc:
                log.error("DynamoDB TransactWriteItems failed: %s", exc)
                raise unavailable("") from None
        log.error("DynamoDB TransactWriteItems stayed in progress")
        raise unavailable("TransactionInProgressException")

    def update(self, request: dict[str, Any]) -> dict[str, Any]:
        """One conditional UpdateItem; its returned attributes. A failed condition is
        `Cancelled` with one reason, whose item is the state before (ALL_OLD, or read
        afresh where the store does not return it). A retry of an update whose answer was
        lost meets its own write: the conditions make that visible (writes.py)."""
        try:
            answer = self.call("update_item", **request)
        except Cancelled as cancelled:
            if cancelled.reasons[0].get("Item") is not None:
                raise
            found = self.read(
                "get_item", TableName=self.name, Key=request["Key"], ConsistentRead=True
            )
            old = found.get("Item") or {}
            raise Cancelled([{"Code": "ConditionalCheckFailed", "Item": old}]) from None
        return dict(answer.get("Attributes") or {})

    def call(self, operation: str, **kwargs: Any) -> Any:
        """One request; Cancelled when its condition failed (with the item before, if it
        asked for ALL_OLD), Contended when DynamoDB throttled it (after botocore's own
        retries) or a transaction holds its item, LimiterUnavailable for anything else."""
        try:
            with self._timed():
                return self.send(operation, kwargs)
        except ClientError as exc:
            response: dict[str, Any] = dict(exc.response)  # loosen botocore's TypedDict
            code = response.get("Error", {}).get("Code", "")
            if code == "ConditionalCheckFailedException":
                reason = {"Code": "ConditionalCheckFailed", "Item": response.get("Item")}
                raise Cancelled([reason]) from None
            if code in CONTENDED_CODES:
                raise Contended(code) from None
            log.error("DynamoDB %s failed: %s", operation, code)
            raise unavailable(code) from None
        except BotoCoreError as exc:
            log.error("DynamoDB %s failed: %s", operation, exc)
            raise unavailable("") from None

    def send(self, operation: str, request: dict[str, Any]) -> Any:
        """The request through the light client when there is one, else (or when it did not
        get DynamoDB's answer) through boto3. Raises botocore's errors either way."""
        if self.light is not None and operation in self.light.operations:
            try:
                return self.light.call(operation, request)
            except LightCallFailed as failed:  # boto3 sends it: its retries, its errors
                log.debug("light %s failed, sent through boto3: %s", operation, failed)
        return getattr(self.client, operation)(**request)

    def read(self, operation: str, backoff: Backoff | None = None, **kwargs: Any) -> Any:
        """A read, retried with backoff while throttled (until `backoff`'s deadline, by
        default READ_PATIENCE_S); then Contended."""
        backoff = backoff or self.backoff()
        while True:
            try:
                return self.call(operation, **kwargs)
            except Contended:
                if not backoff.wait():
                    raise

    def get(self, pk: str, sk: str, consistent: bool) -> dict[str, Any] | None:
        answer = self.read(
            "get_item", TableName=self.name, Key=key(pk, sk), ConsistentRead=consistent
        )
        item: dict[str, Any] | None = answer.get("Item")
        return item

    def batch_get(
        self, keys: Sequence[dict[str, Any]], consistent: bool, backoff: Backoff | None = None
    ) -> list[dict[str, Any]]:
        """The items that exist among `keys` (any number: BATCH_GET_MAX_KEYS per call).
        DynamoDB answers part of a batch when it throttles: the rest (UnprocessedKeys) is
        asked again after a backoff, until `backoff`'s deadline; then Contended."""
        backoff = backoff or self.backoff()
        found: list[dict[str, Any]] = []
        for start in range(0, len(keys), BATCH_GET_MAX_KEYS):
            request: dict[str, Any] = {
                self.name: {
                    "Keys": list(keys[start : start + BATCH_GET_MAX_KEYS]),
                    "ConsistentRead": consistent,
                }
            }
            while request:
                answer = self.read("batch_get_item", backoff, RequestItems=request)
                found += answer.get("Responses", {}).get(self.name, [])
                request = answer.get("UnprocessedKeys") or {}
                if request and not backoff.wait():
                    raise Contended("UnprocessedKeys")
        return found

    def states(self, pools: Sequence[str]) -> list[dict[str, Any]]:
        return self.batch_get([key(p, STATE_SK) for p in pools], consistent=True)

    def query(self, **kwargs: Any) -> dict[str, Any]:
        answer: dict[str, Any] = self.read("query", TableName=self.name, **kwargs)
        return answer


def unavailable(code: str) -> LimiterUnavailable:
    return LimiterUnavailable(
        f"the lease table is unavailable ({code or 'unreachable'}); no request is admitted",
        retry_after=1,
    )
