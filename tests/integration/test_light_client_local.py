"""The limiter's light client (hermes.limiter.light_client) against DynamoDB Local: the same
answers boto3 gives, for every read and write it serves, the same errors where a condition
fails, and a fall back to boto3 when anything else goes wrong."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from hermes.limiter.light_client import LightCallFailed, LightClient
from hermes.limiter.table import Cancelled, Table
from local.dynamodb_local import DynamoDBLocal

pytestmark = pytest.mark.integration


def item(pk: str, sk: str, **attrs: Any) -> dict[str, Any]:
    return {"pk": {"S": pk}, "sk": {"S": sk}, **attrs}


@pytest.fixture
def client(dynamodb_local: DynamoDBLocal) -> Any:
    dynamodb_local.reset_tables()
    client = dynamodb_local.client()
    client.put_item(TableName="LeaseTable", Item=item("p", "state", n={"N": "3"}, s={"SS": ["a"]}))
    for i in range(3):
        client.put_item(TableName="LeaseTable", Item=item("p#queue", f"w#{i}", wu={"N": str(i)}))
    return client


def without_metadata(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "ResponseMetadata"}


REQUESTS = [
    ("get_item", {"TableName": "LeaseTable", "Key": {"pk": {"S": "p"}, "sk": {"S": "state"}}}),
    ("get_item", {"TableName": "LeaseTable", "Key": {"pk": {"S": "p"}, "sk": {"S": "none"}}}),
    (
        "query",
        {
            "TableName": "LeaseTable",
            "KeyConditionExpression": "pk = :pk AND sk < :me",
            "FilterExpression": "#wu > :now",
            "ExpressionAttributeNames": {"#wu": "wu"},
            "ExpressionAttributeValues": {
                ":pk": {"S": "p#queue"},
                ":me": {"S": "w#9"},
                ":now": {"N": "0"},
            },
            "ScanIndexForward": False,
            "Limit": 2,
        },
    ),
    (
        "batch_get_item",
        {
            "RequestItems": {
                "LeaseTable": {
                    "Keys": [
                        {"pk": {"S": "p"}, "sk": {"S": "state"}},
                        {"pk": {"S": "grant#x"}, "sk": {"S": "grant"}},
                    ],
                    "ConsistentRead": False,
                }
            }
        },
    ),
]


@pytest.mark.parametrize(("operation", "request_"), REQUESTS)
def test_a_light_read_answers_what_boto3_answers(
    client: Any, operation: str, request_: dict[str, Any]
) -> None:
    reader = LightClient(client)
    for _ in range(3):  # the kept-alive connection serves one request after another
        assert reader.call(operation, request_) == without_metadata(
            getattr(client, operation)(**request_)
        )
    assert sum(reader.calls.values()) == 3


def test_an_error_answer_raises_and_the_table_reads_through_boto3(client: Any) -> None:
    reader = LightClient(client)
    with pytest.raises(LightCallFailed, match="HTTP 400"):
        reader.call("get_item", {"TableName": "NoSuchTable", "Key": {"pk": {"S": "p"}}})
    table = Table(client, "LeaseTable")
    table.light = LightClient(client)
    table.light._address = ("127.0.0.1", 1)  # nothing listens: every light read fails
    assert table.get("p", "state", consistent=False) == item(
        "p", "state", n={"N": "3"}, s={"SS": ["a"]}
    )
    assert table.light.calls == {"GetItem": 1}  # tried, failed, read through boto3


def bump(pk: str, expected: str) -> dict[str, Any]:
    """A conditional UpdateItem as the limiter writes them: ALL_NEW, ALL_OLD when it fails."""
    return {
        "TableName": "LeaseTable",
        "Key": {"pk": {"S": pk}, "sk": {"S": "state"}},
        "UpdateExpression": "ADD n :one",
        "ConditionExpression": "n = :expected",
        "ExpressionAttributeValues": {":one": {"N": "1"}, ":expected": {"N": expected}},
        "ReturnValues": "ALL_NEW",
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


def as_p(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer about item q as it would read about item p (the items are otherwise equal)."""
    answer = without_metadata(answer)
    for name in ("Attributes", "Item"):
        if name in answer:
            answer[name] = {**answer[name], "pk": {"S": "p"}}
    return answer


def failure(call: Any) -> dict[str, Any]:
    """What callers read of a failed call's ClientError (boto3's has more, unused)."""
    with pytest.raises(ClientError) as raised:
        call()
    response = raised.value.response
    read = {k: v for k, v in response.items() if k in ("Item", "CancellationReasons")}
    return {**read, "Error": {k: response["Error"][k] for k in ("Code", "Message")}}


def test_a_light_write_answers_and_fails_as_boto3_does(client: Any) -> None:
    client.put_item(TableName="LeaseTable", Item=item("q", "state", n={"N": "3"}, s={"SS": ["a"]}))
    light = LightClient(client)
    # Given two equal items, one written through each client: the same answer ...
    assert light.call("update_item", bump("p", "3")) == as_p(client.update_item(**bump("q", "3")))
    # ... and, when the condition fails, the same error with the item as it was (ALL_OLD).
    mine = failure(lambda: light.call("update_item", bump("p", "3")))
    assert mine == as_p(failure(lambda: client.update_item(**bump("q", "3"))))
    assert mine["Error"]["Code"] == "ConditionalCheckFailedException"
    assert mine["Item"]["n"] == {"N": "4"}
    assert light.calls == {"UpdateItem": 2}


def test_a_cancelled_transaction_gives_boto3s_reasons_and_the_tables_cancelled(
    client: Any,
) -> None:
    def transaction(token: str) -> dict[str, Any]:
        update = {k: v for k, v in bump("p", "7").items() if k != "ReturnValues"}
        put = {"TableName": "LeaseTable", "Item": item("p#queue", "w#new")}
        return {"TransactItems": [{"Put": put}, {"Update": update}], "ClientRequestToken": token}

    light = LightClient(client)
    mine = failure(lambda: light.call("transact_write_items", transaction("a" * 32)))
    assert mine == failure(lambda: client.transact_write_items(**transaction("b" * 32)))
    assert [r["Code"] for r in mine["CancellationReasons"]] == ["None", "ConditionalCheckFailed"]
    table = Table(client, "LeaseTable")
    table.light = light
    with pytest.raises(Cancelled) as cancelled:
        table.transact(transaction("c" * 32)["TransactItems"])
    assert cancelled.value.failed(1)
    assert cancelled.value.item(1)["n"] == {"N": "3"}
    assert light.calls["TransactWriteItems"] == 2  # the table's went light too
    assert client.get_item(TableName="LeaseTable", Key=item("p#queue", "w#new")).get("Item") is None
