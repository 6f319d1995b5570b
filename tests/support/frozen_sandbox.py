"""Lambda's execution model for tests: each sandbox a process that is frozen between invokes.

Real Lambda freezes every thread of a sandbox the moment its handler returns (boto3's pools,
Hermes' notice poller, asyncio tasks left pending) and thaws it only for that sandbox's next
invoke, which may come much later or never. Neither the local runner (uvicorn, one process
that keeps running) nor `sam local` (a container per invoke, or kept warm and running) freezes
anything, so work left to run after a handler returns looks fine there and fails on Lambda.

`FrozenSandbox` reproduces it. Its child (frozen_sandbox_child.py) puts the function's CodeUri
and the layer's content on sys.path as `sam build` lays them out (layers/hermes holds the
`hermes` package at its root, as /opt/python does), imports the handler the template names
(`app.handler`) and serves events from a Unix socket with a fake Lambda context. After its
init and after every answer it sends itself SIGSTOP; `invoke` sends SIGCONT with the next
event and returns only once every thread of the child is stopped again.

    with FrozenSandbox("LlmFunction", env) as sandbox:
        status, body = http_answer(sandbox.invoke(post("/v1/llm/gemma", {"prompt": "hi"})))
        assert sandbox.frozen

`env` is what the test gives the function (endpoints, models file); the template's own
variables fill in the rest, as on Lambda (the caller's value wins, as in local.runner).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self
from unittest import mock

from local.process import ChildProcess, describe_exit
from local.template import ROOT, Function, functions, http_routes, load_template, resolve

CHILD = Path(__file__).with_name("frozen_sandbox_child.py")
LAYER = ROOT / "layers" / "hermes"
INIT_TIMEOUT_S = 60.0  # imports on a loaded 2-core machine
STOP_TIMEOUT_S = 10.0


class SandboxError(RuntimeError):
    """The handler raised, or the sandbox died, hung or did not freeze."""


class FrozenSandbox:
    def __init__(
        self,
        function: str,
        env: Mapping[str, str],
        *,
        timeout_s: float | None = None,
        names: Mapping[str, str] | None = None,
    ) -> None:
        """`function`: the template's logical id (LlmFunction, WorkerFunction...).
        `timeout_s`: the Lambda timeout its context counts down from (the template's by
        default). `names`: what a `!Ref` to a resource means (e.g. a queue's URL)."""
        template = load_template()
        self.function = functions(template)[function]
        self.timeout_s = float(timeout_s or self.function.timeout)
        globals_ = template.get("Globals", {}).get("Function", {})
        self.memory_mb = int(
            self.function.properties.get("MemorySize", globals_.get("MemorySize", 128))
        )
        self.env = sandbox_environment(self.function, env, template, names, self.memory_mb)
        self._dir = tempfile.mkdtemp(prefix="sandbox-")
        self._listener: socket.socket | None = None
        self._connection: socket.socket | None = None
        self._buffer = b""
        self._busy = threading.Lock()
        self.child: ChildProcess | None = None
        self.hermes_file: str | None = None  # where the child imported hermes from
        self.invocations = 0

    # -- life -----------------------------------------------------------------------------

    def start(self, wait: bool = True) -> Self:
        """Start the child (the init phase runs in it); `wait=False` returns at once, so
        several sandboxes can start together (then call `wait_ready`)."""
        ensure_tables(self.env)
        path = os.path.join(self._dir, "s")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        fn = self.function
        command = [sys.executable, str(CHILD), path, str(fn.code_uri), str(LAYER), fn.handler]
        command += [fn.logical_id, str(int(self.timeout_s * 1000)), str(self.memory_mb)]
        name = f"the {fn.logical_id} sandbox"
        self.child = ChildProcess(name, command, env=self.env, cwd=fn.code_uri).start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = INIT_TIMEOUT_S) -> Self:
        """Until the handler is imported and the child froze after its init."""
        assert self._listener is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        self._listener.settimeout(0.2)
        while self._connection is None:
            self._check_alive()
            if time.monotonic() > deadline:
                self._fail(f"did not connect within {timeout_s:g} s")
            try:
                self._connection, _ = self._listener.accept()
            except TimeoutError:
                continue
        hello = self._read(deadline)
        if "init_error" in hello:
            self._fail(f"failed its init:\n{hello['init_error']}")
        self.hermes_file = hello.get("hermes")
        self._wait_frozen()
        return self

    def kill(self) -> None:
        """SIGKILL (a stopped process dies too): the sandbox is gone, as Lambda drops one."""
        if self.child is not None:
            self.child.kill()

    def close(self) -> None:
        self.kill()
        for sock in (self._connection, self._listener):
            if sock is not None:
                sock.close()
        if self.child is not None:
            self.child.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- invocations ----------------------------------------------------------------------

    def invoke(self, event: Any, remaining_s: float | None = None) -> Any:
        """Thaw, hand the event to the handler, and return its result once the sandbox is
        frozen again. One invocation at a time, as Lambda runs a sandbox. The context counts
        down from `remaining_s` (the sandbox's timeout_s by default); a handler that has not
        answered 10 s after that gets the sandbox killed (SandboxError), as Lambda ends a
        timed-out one. A handler's exception is raised as a SandboxError (its traceback)."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("a sandbox serves one invocation at a time")
        try:
            assert self._connection is not None and self.child is not None, "not started"
            self._check_alive()
            if not self.frozen:
                self._fail(f"was not frozen before its invoke: {self.thread_states()}")
            remaining_s = remaining_s or self.timeout_s
            line = json.dumps({"event": event, "timeout_ms": int(remaining_s * 1000)})
            os.kill(self.child.pid, signal.SIGCONT)
            self._connection.sendall(line.encode() + b"\n")
            deadline = time.monotonic() + remaining_s + 10
            reply = self._read(deadline)
            self._wait_frozen()
            self.invocations += 1
            if "error" in reply:
                raise SandboxError(
                    f"the {self.function.logical_id} handler raised:\n{reply['error']}"
                )
            return reply["result"]
        finally:
            self._busy.release()

    @property
    def frozen(self) -> bool:
        """Every thread of the child is stopped (state T)."""
        states = self.thread_states()
        return bool(states) and all(state == "T" for state in states.values())

    def thread_states(self) -> dict[int, str]:
        """{thread id: its state letter} of the child (empty once it has exited)."""
        if self.child is None or self.child.returncode is not None:
            return {}
        states = {}
        for task in Path(f"/proc/{self.child.pid}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue  # the thread ended meanwhile
            states[int(task.name)] = stat.rsplit(")", 1)[1].split()[0]
        return states

    def output(self) -> str:
        """What the child wrote (its logs: powertools writes JSON lines to stdout)."""
        return self.child.output() if self.child is not None else ""

    # -- internals ------------------------------------------------------------------------

    def _read(self, deadline: float) -> dict[str, Any]:
        assert self._connection is not None
        while b"\n" not in self._buffer:
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                self._fail("did not answer in time (killed, as Lambda ends a timed-out sandbox)")
            self._connection.settimeout(min(left, 0.5))
            try:
                chunk = self._connection.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.child.process.wait(timeout=5)  # type: ignore[union-attr]
                self._check_alive()
                self._fail("closed its socket")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def _wait_frozen(self) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while not self.frozen:
            self._check_alive()
            if time.monotonic() > deadline:
                self._fail(f"did not freeze within {STOP_TIMEOUT_S:g} s: {self.thread_states()}")
            time.sleep(0.001)

    def _check_alive(self) -> None:
        assert self.child is not None
        if self.child.returncode is not None:
            self._fail(describe_exit(self.child.returncode))

    def _fail(self, what: str) -> None:
        tail = self.child.tail(30) if self.child is not None else ""
        raise SandboxError(f"the {self.function.logical_id} sandbox {what}; its output:\n{tail}")


def sandbox_environment(
    fn: Function,
    given: Mapping[str, str],
    template: dict[str, Any],
    names: Mapping[str, str] | None,
    memory_mb: int,
) -> dict[str, str]:
    """The child's environment: this process's (PATH, the tests' fake credentials), the
    test's `given`, then the variables the template gives the function (resolved as
    local.runner.apply_function_environment does), then what Lambda itself sets."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env |= {
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": env.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": env.get("AWS_SECRET_ACCESS_KEY", "testing"),
    }
    env |= dict(given)
    for name, value in fn.environment.items():
        if name not in given:
            env[name] = str(resolve(value, template, dict(names or {})))
    env |= {
        "AWS_LAMBDA_FUNCTION_NAME": fn.logical_id,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
        "LAMBDA_TASK_ROOT": str(fn.code_uri),
        "PYTHONUNBUFFERED": "1",  # its log shows everything up to the freeze
    }
    return env


