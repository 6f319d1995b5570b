"""A conflict-faithful DynamoDB for tests: an HTTP proxy in front of DynamoDB Local that is as
strict as real DynamoDB where DynamoDB Local is kinder.

What real DynamoDB does (Developer Guide, "Transaction conflict handling", and the API
reference of TransactWriteItems / BatchGetItem):
- Transactions run optimistically. While a TransactWriteItems is under way (from the moment it
  arrives until it has committed), every item it touches is taken:
  - another TransactWriteItems touching one of them is cancelled: TransactionCanceledException
    with one CancellationReason per action, `TransactionConflict` for the taken items and
    `None` for the others. botocore does not retry it;
  - a PutItem / UpdateItem / DeleteItem on one of them fails with TransactionConflictException;
  - a TransactGetItems reading one of them is cancelled like a transaction;
  - GetItem, Query, Scan and BatchGetItem read the last committed state: no conflict.
  The same transaction sent again (same ClientRequestToken, as botocore's retries do) while it
  is still under way gets TransactionInProgressException.
- Under load DynamoDB throttles: a cancelled transaction with `ThrottlingError` (or
  `ProvisionedThroughputExceeded`) reasons, ProvisionedThroughputExceededException or
  ThrottlingException for other requests (botocore's standard retry mode retries those two
  itself, so one call may be several throttled requests).
- BatchGetItem may answer only part of the keys and return the rest in `UnprocessedKeys`
  (never all of them: with none readable it throws instead).

DynamoDB Local serializes transactions, so none of this ever happens there. This proxy
reproduces it: a TransactWriteItems holds its items from its arrival for its commit time,
`commit_s` (or until DynamoDB Local answered it, if that took longer; its answer reaches the
client only then: a transaction takes at least its commit time), and conflicting requests
are answered by the proxy, never forwarded, so they change nothing. Throttling is injected at a
rate (`throttle`) or scripted request by request (`inject`), and BatchGetItem answers can be cut
short (`unprocessed`). Everything DelayingProxy does (latency, lost answers, request-limit
checks) still applies.

    with ConflictingDynamoDB(dynamodb_local.url, commit_s=0.01) as store:
        store.throttle("TransactWriteItems", share=0.1)
        store.inject("TransactWriteItems", ["conflict"] * 4, when=deletes_a_lease)
        ...  # point the code under test at store.url
        assert store.conflicts["TransactWriteItems"] == 4
"""

from __future__ import annotations

import collections
import json
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.support.delaying_proxy import Answer, DelayingProxy

__all__ = ["ConflictingDynamoDB"]

ERROR_PREFIX = "com.amazonaws.dynamodb.v20120810#"
SINGLE_WRITES = {"PutItem": "Item", "UpdateItem": "Key", "DeleteItem": "Key"}
TRANSACT_ACTIONS = {"ConditionCheck": "Key", "Put": "Item", "Update": "Key", "Delete": "Key"}
# The operations a "conflict" can hit; reads never conflict.
CONFLICTING = {"TransactWriteItems", "TransactGetItems", *SINGLE_WRITES}
OUTCOMES = {"conflict", "throttle", "ok"}

CONFLICT_REASON = {"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"}
NO_REASON = {"Code": "None"}
THROTTLE_REASONS = {
    "ThrottlingError": "Throttling on table",
    "ProvisionedThroughputExceeded": "The level of configured provisioned throughput for the "
    "table was exceeded. Consider increasing your provisioning level with the UpdateTable API.",
}
THROTTLE_ERRORS = {
    "ProvisionedThroughputExceededException": THROTTLE_REASONS["ProvisionedThroughputExceeded"],
    "ThrottlingException": "Rate of requests exceeds the allowed throughput.",
}

Predicate = Callable[[dict[str, Any]], bool]
ItemId = tuple[str, str]  # (table, the item's primary key as canonical JSON)


@dataclass
class _Throttle:
    share: float
    reason: str  # the CancellationReason code of a throttled transaction
    error: str  # the exception of any other throttled request


