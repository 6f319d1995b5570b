"""The conflict-faithful store (conflict_store.py) answers as real DynamoDB does, seen through a
real boto3 client: overlapping transactions conflict, single-item writes on a held item fail,
reads pass, throttling and scripted faults land where asked, BatchGetItem can come back short.

Timing: where two requests must overlap, the first holds its items for a generous 0.3 s and
the second is sent only once the store shows the first one's items held, so a loaded machine
cannot make the test flaky."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.retries import standard

from local.dynamodb_local import DynamoDBLocal

from .conflict_store import ConflictingDynamoDB

pytestmark = pytest.mark.integration

TABLE = "LeaseTable"
HOLD_S = 0.3  # long enough that a request sent while it lasts surely overlaps


@pytest.fixture(scope="module")
def dynamodb_local() -> Iterator[DynamoDBLocal]:
    server = DynamoDBLocal().start()
    server.create_tables()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_store(dynamodb_local: DynamoDBLocal) -> Iterator[ConflictingDynamoDB]:
    with ConflictingDynamoDB(dynamodb_local.url, commit_s=HOLD_S) as proxy:
        yield proxy


@pytest.fixture
def store(shared_store: ConflictingDynamoDB) -> ConflictingDynamoDB:
    """The module's store, without the last test's rules, counters and holds."""
    shared_store.reset()
    shared_store.commit_s = HOLD_S
    shared_store.rng.seed(1)  # the same random draws whichever tests ran before
    return shared_store


@functools.cache
def _client(url: str, attempts: int) -> Any:
    return boto3.client(
        "dynamodb",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
        config=Config(
            retries={"mode": "standard", "total_max_attempts": attempts},
            max_pool_connections=32,
        ),
    )


def client(store: ConflictingDynamoDB, attempts: int = 1) -> Any:
    """A real boto3 client through the store; one attempt, so every raw error shows."""
    return _client(store.url, attempts)


def key(name: str) -> dict[str, Any]:
    return {"pk": {"S": name}, "sk": {"S": "item"}}


def fresh() -> str:
    """A key no other test uses: the tables are shared by the whole module."""
    return f"test#{uuid.uuid4().hex[:8]}"


def add(name: str, amount: int = 1) -> dict[str, Any]:
    """A transaction action: add `amount` to the item's counter `n`."""
    return {
        "Update": {
            "TableName": TABLE,
            "Key": key(name),
            "UpdateExpression": "ADD n :a",
            "ExpressionAttributeValues": {":a": {"N": str(amount)}},
        }
    }


def check(name: str) -> dict[str, Any]:
    return {
        "ConditionCheck": {
            "TableName": TABLE,
            "Key": key(name),
            "ConditionExpression": "attribute_not_exists(locked)",
        }
    }


def counter(dynamodb: Any, name: str) -> int | None:
    item = dynamodb.get_item(TableName=TABLE, Key=key(name), ConsistentRead=True).get("Item")
    return int(item["n"]["N"]) if item else None


def error(call: Callable[[], Any]) -> ClientError:
    with pytest.raises(ClientError) as caught:
        call()
    return caught.value


