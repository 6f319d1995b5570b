"""The limiter's light reads (hermes.limiter.light_reads) against DynamoDB Local: the same
answers boto3 gives, for every read they serve, and a fall back to boto3 when they fail."""

from __future__ import annotations

from typing import Any

import pytest

from hermes.limiter.light_reads import LightReader, LightReadFailed
from hermes.limiter.table import Table
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
    reader = LightReader(client)
    for _ in range(3):  # the kept-alive connection serves one request after another
        assert reader.call(operation, request_) == without_metadata(
            getattr(client, operation)(**request_)
        )
    assert sum(reader.calls.values()) == 3


def test_an_error_answer_raises_and_the_table_reads_through_boto3(client: Any) -> None:
    reader = LightReader(client)
    with pytest.raises(LightReadFailed, match="HTTP 400"):
        reader.call("get_item", {"TableName": "NoSuchTable", "Key": {"pk": {"S": "p"}}})
    table = Table(client, "LeaseTable")
    table.light = LightReader(client)
    table.light._address = ("127.0.0.1", 1)  # nothing listens: every light read fails
    assert table.get("p", "state", consistent=False) == item(
        "p", "state", n={"N": "3"}, s={"SS": ["a"]}
    )
    assert table.light.calls == {"GetItem": 1}  # tried, failed, read through boto3