@dataclass
class _Script:
    operation: str
    outcomes: collections.deque[str]
    when: Predicate | None
    reason: str
    error: str


@dataclass
class _Unprocessed:
    share: float
    keys: int | None  # a fixed number of keys held back per request, instead of `share`
    requests: int | None  # how many more requests to cut short; None: all of them


@dataclass(eq=False)  # compared by identity: each transaction under way is its own holder
class _Transaction:
    token: str | None
    items: list[ItemId] = field(default_factory=list)
    until: float = 0.0  # time.monotonic(): its commit time is over, its items are free


class ConflictingDynamoDB(DelayingProxy):
    def __init__(
        self,
        upstream: str,
        commit_s: float = 0.010,
        *,
        seed: int = 1,
        key_schema: Mapping[str, Sequence[str]] | None = None,
        cancels: bool = True,
    ) -> None:
        """`commit_s`: how long a transaction holds its items from its arrival (may be
        changed at any time). `key_schema`: each table's key attributes, by default
        those of template.yaml's tables; for another table a Put's key is its `pk` and `sk`.
        `cancels=False`: the same store with nothing cancelled or failed for overlapping (a
        transaction still answers after its commit time): the baseline that isolates what
        cancellations cost."""
        super().__init__(upstream, seed=seed)
        self.commit_s = commit_s
        self.cancels = cancels
        self.key_schema = dict(key_schema) if key_schema is not None else _template_keys()
        self.holds: dict[ItemId, _Transaction] = {}
        self.throttles: dict[str, _Throttle] = {}
        self.scripts: list[_Script] = []
        self.partial: _Unprocessed | None = None
        # Counters, per operation: requests answered with a conflict (real or injected),
        # throttled, answered from a script, and forwarded to DynamoDB Local.
        self.conflicts: collections.Counter[str] = collections.Counter()
        self.throttled: collections.Counter[str] = collections.Counter()
        self.injected: collections.Counter[str] = collections.Counter()
        self.forwarded: collections.Counter[str] = collections.Counter()
        self.unprocessed_keys = 0  # BatchGetItem keys returned in UnprocessedKeys

    # -- configuration ---------------------------------------------------------------------

    def throttle(
        self,
        operation: str = "*",
        share: float = 0.1,
        *,
        reason: str = "ThrottlingError",
        error: str = "ProvisionedThroughputExceededException",
    ) -> None:
        """Throttle a `share` of the requests of `operation` ("*" for all; share 0 stops it).
        A transaction is cancelled with `reason` ("ThrottlingError" or
        "ProvisionedThroughputExceeded") for every action; any other request fails with
        `error` ("ProvisionedThroughputExceededException" or "ThrottlingException")."""
        _check(reason, THROTTLE_REASONS, "reason")
        _check(error, THROTTLE_ERRORS, "error")
        with self.lock:
            if share <= 0:
                self.throttles.pop(operation, None)
            else:
                self.throttles[operation] = _Throttle(share, reason, error)

    def inject(
        self,
        operation: str,
        outcomes: Iterable[str],
        when: Predicate | None = None,
        *,
        reason: str = "ThrottlingError",
        error: str = "ProvisionedThroughputExceededException",
    ) -> None:
        """Answer the next requests of `operation` ("*" for any) that `when` accepts (a
        predicate on the request's JSON body; None accepts all) with `outcomes`, in order:
        "conflict" (a transaction cancelled with TransactionConflict reasons, or a single-item
        write's TransactionConflictException), "throttle" (as `throttle` does) or "ok" (no
        fault from the script: handled as usual). Scripts apply before `throttle` and before
        real conflicts, in the order they were added; a "conflict" never applies to a read."""
        queue = collections.deque(outcomes)
        unknown = set(queue) - OUTCOMES
        if unknown:
            raise ValueError(f"unknown outcomes {sorted(unknown)}; known: {sorted(OUTCOMES)}")
        if "conflict" in queue and operation != "*" and operation not in CONFLICTING:
            raise ValueError(f"{operation} never conflicts; conflicts hit {sorted(CONFLICTING)}")
        _check(reason, THROTTLE_REASONS, "reason")
        _check(error, THROTTLE_ERRORS, "error")
        with self.lock:
            self.scripts.append(_Script(operation, queue, when, reason, error))

    def unprocessed(
        self, share: float = 0.5, *, keys: int | None = None, requests: int | None = None
    ) -> None:
        """Cut BatchGetItem answers short: of each request's keys, `share` (or a fixed number
        of `keys`) are not read but returned in UnprocessedKeys, at least one key always
        read. Applies to the next `requests` requests with more than one key (None: all);
        share 0 stops it."""
        with self.lock:
            stop = share <= 0 and keys is None
            self.partial = None if stop else _Unprocessed(share, keys, requests)

    def reset(self) -> None:
        """Forget rules, counters and holds (DelayingProxy's as well)."""
        super().reset()
        with self.lock:
            self.holds.clear()  # a transaction still under way then releases nothing
            self.throttles.clear()
            self.scripts.clear()
            self.partial = None
            self.conflicts.clear()
            self.throttled.clear()
            self.injected.clear()
            self.forwarded.clear()
            self.unprocessed_keys = 0

    # -- observation -----------------------------------------------------------------------

    def client(self) -> Any:
        """A DynamoDB client of this store, with Hermes' retry policy (hermes.aws) and room
        for every test thread's connection."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "dynamodb",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",
            config=Config(
                max_pool_connections=32, retries={"mode": "legacy", "total_max_attempts": 3}
            ),
        )

    @property
    def transactions_forwarded(self) -> int:
        return self.forwarded["TransactWriteItems"]

    def _holder(self, item: ItemId) -> _Transaction | None:
        """The transaction holding `item` now, if any (call with the lock held)."""
        return self._committing(item) if self.cancels else None

    def _committing(self, item: ItemId) -> _Transaction | None:
        holder = self.holds.get(item)
        return holder if holder is not None and holder.until > time.monotonic() else None

    def held(self) -> list[tuple[str, dict[str, Any]]]:
        """The items of transactions still in their commit time, as (table, key)."""
        with self.lock:
            return [(t, json.loads(k)) for t, k in self.holds if self._committing((t, k))]

    # -- one request -----------------------------------------------------------------------

    def exchange(
        self, operation: str, body: bytes, forward: Callable[[bytes], Answer]
    ) -> Answer | None:
        before, after, drop = self._plan(operation, body)  # counts, limit checks, latency
        time.sleep(before)  # on its way to DynamoDB
        answer = self._respond(operation, _parse(body), body, forward)
        if drop:
            return None  # whatever happened, the client never hears of it
        time.sleep(after)  # on its way back
        return answer

    def _respond(
        self,
        operation: str,
        params: dict[str, Any],
        body: bytes,
        forward: Callable[[bytes], Answer],
    ) -> Answer:
        refusal = self._refusal(operation, params)
        if refusal is not None:
            return refusal
        if operation == "TransactWriteItems":
            return self._transact_write(params, body, forward)
        if operation == "TransactGetItems":
            items = [self._item_id(get.get("Get", {}), "Key") for get in _actions(params)]
            with self.lock:
                taken = [self._holder(item) is not None for item in items]
            if any(taken):
                return self._conflict(operation, taken)
        elif operation in SINGLE_WRITES:
            item = self._item_id(params, SINGLE_WRITES[operation])
            with self.lock:
                taken_one = self._holder(item) is not None
            if taken_one:
                return self._conflict(operation, [True])
        elif operation == "BatchGetItem":
            return self._batch_get(params, body, forward)
        with self.lock:
            self.forwarded[operation] += 1
        return forward(body)

    def _refusal(self, operation: str, params: dict[str, Any]) -> Answer | None:
        """A scripted or random conflict or throttling for this request, if any."""
        with self.lock:
            for script in self.scripts:
                outcome = script.outcomes[0]
                if (
                    script.operation in (operation, "*")
                    and (outcome != "conflict" or operation in CONFLICTING)
                    and (script.when is None or script.when(params))
                ):
                    script.outcomes.popleft()
                    if not script.outcomes:
                        self.scripts.remove(script)
                    self.injected[operation] += 1
                    if outcome == "ok":
                        break  # on as usual: random throttling and real conflicts still apply
                    if outcome == "conflict":
                        conflict = [True] * len(_actions(params))
                        return self._conflict(operation, conflict or [True], locked=True)
                    return self._throttled(operation, params, script.reason, script.error)
            rule = self.throttles.get(operation) or self.throttles.get("*")
            if rule is not None and self.rng.random() < rule.share:
                return self._throttled(operation, params, rule.reason, rule.error)
        return None

    def _transact_write(
        self, params: dict[str, Any], body: bytes, forward: Callable[[bytes], Answer]
    ) -> Answer:
        me = _Transaction(params.get("ClientRequestToken"))
        me.items = [
            self._item_id(spec, TRANSACT_ACTIONS[kind])
            for action in _actions(params)
            for kind, spec in action.items()
            if kind in TRANSACT_ACTIONS
        ]
        # Check and take every item under one lock: two transactions arriving together must
        # not both find their items free.
        with self.lock:
            holders = [self._holder(item) for item in me.items]
            if not any(holders):
                me.until = time.monotonic() + self.commit_s
                for item in me.items:
                    self.holds[item] = me
                self.forwarded["TransactWriteItems"] += 1
        if any(holders):
            others = {holder.token for holder in holders if holder is not None}
            if me.token is not None and others == {me.token}:
                # Its own earlier attempt (a retry after a lost answer) is still committing.
                return _error(
                    "TransactionInProgressException",
                    "The transaction with the given request token is already in progress.",
                    key="Message",
                )
            return self._conflict("TransactWriteItems", [h is not None for h in holders])
        try:
            answer = forward(body)
            if answer[0] == 200:
                # Committing: the items stay taken for the commit time from its arrival, and
                # the client hears only once it is over. (DynamoDB Local, which serializes,
                # may take longer on a loaded machine: that is its latency, not a longer
                # hold.) A cancelled transaction (a failed condition) has nothing to commit.
                time.sleep(max(0.0, me.until - time.monotonic()))
            return answer
        finally:
            with self.lock:
                for item in me.items:
                    if self.holds.get(item) is me:  # reset() may have cleared it already
                        del self.holds[item]

    def _batch_get(
        self, params: dict[str, Any], body: bytes, forward: Callable[[bytes], Answer]
    ) -> Answer:
        requested = [
            (table, index)
            for table, spec in params.get("RequestItems", {}).items()
            for index in range(len(spec.get("Keys", [])))
        ]
        with self.lock:
            self.forwarded["BatchGetItem"] += 1
            rule = self.partial
            count = 0
            if rule is not None and len(requested) > 1:
                wanted = rule.keys if rule.keys is not None else round(rule.share * len(requested))
                # DynamoDB reads at least one key; with none readable it throws instead.
                count = max(0, min(wanted, len(requested) - 1))
            held_back = set(self.rng.sample(requested, count))
            if count and rule is not None and rule.requests is not None:
                rule.requests -= 1
                if rule.requests <= 0:
                    self.partial = None
            self.unprocessed_keys += count
        if not held_back:
            return forward(body)
        sent: dict[str, Any] = {}
        left: dict[str, Any] = {}
        for table, spec in params["RequestItems"].items():
            keys = spec.get("Keys", [])
            # UnprocessedKeys carries each table's other fields (projection, consistency) too,
            # so a client can send it back as RequestItems unchanged.
            for target, chosen in (
                (sent, [k for i, k in enumerate(keys) if (table, i) not in held_back]),
                (left, [k for i, k in enumerate(keys) if (table, i) in held_back]),
            ):
                if chosen:
                    target[table] = {**spec, "Keys": chosen}
        status, headers, content = forward(json.dumps({**params, "RequestItems": sent}).encode())
        if status != 200:
            return status, headers, content
        result = json.loads(content)
        unprocessed = result.setdefault("UnprocessedKeys", {})
        for table, spec in left.items():
            if table in unprocessed:
                unprocessed[table]["Keys"] += spec["Keys"]
            else:
                unprocessed[table] = spec
        content = json.dumps(result).encode()
        # botocore checks the body against x-amz-crc32: it must describe the new body.
        headers = [(k, v) for k, v in headers if k.lower() != "x-amz-crc32"]
        return status, [*headers, ("x-amz-crc32", _crc32(content))], content

    # -- answers in DynamoDB's place -------------------------------------------------------

    def _conflict(self, operation: str, taken: list[bool], *, locked: bool = False) -> Answer:
        if locked:
            self.conflicts[operation] += 1
        else:
            with self.lock:
                self.conflicts[operation] += 1
        if operation in SINGLE_WRITES:
            return _error("TransactionConflictException", "Transaction is ongoing for the item")
        return _cancelled([CONFLICT_REASON if t else NO_REASON for t in taken])

    def _throttled(self, operation: str, params: dict[str, Any], reason: str, error: str) -> Answer:
        """Called with the lock held."""
        self.throttled[operation] += 1
        if operation in ("TransactWriteItems", "TransactGetItems"):
            code = {"Code": reason, "Message": THROTTLE_REASONS[reason]}
            return _cancelled([code] * max(1, len(_actions(params))))
        return _error(error, THROTTLE_ERRORS[error])

    def _item_id(self, spec: dict[str, Any], where: str) -> ItemId:
        """The item a request or action touches: its table and full primary key."""
        table = spec.get("TableName", "")
        attributes = spec.get(where) or {}
        if where == "Item":  # a Put names the whole item: keep only its key attributes
            names = self.key_schema.get(table) or [n for n in ("pk", "sk") if n in attributes]
            if names:
                attributes = {n: attributes[n] for n in names if n in attributes}
        return table, json.dumps(attributes, sort_keys=True)


def _template_keys() -> dict[str, list[str]]:
    from local.template import table_definitions

    return {
        name: [key["AttributeName"] for key in definition["KeySchema"]]
        for name, definition in table_definitions().items()
    }


def _parse(body: bytes) -> dict[str, Any]:
    try:
        params = json.loads(body or b"{}")
    except ValueError:
        return {}
    return params if isinstance(params, dict) else {}


def _actions(params: dict[str, Any]) -> list[dict[str, Any]]:
    actions = params.get("TransactItems")
    return actions if isinstance(actions, list) else []


def _check(value: str, known: Mapping[str, str], what: str) -> None:
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; known: {sorted(known)}")


def _crc32(content: bytes) -> str:
    return str(zlib.crc32(content) & 0xFFFFFFFF)


def _error(kind: str, message: str, *, key: str = "message", **extra: Any) -> Answer:
    """A 400 as DynamoDB sends it; botocore reads the code from `__type`."""
    content = json.dumps({"__type": ERROR_PREFIX + kind, key: message, **extra}).encode()
    headers = [
        ("Content-Type", "application/x-amz-json-1.0"),
        ("x-amzn-RequestId", str(uuid.uuid4())),
        ("x-amz-crc32", _crc32(content)),
    ]
    return 400, headers, content


def _cancelled(reasons: list[dict[str, str]]) -> Answer:
    codes = ", ".join(reason["Code"] for reason in reasons)
    # "Message" capitalised, as DynamoDB Local sends it and as botocore's model names it, so
    # it lands in the exception's response["Message"]; one reason per action, in order.
    return _error(
        "TransactionCanceledException",
        f"Transaction cancelled, please refer cancellation reasons for specific reasons [{codes}]",
        key="Message",
        CancellationReasons=reasons,
    )
