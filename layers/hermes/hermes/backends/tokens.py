"""Bearer tokens for model servers behind an authenticating proxy.

A host's `token_parameter` (models.json) names where its token lives: an SSM Parameter Store
SecureString ("/hermes/tokens/gpu1") or a Secrets Manager secret (its ARN). The token is read
when the host's client first needs it, kept in memory only, and never written anywhere:
not in an error message, a log line or a metric. The template grants the functions read
access under BackendTokenSsmPrefix / BackendTokenSecretPrefix only.
"""

from __future__ import annotations

import json
import re
from typing import Any

from hermes.errors import UpstreamUnavailable

# RFC 6750's b64token, widened to any visible ASCII: an Authorization header value can carry
# it as is. Anything else (a newline, a space) would make httpx refuse the header with an
# error that quotes the value.
_TOKEN = re.compile(r"[\x21-\x7e]{1,8192}")


def is_secret_arn(parameter: str) -> bool:
    return parameter.startswith("arn:") and ":secretsmanager:" in parameter


def read_token(parameter: str) -> str:
    """The token stored at `parameter`; UpstreamUnavailable (naming the parameter and AWS's
    error code, never a value) when it cannot be read or is not a usable token. A secret's
    SecretString is the token itself, or a JSON object whose "token" field is."""
    from botocore.exceptions import BotoCoreError, ClientError

    from hermes.aws import client

    source = "secret" if is_secret_arn(parameter) else "SSM parameter"
    try:
        if is_secret_arn(parameter):
            raw: Any = client("secretsmanager").get_secret_value(SecretId=parameter)
            value = raw.get("SecretString")
            if isinstance(value, str) and value.lstrip().startswith("{"):
                try:
                    value = json.loads(value).get("token")
                except (ValueError, AttributeError):
                    value = None
        else:
            raw = client("ssm").get_parameter(Name=parameter, WithDecryption=True)
            value = raw["Parameter"]["Value"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise UpstreamUnavailable(
            f"cannot read the backend's bearer token from {source} {parameter} ({code})",
            retry_after=5,
        ) from None
    except BotoCoreError as exc:
        raise UpstreamUnavailable(
            f"cannot read the backend's bearer token from {source} {parameter} "
            f"({type(exc).__name__})",
            retry_after=5,
        ) from None
    token = value.strip() if isinstance(value, str) else ""
    if not _TOKEN.fullmatch(token):
        raise UpstreamUnavailable(
            f"the {source} {parameter} holds no usable bearer token (empty, or spaces or "
            "control characters in it)",
            retry_after=5,
        )
    return token
