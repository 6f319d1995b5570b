"""The local runner's guards: it listens beyond loopback only with a key, and refuses a body
larger than read_json_body would take before reading it (413 prompt_too_large)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from local import runner
from local.dynamodb_local import DynamoDBLocal
from local.process import IsolationUnavailable, free_port
from local.runner import MountedRoute, Router, bind_refusal, body_limit, is_loopback, path_pattern
from local.template import ROOT


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LocalHost"]
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.2", "10.0.0.5", "example.com"])
def test_hosts_beyond_loopback(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not is_loopback(host)
    refusal = bind_refusal(host)
    assert refusal is not None and "HERMES_API_KEY" in refusal
    monkeypatch.setenv("HERMES_API_KEY", "k")
    assert bind_refusal(host) is None
    monkeypatch.delenv("HERMES_API_KEY")
    monkeypatch.setenv("HERMES_API_KEYS", "reports:k1")
    assert bind_refusal(host) is None
    monkeypatch.setenv("HERMES_API_KEYS", " , ")  # no key in it
    assert bind_refusal(host) is not None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.2"])
def test_the_runner_will_not_listen_beyond_loopback_without_a_key(host: str) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HERMES_")},
        "HOST": host,
        "PORT": str(free_port()),
        "HERMES_LOCAL_STORE": "moto",
        "HERMES_EMBEDDED_MODEL": "0",
        "OLLAMA_URL": "http://127.0.0.1:9",
    }
    try:
        run = subprocess.run(
            [sys.executable, "-m", "local.runner"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the runner started on HOST={host} without a key")
    assert run.returncode != 0
    assert "Traceback" not in run.stderr and run.stdout == ""
    (line,) = run.stderr.strip().splitlines()  # one sentence
    assert f"HOST={host}" in line and "set HERMES_API_KEY" in line


def test_without_a_private_namespace_for_dynamodb_local_auto_takes_moto(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = "DynamoDB Local: cannot run java in a private network namespace (...)"

    def refuse(self: DynamoDBLocal) -> DynamoDBLocal:
        raise IsolationUnavailable(reason)

    monkeypatch.setattr(DynamoDBLocal, "start", refuse)
    monkeypatch.setattr(runner.dynamodb_local, "available", lambda: True)
    monkeypatch.setattr("local.embedded_moto.start_embedded_moto", lambda: "http://127.0.0.1:1")
    monkeypatch.setattr(runner, "STORE_DESCRIPTION", "")
    assert runner.start_embedded_store() == "http://127.0.0.1:1"
    assert f"hermes: {reason}; using moto instead" in capsys.readouterr().out
    monkeypatch.setenv("HERMES_LOCAL_STORE", "dynamodb-local")  # asked for: no other store
    with pytest.raises(SystemExit, match="cannot run java in a private network namespace"):
        runner.start_embedded_store()


# -- the body limit, on the ASGI level ------------------------------------------------------------

LIMIT = 1000


class Recorder:
    """A route's app: answers 200 with the body it read."""

    def __init__(self) -> None:
        self.called = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.called = True
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def request(
    router: Router, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
) -> tuple[int, bytes, dict[bytes, bytes], int]:
    """(status, body, headers, chunks read) of a POST sending `chunks`."""
    sent: list[dict[str, Any]] = []
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        if not pending:
            return {"type": "http.disconnect"}
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/llm/gemma", "headers": headers}
    asyncio.run(router(scope, receive, send))
    start, *bodies = sent
    body = b"".join(m.get("body", b"") for m in bodies)
    return start["status"], body, dict(start["headers"]), len(chunks) - len(pending)


@pytest.fixture
def app() -> Recorder:
    return Recorder()


@pytest.fixture
def router(app: Recorder) -> Router:
    return Router(
        [MountedRoute("POST", path_pattern("/v1/llm/{model}"), app)], max_body_bytes=LIMIT
    )


def test_a_content_length_above_the_limit_is_413_before_any_read(
    router: Router, app: Recorder
) -> None:
    status, body, headers, read = request(
        router, [(b"content-length", b"52428800")], [b"x" * 100] * 3
    )
    assert status == 413 and read == 0 and not app.called
    answer = json.loads(body)
    assert answer["code"] == "prompt_too_large" and "52428800 bytes" in answer["error"]
    assert headers[b"connection"] == b"close"


def test_a_chunked_body_is_refused_once_it_passes_the_limit(router: Router, app: Recorder) -> None:
    status, body, _, read = request(
        router, [(b"transfer-encoding", b"chunked")], [b"x" * 400] * 100
    )
    assert status == 413 and json.loads(body)["code"] == "prompt_too_large"
    assert read == 3 and not app.called  # 1200 bytes: past 1000, the rest never read


def test_bodies_within_the_limit_reach_the_app_whole(router: Router, app: Recorder) -> None:
    chunked = request(router, [(b"transfer-encoding", b"chunked")], [b"a" * 500, b"b" * 500])
    assert chunked[:2] == (200, b"a" * 500 + b"b" * 500)
    sized = request(router, [(b"content-length", b"1000")], [b"c" * 1000])
    assert sized[:2] == (200, b"c" * 1000)
    assert app.called


def test_the_limit_is_read_json_bodys(monkeypatch: pytest.MonkeyPatch) -> None:
    from hermes.http import BODY_BYTES_PER_PROMPT_CHAR, BODY_OVERHEAD_BYTES

    monkeypatch.setenv("HERMES_MAX_PROMPT_CHARS", "1000")
    assert body_limit() == 1000 * BODY_BYTES_PER_PROMPT_CHAR + BODY_OVERHEAD_BYTES