def in_background(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `call` in a thread; the dict gets its "result" or "error" and "elapsed"."""
    out: dict[str, Any] = {}

    def run() -> None:
        start = time.monotonic()
        try:
            out["result"] = call()
        except ClientError as caught:
            out["error"] = caught
        out["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait_held(store: ConflictingDynamoDB, name: str) -> None:
    deadline = time.monotonic() + 5
    while (TABLE, key(name)) not in store.held():
        assert time.monotonic() < deadline, f"{name} was never held"
        time.sleep(0.002)


def test_overlapping_transaction_is_cancelled_and_not_applied(store: ConflictingDynamoDB) -> None:
    dynamodb = client(store)
    hot, other = fresh(), fresh()
    first, out = in_background(lambda: dynamodb.transact_write_items(TransactItems=[add(hot)]))
    wait_held(store, hot)

    # The second touches `other` (free) and `hot` (held): cancelled, one reason per action.
    cancelled = error(
        lambda: dynamodb.transact_write_items(TransactItems=[add(other, 10), add(hot, 10)])
    )
    first.join()

    assert cancelled.response["Error"]["Code"] == "TransactionCanceledException"
    assert cancelled.response["CancellationReasons"] == [
        {"Code": "None"},
        {"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"},
    ]
    assert "[None, TransactionConflict]" in cancelled.response["Error"]["Message"]
    assert "error" not in out
    assert out["elapsed"] >= HOLD_S  # the first one's answer came after its commit
    assert counter(dynamodb, hot) == 1  # only the first was applied
    assert counter(dynamodb, other) is None
    assert store.conflicts["TransactWriteItems"] == 1
    assert store.transactions_forwarded == 1
    assert store.held() == []


def test_without_cancelling_overlaps_both_apply_after_their_commit_time(
    store: ConflictingDynamoDB,
) -> None:
    """The baseline mode (cancels=False): the same commit time, nothing cancelled."""
    store.cancels = False
    try:
        dynamodb = client(store)
        hot = fresh()
        first, out = in_background(lambda: dynamodb.transact_write_items(TransactItems=[add(hot)]))
        wait_held(store, hot)
        dynamodb.transact_write_items(TransactItems=[add(hot, 10)])
        first.join()
        assert "error" not in out and out["elapsed"] >= HOLD_S
        assert counter(dynamodb, hot) == 11
        assert store.conflicts == {}
    finally:
        store.cancels = True


def test_racing_transactions_on_one_item_never_both_apply(store: ConflictingDynamoDB) -> None:
    """Many threads at once: every transaction either committed (and counted) or was cancelled
    with a conflict, and the item's counter equals the commits."""
    dynamodb = client(store)
    hot = fresh()
    store.commit_s = 0.05  # any outcome is valid here: no need for a long hold
    start = threading.Barrier(12)

    def one(_: int) -> bool:
        start.wait()
        try:
            dynamodb.transact_write_items(TransactItems=[add(hot)])
        except ClientError as caught:
            reasons = caught.response["CancellationReasons"]
            assert reasons == [{"Code": "TransactionConflict", "Message": ANY_MESSAGE}]
            return False
        return True

    with ThreadPoolExecutor(12) as pool:
        committed = sum(pool.map(one, range(12)))

    assert committed >= 1
    assert counter(dynamodb, hot) == committed == store.transactions_forwarded
    assert store.conflicts["TransactWriteItems"] == 12 - committed


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY_MESSAGE: Any = _Any()


def test_transactions_on_other_items_commit_concurrently(store: ConflictingDynamoDB) -> None:
    dynamodb = client(store)
    one, two = fresh(), fresh()
    first, out = in_background(lambda: dynamodb.transact_write_items(TransactItems=[add(one)]))
    wait_held(store, one)

    dynamodb.transact_write_items(TransactItems=[add(two), check(fresh())])  # while `one` holds
    first.join()

    assert "error" not in out
    assert counter(dynamodb, one) == counter(dynamodb, two) == 1
    assert store.conflicts.total() == 0
    assert store.transactions_forwarded == 2


def test_single_item_writes_on_a_held_item_fail_and_reads_pass(
    store: ConflictingDynamoDB,
) -> None:
    dynamodb = client(store)
    hot = fresh()
    store.commit_s = 2 * HOLD_S  # six requests must fit in the hold, on a loaded machine too
    dynamodb.put_item(TableName=TABLE, Item={**key(hot), "n": {"N": "5"}})
    first, _ = in_background(lambda: dynamodb.transact_write_items(TransactItems=[add(hot)]))
    wait_held(store, hot)

    writes = [
        lambda: dynamodb.update_item(
            TableName=TABLE, Key=key(hot), UpdateExpression="SET n = :z",
            ExpressionAttributeValues={":z": {"N": "0"}},
        ),
        lambda: dynamodb.put_item(TableName=TABLE, Item={**key(hot), "n": {"N": "0"}}),
        lambda: dynamodb.delete_item(TableName=TABLE, Key=key(hot)),
    ]  # fmt: skip
    for write in writes:
        refused = error(write)
        assert refused.response["Error"]["Code"] == "TransactionConflictException"
        assert refused.response["Error"]["Message"] == "Transaction is ongoing for the item"
    read = error(
        lambda: dynamodb.transact_get_items(
            TransactItems=[{"Get": {"TableName": TABLE, "Key": key(hot)}}]
        )
    )
    assert read.response["CancellationReasons"][0]["Code"] == "TransactionConflict"
    # A read is answered at once: the state before the transaction (DynamoDB Local applies
    # the write before the commit time ends, so either value is a committed one).
    assert counter(dynamodb, hot) in (5, 6)
    assert (
        dynamodb.query(
            TableName=TABLE,
            KeyConditionExpression="pk = :p",
            ExpressionAttributeValues={":p": {"S": hot}},
        )["Count"]
        == 1
    )
    first.join()

    # Committed: the item is free again.
    assert store.held() == []
    dynamodb.update_item(
        TableName=TABLE,
        Key=key(hot),
        UpdateExpression="ADD n :a",
        ExpressionAttributeValues={":a": {"N": "10"}},
    )
    assert counter(dynamodb, hot) == 16
    assert store.conflicts == {
        "UpdateItem": 1,
        "PutItem": 1,
        "DeleteItem": 1,
        "TransactGetItems": 1,
    }


def test_put_in_a_transaction_holds_the_item_by_its_key(store: ConflictingDynamoDB) -> None:
    """A Put names a whole item; it conflicts with other requests on the same key only."""
    dynamodb = client(store)
    hot = fresh()
    put = {"Put": {"TableName": TABLE, "Item": {**key(hot), "n": {"N": "1"}}}}
    first, _ = in_background(lambda: dynamodb.transact_write_items(TransactItems=[put]))
    wait_held(store, hot)
    refused = error(lambda: dynamodb.transact_write_items(TransactItems=[check(hot)]))
    first.join()
    assert refused.response["CancellationReasons"][0]["Code"] == "TransactionConflict"


def test_the_same_transaction_sent_again_is_in_progress(store: ConflictingDynamoDB) -> None:
    """botocore retries a transaction with the same ClientRequestToken; while the first attempt
    is still committing, DynamoDB answers TransactionInProgressException."""
    dynamodb = client(store)
    hot, token = fresh(), uuid.uuid4().hex

    def send() -> Any:
        return dynamodb.transact_write_items(TransactItems=[add(hot)], ClientRequestToken=token)

    first, _ = in_background(send)
    wait_held(store, hot)
    assert error(send).response["Error"]["Code"] == "TransactionInProgressException"
    first.join()
    send()  # done: DynamoDB (Local) answers the same success without applying it again
    assert counter(dynamodb, hot) == 1


def test_commit_time_can_change(store: ConflictingDynamoDB) -> None:
    dynamodb = client(store)
    store.commit_s = 0.0
    start = time.monotonic()
    dynamodb.transact_write_items(TransactItems=[add(fresh())])
    assert time.monotonic() - start < HOLD_S
    assert store.held() == []


def test_a_failed_transaction_releases_at_once(store: ConflictingDynamoDB) -> None:
    """A transaction DynamoDB cancels (its condition failed) has nothing to commit."""
    dynamodb = client(store)
    hot = fresh()
    locked = {"Put": {"TableName": TABLE, "Item": {**key(hot), "locked": {"BOOL": True}}}}
    store.commit_s = 0.0
    dynamodb.transact_write_items(TransactItems=[locked])
    store.commit_s = HOLD_S
    start = time.monotonic()
    failed = error(lambda: dynamodb.transact_write_items(TransactItems=[check(hot)]))
    assert failed.response["CancellationReasons"][0]["Code"] == "ConditionalCheckFailed"
    assert time.monotonic() - start < HOLD_S
    assert store.held() == []


def test_throttling_hits_the_share_asked(store: ConflictingDynamoDB) -> None:
    dynamodb = client(store)
    name = fresh()
    store.throttle("GetItem", share=0.3)
    refused = 0
    for _ in range(200):
        try:
            dynamodb.get_item(TableName=TABLE, Key=key(name))
        except ClientError as caught:
            assert caught.response["Error"]["Code"] == "ProvisionedThroughputExceededException"
            refused += 1
    assert 40 <= refused <= 80  # 60 expected
    assert store.throttled == {"GetItem": refused}
    assert store.forwarded["GetItem"] == 200 - refused
    dynamodb.put_item(TableName=TABLE, Item=key(name))  # other operations are not throttled

    store.throttle("GetItem", share=0)
    dynamodb.get_item(TableName=TABLE, Key=key(name))


def test_throttled_requests_answer_as_configured(store: ConflictingDynamoDB) -> None:
    dynamodb = client(store)
    name = fresh()
    store.throttle(share=1.0)
    cancelled = error(
        lambda: dynamodb.transact_write_items(TransactItems=[add(name), check(fresh())])
    )
    assert (
        cancelled.response["CancellationReasons"]
        == [{"Code": "ThrottlingError", "Message": "Throttling on table"}] * 2
    )

    store.throttle(share=1.0, reason="ProvisionedThroughputExceeded", error="ThrottlingException")
    cancelled = error(lambda: dynamodb.transact_write_items(TransactItems=[add(name)]))
    assert cancelled.response["CancellationReasons"][0]["Code"] == "ProvisionedThroughputExceeded"
    refused = error(lambda: dynamodb.update_item(TableName=TABLE, Key=key(name)))
    assert refused.response["Error"]["Code"] == "ThrottlingException"
    assert store.throttled == {"TransactWriteItems": 2, "UpdateItem": 1}
    assert store.forwarded.total() == 0
    with pytest.raises(ValueError):
        store.throttle(reason="Slow")


def test_botocore_retries_a_throttled_read_and_each_attempt_counts(
    store: ConflictingDynamoDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Standard mode waits up to 1 s, then 2 s, before retrying a throttled request: skip that.
    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda *_: 0.0)
    dynamodb = client(store, attempts=3)
    name = fresh()
    store.inject("GetItem", ["throttle", "throttle"])
    assert "Item" not in dynamodb.get_item(TableName=TABLE, Key=key(name))
    assert store.throttled == {"GetItem": 2}
    assert store.forwarded["GetItem"] == 1


def test_scripted_faults_hit_only_the_requests_asked(store: ConflictingDynamoDB) -> None:
    dynamodb = client(store)
    lease, other = fresh(), fresh()
    dynamodb.put_item(TableName=TABLE, Item=key(lease))

    def deletes(params: dict[str, Any]) -> bool:  # e.g. "a release"
        return any("Delete" in action for action in params["TransactItems"])

    release = [{"Delete": {"TableName": TABLE, "Key": key(lease)}}]
    store.commit_s = 0.0
    store.inject("TransactWriteItems", ["conflict", "conflict", "throttle"], when=deletes)
    seen = []
    for _ in range(4):
        dynamodb.transact_write_items(TransactItems=[add(other)])  # never hit
        try:
            dynamodb.transact_write_items(TransactItems=release)
            seen.append("committed")
        except ClientError as caught:
            seen.append(caught.response["CancellationReasons"][0]["Code"])

    assert seen == ["TransactionConflict", "TransactionConflict", "ThrottlingError", "committed"]
    assert counter(dynamodb, other) == 4
    assert dynamodb.get_item(TableName=TABLE, Key=key(lease)).get("Item") is None
    assert store.injected == {"TransactWriteItems": 3}
    assert store.conflicts == {"TransactWriteItems": 2}
    assert store.throttled == {"TransactWriteItems": 1}
    assert store.transactions_forwarded == 5

    # Single-item writes get the exceptions; "ok" lets a request through in the sequence.
    store.inject("UpdateItem", ["ok", "conflict", "throttle"])

    def update() -> Any:
        return dynamodb.update_item(
            TableName=TABLE,
            Key=key(other),
            UpdateExpression="ADD n :a",
            ExpressionAttributeValues={":a": {"N": "1"}},
        )

    update()
    assert error(update).response["Error"]["Code"] == "TransactionConflictException"
    assert error(update).response["Error"]["Code"] == "ProvisionedThroughputExceededException"
    update()
    assert counter(dynamodb, other) == 6
    with pytest.raises(ValueError):
        store.inject("GetItem", ["conflict"])  # a read never conflicts


def test_batch_get_returns_unprocessed_keys_that_a_retry_reads(
    store: ConflictingDynamoDB,
) -> None:
    dynamodb = client(store)
    names = [fresh() for _ in range(10)]
    for name in names:
        dynamodb.put_item(TableName=TABLE, Item={**key(name), "n": {"N": "1"}})
    request = {
        TABLE: {
            "Keys": [key(name) for name in names],
            "ConsistentRead": True,
            "ProjectionExpression": "pk, #n",
            "ExpressionAttributeNames": {"#n": "n"},
        }
    }
    store.unprocessed(share=0.5, requests=1)

    first = dynamodb.batch_get_item(RequestItems=request)
    left = first["UnprocessedKeys"]
    assert len(first["Responses"][TABLE]) == 5
    assert len(left[TABLE]["Keys"]) == 5
    # The same shape DynamoDB uses: each table's request, with its other fields.
    assert {k: v for k, v in left[TABLE].items() if k != "Keys"} == {
        k: v for k, v in request[TABLE].items() if k != "Keys"
    }
    second = dynamodb.batch_get_item(RequestItems=left)  # the rule was for one request only
    assert second["UnprocessedKeys"] == {}
    read = {item["pk"]["S"] for item in first["Responses"][TABLE] + second["Responses"][TABLE]}
    assert read == set(names)
    assert all(set(item) == {"pk", "n"} for item in second["Responses"][TABLE])
    assert store.unprocessed_keys == 5

    # At least one key is always read, as in DynamoDB; a one-key request is never cut.
    store.unprocessed(share=1.0)
    assert len(dynamodb.batch_get_item(RequestItems=request)["Responses"][TABLE]) == 1
    single = {TABLE: {"Keys": [key(names[0])]}}
    assert dynamodb.batch_get_item(RequestItems=single)["UnprocessedKeys"] == {}
    store.unprocessed(keys=3)
    assert len(dynamodb.batch_get_item(RequestItems=request)["UnprocessedKeys"][TABLE]["Keys"]) == 3


def test_latency_and_limit_checks_still_work(store: ConflictingDynamoDB) -> None:
    dynamodb = client(store)
    hot = fresh()
    store.commit_s = 0.05
    store.slow("TransactWriteItems", after_s=0.2)
    start = time.monotonic()
    dynamodb.transact_write_items(TransactItems=[add(hot)])
    assert time.monotonic() - start >= 0.25  # commit, then the way back
    assert store.slowed["TransactWriteItems"] == 1

    huge = " OR ".join(["attribute_not_exists(pk)"] * 200)  # over 4 KB
    with contextlib.suppress(ClientError):  # DynamoDB Local may take it or not
        dynamodb.update_item(TableName=TABLE, Key=key(hot), ConditionExpression=huge)
    assert any("ConditionExpression" in broken for broken in store.violations)
    assert store.calls["UpdateItem"] == 1


def test_reset_clears_rules_counters_and_holds(store: ConflictingDynamoDB) -> None:
    dynamodb = client(store)
    hot = fresh()
    store.throttle(share=1.0)
    store.inject("*", ["conflict"])
    store.unprocessed(share=0.5)
    error(lambda: dynamodb.transact_write_items(TransactItems=[add(hot)]))
    store.reset()
    assert store.injected.total() == store.calls.total() == 0

    # No rule is left: this transaction is neither throttled nor cancelled.
    first, out = in_background(lambda: dynamodb.transact_write_items(TransactItems=[add(hot)]))
    wait_held(store, hot)
    store.reset()  # the holds go too: a write on the item is let through at once
    dynamodb.update_item(
        TableName=TABLE,
        Key=key(hot),
        UpdateExpression="ADD n :a",
        ExpressionAttributeValues={":a": {"N": "10"}},
    )
    first.join()
    assert "error" not in out
    assert counter(dynamodb, hot) == 11
    assert store.held() == []
    assert store.conflicts.total() == store.throttled.total() == 0