def ensure_tables(env: Mapping[str, str]) -> None:
    """The template's tables on the sandbox's DynamoDB (local.runner.ensure_tables)."""
    from local.runner import ensure_tables as create

    endpoint = env.get("AWS_ENDPOINT_URL_DYNAMODB")
    if not endpoint:
        return
    with mock.patch.dict(os.environ, {"AWS_ENDPOINT_URL_DYNAMODB": endpoint}):
        create(load_template())


def start_all(sandboxes: list[FrozenSandbox]) -> list[FrozenSandbox]:
    """Start several at once (each init takes seconds), return them ready and frozen."""
    for sandbox in sandboxes:
        sandbox.start(wait=False)
    for sandbox in sandboxes:
        sandbox.wait_ready()
    return sandboxes


# -- events -----------------------------------------------------------------------------------


def _route_for(method: str, path: str) -> tuple[str, dict[str, str]]:
    """The template's route key for this request, and its path parameters."""
    for route in http_routes():
        if route.method not in (method, "ANY"):
            continue
        regex = re.sub(r"\\\{(\w+)\\\+\\\}", r"(?P<\1>.+)", re.escape(route.path))
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", regex)
        match = re.fullmatch(regex, path)
        if match:
            return f"{route.method} {route.path}", match.groupdict()
    raise LookupError(f"no route of template.yaml serves {method} {path}")


