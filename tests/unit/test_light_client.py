"""The notice poller's own SigV4 signing must be botocore's, byte for byte: DynamoDB Local
and moto accept any signature, so only this comparison can catch a mistake before AWS does.
(Its reads against a real server run in tests/integration/test_light_client_local.py.)"""

from __future__ import annotations

import datetime
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from hermes.limiter.light_client import sign

NOW = datetime.datetime(2026, 12, 2, 21, 30, 5, tzinfo=datetime.UTC)
BODY = b'{"RequestItems": {"LeaseTable": {"Keys": [{"pk": {"S": "grant#abc"}}]}}}'
TARGET = "DynamoDB_20120810.BatchGetItem"


def botocore_signs(host: str, token: str | None) -> str:
    request = AWSRequest(
        method="POST",
        url=f"https://{host}/",
        data=BODY,
        headers={"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": TARGET},
    )
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        SigV4Auth(credentials, "dynamodb", "eu-west-1").add_auth(request)
    return str(request.headers["Authorization"])


@pytest.mark.parametrize("token", [None, "FQoGZXIvYXdzEJr//session-token=="])
@pytest.mark.parametrize("host", ["dynamodb.eu-west-1.amazonaws.com", "127.0.0.1:8000"])
def test_the_signature_is_botocores(host: str, token: str | None) -> None:
    headers = sign(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        token,
        "eu-west-1",
        host,
        TARGET,
        BODY,
        NOW,
    )
    assert headers["Authorization"] == botocore_signs(host, token)
    assert headers["X-Amz-Date"] == "20261202T213005Z"
    assert headers["Host"] == host
    assert headers.get("X-Amz-Security-Token") == token
