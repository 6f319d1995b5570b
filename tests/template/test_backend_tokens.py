"""A bearer token per host, for model servers behind an authenticating proxy: read from SSM
or Secrets Manager (moto here), sent as `Authorization: Bearer`, never in an error message or
a log line; and the template lets only the functions that call backends read it, only under
the given prefixes."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import uvicorn
from moto import mock_aws
from starlette.types import ASGIApp, Receive, Scope, Send

from hermes.backends import client_for
from hermes.config import ConfigError, load_config
from hermes.errors import UpstreamError, UpstreamUnavailable
from tests.support.ollama_emulator import EmulatorState, create_app
from tests.support.template_reading import as_list, deployed, parameters, role_of, statements_of

pytestmark = pytest.mark.template

TOKEN = "hermes-test-token-4f1c9a2b7e"
PARAMETER = "/hermes/backend-tokens/gpu1"
GENERATE = {"model": "gemma3:1b", "prompt": "hello there"}


class AuthenticatingProxy:
    """What stands in front of the model server: refuses a request without the right bearer
    token, with a body that echoes the header it got (as careless proxies do), and records
    every Authorization header."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token, self.seen = app, token, list[str | None]()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", []))
        given = headers.get(b"authorization")
        self.seen.append(given.decode() if given is not None else None)
        if given != f"Bearer {self.token}".encode():
            body = json.dumps({"error": f"unauthorized: {given!r}"}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


@pytest.fixture
def proxy() -> Iterator[tuple[str, AuthenticatingProxy]]:
    """The Ollama emulator behind an authenticating proxy, on a free port."""
    guard = AuthenticatingProxy(create_app(EmulatorState()), TOKEN)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(guard, lifespan="off", log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.01)
    yield f"http://127.0.0.1:{port}", guard
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def stores() -> Iterator[None]:
    """SSM and Secrets Manager (moto), and fresh boto3 clients for hermes.aws."""
    from hermes.aws import client

    client.cache_clear()
    with mock_aws():
        yield
    client.cache_clear()


def put_ssm(value: str, name: str = PARAMETER) -> None:
    boto3.client("ssm").put_parameter(Name=name, Value=value, Type="SecureString", Overwrite=True)


async def exercise(kind: str, url: str, parameter: str) -> list[str]:
    """A plain call, a streamed one and a probe through one client; the answers' texts."""
    backend = client_for(kind, url, parameter)
    done = await backend.complete("/api/generate", GENERATE, 5)
    chunks = [c async for c in backend.stream("/api/generate", GENERATE, 5)]
    await backend.loaded_models(5)
    return [done["response"], "".join(c.get("response", "") for c in chunks)]


@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_the_token_reaches_the_backend_on_every_call(
    kind: str, proxy: tuple[str, AuthenticatingProxy], stores: None
) -> None:
    url, guard = proxy
    put_ssm(TOKEN)
    texts = asyncio.run(exercise(kind, url, PARAMETER))
    assert all(text.startswith("Echo") for text in texts), texts
    assert guard.seen == [f"Bearer {TOKEN}"] * 3


def test_a_host_without_token_parameter_sends_no_authorization(
    proxy: tuple[str, AuthenticatingProxy], stores: None
) -> None:
    url, guard = proxy
    with pytest.raises(UpstreamError) as caught:
        asyncio.run(client_for("ollama", url).complete("/api/generate", GENERATE, 5))
    assert guard.seen == [None]
    assert caught.value.body()["code"] == "upstream_error"


def test_a_secret_holds_the_token_as_is_or_as_a_json_token_field(
    proxy: tuple[str, AuthenticatingProxy], stores: None
) -> None:
    url, guard = proxy
    secrets = boto3.client("secretsmanager")
    plain = secrets.create_secret(Name="hermes/backend-tokens/a", SecretString=TOKEN)["ARN"]
    wrapped = secrets.create_secret(
        Name="hermes/backend-tokens/b", SecretString=json.dumps({"token": TOKEN})
    )["ARN"]
    for arn in (plain, wrapped):
        asyncio.run(client_for("ollama", url, arn).loaded_models(5))
    assert guard.seen == [f"Bearer {TOKEN}"] * 2


def test_the_token_is_read_once_per_client(
    proxy: tuple[str, AuthenticatingProxy], stores: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hermes.backends import tokens

    url, _ = proxy
    put_ssm(TOKEN)
    reads = []
    real = tokens.read_token
    monkeypatch.setattr(tokens, "read_token", lambda p: reads.append(p) or real(p))

    async def many() -> None:
        backend = client_for("ollama", url, PARAMETER)
        await asyncio.gather(*(backend.loaded_models(5) for _ in range(8)))
        await backend.complete("/api/generate", GENERATE, 5)

    asyncio.run(many())
    assert reads == [PARAMETER]


def test_a_refused_token_never_shows_in_the_error_and_is_read_again(
    proxy: tuple[str, AuthenticatingProxy], stores: None
) -> None:
    """Given a stale token in SSM, when the proxy refuses it (echoing it back), then the
    error names the parameter, not the token; once SSM holds the rotated one, the same
    client gets through."""
    url, guard = proxy
    stale = "stale-token-0b3d5e7f9a"
    put_ssm(stale)
    backend = client_for("openai", url, PARAMETER)

    async def call() -> dict[str, Any]:
        return await backend.complete("/api/generate", GENERATE, 5)

    with pytest.raises(UpstreamError) as caught:
        asyncio.run(call())
    message = json.dumps(caught.value.body())
    assert stale not in message and PARAMETER in message
    assert caught.value.body()["code"] == "upstream_error"
    put_ssm(TOKEN)
    assert asyncio.run(call())["response"].startswith("Echo")
    assert guard.seen == [f"Bearer {stale}", f"Bearer {TOKEN}"]


def test_an_echoed_token_is_scrubbed_from_any_upstream_error(stores: None) -> None:
    """Whatever status an upstream answers, its words reach the caller without the token."""
    import httpx

    put_ssm(TOKEN)

    def answer(request: httpx.Request) -> httpx.Response:
        echoed = request.headers["authorization"]
        return httpx.Response(500, json={"error": f"internal error handling {echoed}"})

    backend = client_for("ollama", "http://gpu1:11434", PARAMETER)
    backend._transport = httpx.MockTransport(answer)
    with pytest.raises(UpstreamError) as caught:
        asyncio.run(backend.complete("/api/generate", GENERATE, 5))
    message = caught.value.body()["error"]
    assert TOKEN not in message and "Bearer [token]" in message


@pytest.mark.parametrize(
    ("parameter", "code"),
    [
        (PARAMETER + "-missing", "ParameterNotFound"),
        ("arn:aws:secretsmanager:us-east-1:123456789012:secret:hermes/none-AbCdEf", "Resource"),
    ],
)
def test_an_unreadable_token_is_upstream_unavailable_naming_the_parameter(
    parameter: str, code: str, proxy: tuple[str, AuthenticatingProxy], stores: None
) -> None:
    url, guard = proxy
    with pytest.raises(UpstreamUnavailable) as caught:
        asyncio.run(client_for("ollama", url, parameter).loaded_models(5))
    assert parameter in caught.value.message and code in caught.value.message
    assert caught.value.retry_after == 5
    assert guard.seen == []  # nothing was sent without its token


@pytest.mark.parametrize("stored", [" ", "two words", "line\nbreak"])
def test_a_stored_value_that_is_no_token_is_refused_without_quoting_it(
    stored: str, proxy: tuple[str, AuthenticatingProxy], stores: None
) -> None:
    url, guard = proxy
    put_ssm(stored)  # SSM refuses an empty value: " " is the blank one
    with pytest.raises(UpstreamUnavailable) as caught:
        asyncio.run(client_for("ollama", url, PARAMETER).loaded_models(5))
    assert "no usable bearer token" in caught.value.message
    assert not {"two", "words", "line", "break"} & set(re.findall(r"\w+", caught.value.message))
    assert guard.seen == []


def test_no_log_line_carries_the_token(
    proxy: tuple[str, AuthenticatingProxy], stores: None, caplog: pytest.LogCaptureFixture
) -> None:
    """httpx, httpcore and Hermes' own loggers at DEBUG (botocore is left at its default:
    at DEBUG it logs every response body, SSM's included, as it does for any secret)."""
    url, _ = proxy
    put_ssm(TOKEN)
    with (
        caplog.at_level(logging.DEBUG, logger="httpx"),
        caplog.at_level(logging.DEBUG, logger="httpcore"),
        caplog.at_level(logging.DEBUG, logger="hermes"),
    ):
        asyncio.run(exercise("ollama", url, PARAMETER))
        put_ssm("wrong-token-1234")
        backend = client_for("ollama", url, PARAMETER)
        with pytest.raises(UpstreamError):
            asyncio.run(backend.loaded_models(5))
    assert caplog.records
    assert not [
        r for r in caplog.records if TOKEN in r.getMessage() or "wrong-token" in r.getMessage()
    ]


# -- the models file ---------------------------------------------------------------------------
def models_file(tmp_path: Path, host: dict[str, Any]) -> Path:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({
        "models": {"gemma": {"max_concurrency": 1, "memory_cost": "low", "timeout": 1000,
                             "backend_model": "gemma3:1b", "host": "gpu1"}},
        "hosts": {"gpu1": {"memory_budget": 8, **host}},
    }))  # fmt: skip
    return path


@pytest.mark.parametrize(
    "parameter",
    [
        PARAMETER,
        "arn:aws:secretsmanager:eu-west-1:123456789012:secret:hermes/backend-tokens/a-x1Y2z3",
    ],
)
def test_a_host_names_where_its_token_is_stored(tmp_path: Path, parameter: str) -> None:
    config = load_config(models_file(tmp_path, {"token_parameter": parameter}))
    assert config.hosts["gpu1"].token_parameter == parameter


@pytest.mark.parametrize("pasted", [TOKEN, "sk-live-abc123", "hermes/backend-tokens/gpu1"])
def test_a_token_pasted_into_the_models_file_is_refused_without_repeating_it(
    tmp_path: Path, pasted: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(models_file(tmp_path, {"token_parameter": pasted}))
    assert "hosts.gpu1.token_parameter" in str(caught.value)
    # Nor in the traceback a failed cold start logs (the pydantic error it was raised from).
    assert pasted not in str(caught.value) and pasted not in str(caught.value.__cause__)


# -- the template ------------------------------------------------------------------------------
CALLS_BACKENDS = {"LlmFunction", "StatusFunction", "OllamaApiFunction", "OpenAiApiFunction",
                  "WorkerFunction"}  # fmt: skip
PREFIXES = {"BackendTokenSsmPrefix": "/hermes/backend-tokens/",
            "BackendTokenSecretPrefix": "hermes/backend-tokens/"}  # fmt: skip


def token_actions(template: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every (action, resource) of the template's IAM that reads SSM or Secrets Manager."""
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "Action" in node and "Resource" in node:
                for action in as_list(node["Action"]):
                    if str(action).split(":")[0] in ("ssm", "secretsmanager"):
                        found.extend((action, r) for r in as_list(node["Resource"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(template["Resources"])
    return found


def test_by_default_no_function_may_read_any_parameter_or_secret() -> None:
    template = deployed()
    assert "BackendTokenReadPolicy" not in template["Resources"]
    assert token_actions(template) == []


def test_with_prefixes_the_backend_callers_read_under_them_only() -> None:
    template = deployed(PREFIXES)
    assert token_actions(template) == [
        ("ssm:GetParameter",
         "arn:aws:ssm:us-east-1:123456789012:parameter/hermes/backend-tokens/*"),
        ("secretsmanager:GetSecretValue",
         "arn:aws:secretsmanager:us-east-1:123456789012:secret:hermes/backend-tokens/*"),
    ]  # fmt: skip
    policy = {"Ref": "BackendTokenReadPolicy"}
    for name in resources_of(template, "AWS::Lambda::Function"):
        role = role_of(name, template)
        assert (policy in role.get("ManagedPolicyArns", [])) == (name in CALLS_BACKENDS), name
        assert not [s for s in statements_of(role) if "ssm" in json.dumps(s["Action"])]
    only_ssm = deployed({"BackendTokenSsmPrefix": "/hermes/backend-tokens/"})
    assert [action for action, _ in token_actions(only_ssm)] == ["ssm:GetParameter"]


def resources_of(template: dict[str, Any], type_: str) -> list[str]:
    return [name for name, r in template["Resources"].items() if r["Type"] == type_]


def test_vpc_endpoints_for_the_stores_come_with_the_other_endpoints() -> None:
    vpc = {"VpcSubnetIds": "subnet-a", "VpcSecurityGroupIds": "sg-1", "VpcId": "vpc-1",
           "VpcRouteTableIds": "rtb-1"}  # fmt: skip
    endpoints = {
        r["Properties"]["ServiceName"].rsplit(".", 1)[1]
        for r in deployed({**vpc, **PREFIXES})["Resources"].values()
        if r["Type"] == "AWS::EC2::VPCEndpoint"
    }
    assert endpoints == {"dynamodb", "sqs", "ssm", "secretsmanager"}
    without = {
        r["Properties"]["ServiceName"].rsplit(".", 1)[1]
        for r in deployed(vpc)["Resources"].values()
        if r["Type"] == "AWS::EC2::VPCEndpoint"
    }
    assert without == {"dynamodb", "sqs"}


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("BackendTokenSsmPrefix", "", True),
        ("BackendTokenSsmPrefix", "/hermes/backend-tokens/", True),
        ("BackendTokenSsmPrefix", "/", False),  # every parameter of the account
        ("BackendTokenSsmPrefix", "/hermes", False),  # also /hermes-other...
        ("BackendTokenSsmPrefix", "hermes/", False),
        ("BackendTokenSecretPrefix", "", True),
        ("BackendTokenSecretPrefix", "hermes/backend-tokens/", True),
        ("BackendTokenSecretPrefix", "hermes", False),
        ("BackendTokenSecretPrefix", "*", False),
    ],
)
def test_a_prefix_is_a_whole_path(name: str, value: str, allowed: bool) -> None:
    assert bool(re.fullmatch(parameters()[name]["AllowedPattern"], value)) is allowed


def test_the_service_gives_each_host_s_client_its_token(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    proxy: tuple[str, AuthenticatingProxy],
    stores: None,
) -> None:
    """hermes.service builds every host's client with the host's token_parameter."""
    from hermes.service import get_service

    url, guard = proxy
    path = models_file(tmp_path, {"url": url, "token_parameter": PARAMETER})
    monkeypatch.setenv("HERMES_MODELS_FILE", str(path))
    put_ssm(TOKEN)
    backend = get_service().backends["gpu1"]
    assert backend.token_parameter == PARAMETER
    asyncio.run(backend.loaded_models(5))
    assert guard.seen == [f"Bearer {TOKEN}"]