def http_event(
    method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """An API Gateway HTTP API (payload 2.0) event, as events/llm_generate.json, received
    now (Hermes reads its age against the 30 s limit). A non-str `body` is sent as JSON."""
    route_key, parameters = _route_for(method, path)
    now = datetime.now(UTC)
    all_headers = {
        "content-type": "application/json",
        "host": "abc123.execute-api.us-east-1.amazonaws.com",
        "user-agent": "frozen-sandbox-test",
        "x-forwarded-proto": "https",
        **{name.lower(): value for name, value in (headers or {}).items()},
    }
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": path,
        "rawQueryString": "",
        "headers": all_headers,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc123",
            "domainName": all_headers["host"],
            "domainPrefix": "abc123",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "203.0.113.7",
                "userAgent": all_headers["user-agent"],
            },
            "requestId": uuid.uuid4().hex[:16],
            "routeKey": route_key,
            "stage": "$default",
            "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(now.timestamp() * 1000),
        },
        "isBase64Encoded": False,
    }
    if parameters:
        event["pathParameters"] = parameters
    if body is not None:
        event["body"] = body if isinstance(body, str) else json.dumps(body)
    return event


def post(path: str, body: Any, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    return http_event("POST", path, body, headers)


def http_answer(result: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of an HTTP function's result."""
    return int(result["statusCode"]), json.loads(result["body"])


def direct_event(model: str, prompt: str, **fields: Any) -> dict[str, Any]:
    """A direct invoke of the LLM function (events/direct_generate.json)."""
    return {"model": model, "prompt": prompt, "request_id": uuid.uuid4().hex, **fields}


def sqs_event(message: Mapping[str, Any], queue_arn: str = "") -> dict[str, Any]:
    """The event the SQS event source hands the worker for one message as ReceiveMessage
    returns it (with AttributeNames=["All"])."""
    attributes = message.get("Attributes", {})
    return {
        "Records": [
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": {
                    "ApproximateReceiveCount": attributes.get("ApproximateReceiveCount", "1"),
                    "SentTimestamp": attributes.get("SentTimestamp", str(int(time.time() * 1000))),
                    "SenderId": attributes.get("SenderId", "AIDAIENQZJOLO23YVJ4VO"),
                    "ApproximateFirstReceiveTimestamp": attributes.get(
                        "ApproximateFirstReceiveTimestamp", str(int(time.time() * 1000))
                    ),
                },
                "messageAttributes": {},
                "md5OfBody": message.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn or "arn:aws:sqs:us-east-1:123456789012:JobsQueue",
                "awsRegion": "us-east-1",
            }
        ]
    }
