"""`make run`: Hermes on http://localhost:$PORT without Docker.

Serves each function's own handler app on the routes template.yaml declares, with
the environment the template gives it, and a DynamoDB whose tables come from the
template: an embedded store, or the server named by AWS_ENDPOINT_URL_DYNAMODB so
several runners can share one store (as Lambda instances share one table).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hmac
import importlib.util
import ipaddress
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from local import dynamodb_local, embedded_model, openapi
from local.process import ProcessFailed
from local.queue_poller import QueuePoller
from local.template import (
    ROOT,
    Function,
    functions,
    http_routes,
    load_template,
    queue_definitions,
    queue_sources,
    resolve,
    table_definitions,
)

Scope = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


OPENAPI_PATH = "/openapi.json"


@dataclass(frozen=True)
class MountedRoute:
    method: str
    pattern: re.Pattern[str]
    app: ASGIApp


def path_pattern(path: str) -> re.Pattern[str]:
    """API Gateway path → regex: {name} is one segment, {name+} is greedy."""
    regex = re.sub(r"\\\{[^/]+?\\\+\\\}", "(?:.+)", re.escape(path))
    regex = re.sub(r"\\\{[^/]+?\\\}", "(?:[^/]+)", regex)
    return re.compile(regex)


class Router:
    """Dispatches like API Gateway's HTTP API: route match, else JSON 404/405."""

    def __init__(
        self,
        routes: list[MountedRoute],
        keys: dict[str, str] | None = None,
        max_body_bytes: int | None = None,
    ) -> None:
        self.routes = routes
        # Optional keys for a runner reachable by others ({key: caller}, from HERMES_API_KEYS
        # and HERMES_API_KEY): each request then names its caller by its key. The deployed
        # API authenticates through API Gateway (IAM or JWT) instead.
        self.keys = {f"Bearer {key}".encode(): caller for key, caller in (keys or {}).items()}
        # A larger body is refused before it is read (body_limit()); None: no limit.
        self.max_body_bytes = max_body_bytes

    def _caller(self, scope: Scope) -> str | None:
        """The caller whose key the request sends (every key compared: no timing hint)."""
        given = dict(scope["headers"]).get(b"authorization", b"")
        found = None
        for expected, caller in self.keys.items():
            if hmac.compare_digest(given, expected):
                found = caller
        return found

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # uvicorn runs with lifespan="off"
            return
        if self.keys:
            caller = self._caller(scope)
            scope["hermes.caller"] = caller  # hermes.callers.CallerScope reads it
            if caller is None:
                await _json(
                    send,
                    401,
                    {
                        "error": "missing or wrong API key: send 'Authorization: Bearer <key>'",
                        "code": "unauthorized",
                    },
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        if self.max_body_bytes is not None:
            receive = await _bounded_body(scope, receive, send, self.max_body_bytes)
            if receive is None:
                return
        matching = [r for r in self.routes if r.pattern.fullmatch(scope["path"])]
        for route in matching:
            if route.method in (scope["method"], "ANY"):
                await route.app(scope, receive, send)
                return
        if matching:
            allowed = ", ".join(sorted({r.method for r in matching}))
            await _json(
                send,
                405,
                {
                    "error": f"method {scope['method']} is not allowed on {scope['path']}",
                    "code": "method_not_allowed",
                },
                [(b"allow", allowed.encode())],
            )
        else:
            await _json(
                send,
                404,
                {"error": f"no route {scope['method']} {scope['path']}", "code": "not_found"},
            )


def body_limit() -> int:
    """The largest body a request may send: what hermes.http.read_json_body accepts
    (HERMES_MAX_PROMPT_CHARS characters, 6 bytes each at most once escaped, and 64 KiB)."""
    from hermes.config import get_settings
    from hermes.http import BODY_BYTES_PER_PROMPT_CHAR, BODY_OVERHEAD_BYTES

    return get_settings().max_prompt_chars * BODY_BYTES_PER_PROMPT_CHAR + BODY_OVERHEAD_BYTES


async def _bounded_body(scope: Scope, receive: Any, send: Any, limit: int) -> Any:
    """`receive` for a request whose body is within `limit` bytes; None when it was answered
    413 instead, before its body was read: a Content-Length above the limit at once, a
    chunked body as soon as what arrived passes it (at most `limit` bytes held; the app then
    gets them in one message). uvicorn stops reading the socket while nobody reads the body,
    and closes the connection after the 413."""
    headers = dict(scope["headers"])
    declared = headers.get(b"content-length")
    if declared is not None:
        with contextlib.suppress(ValueError):  # not a number: the server refused it already
            if int(declared) > limit:
                await _too_large(send, f"request body has {int(declared)} bytes", limit)
                return None
        return receive
    if b"transfer-encoding" not in headers:
        return receive  # no body
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # the client left
        body += message.get("body", b"")
        if len(body) > limit:
            await _too_large(send, f"request body has more than {limit} bytes", limit)
            return None
        if not message.get("more_body", False):
            break
    replay: list[dict[str, Any]] = [{"type": "http.request", "body": bytes(body)}]

    async def replayed() -> Any:
        return replay.pop() if replay else await receive()

    return replayed


async def _too_large(send: Any, what: str, limit: int) -> None:
    await _json(
        send,
        413,
        {
            "error": f"{what}; the limit is {limit} bytes (HERMES_MAX_PROMPT_CHARS characters "
            "of prompt, up to 6 bytes each, and 64 KiB)",
            "code": "prompt_too_large",
        },
        [(b"connection", b"close")],
    )


async def _json(
    send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def apply_function_environment(
    template: dict[str, Any], fns: dict[str, Function], names: dict[str, str]
) -> None:
    """Set each variable the template gives the functions, unless the caller already set it
    (so OLLAMA_URL=... make run overrides the OllamaUrl parameter's default)."""
    # No API Gateway in front of the runner: synchronous requests may run to the model's
    # own timeout (HERMES_SYNC_BUDGET_MS=29000 reproduces the deployed limit).
    os.environ.setdefault("HERMES_SYNC_BUDGET_MS", "0")
    # CloudWatch EMF lines would drown the console; HERMES_LOCAL_METRICS=1 shows them.
    if os.environ.get("HERMES_LOCAL_METRICS") != "1":
        os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
    for fn in fns.values():
        for name, value in fn.environment.items():
            os.environ.setdefault(name, str(resolve(value, template, names)))


def ensure_tables(template: dict[str, Any]) -> None:
    """Create the template's tables if missing: idempotent, safe for several runners at once."""
    import boto3

    client = boto3.client("dynamodb")
    existing = set(client.list_tables()["TableNames"])
    for name, definition in table_definitions(template).items():
        if name in existing:
            continue
        # Another runner may create it first.
        with contextlib.suppress(client.exceptions.ResourceInUseException):
            client.create_table(**definition)
        client.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1})


def ensure_queues(template: dict[str, Any]) -> dict[str, str]:
    """Create the template's queues (dead-letter queues first, with their redrive policies);
    returns logical id → queue URL, what `!Ref Queue` means in the functions' environment."""
    import boto3

    sqs = boto3.client("sqs")
    urls: dict[str, str] = {}
    for name, queue in queue_definitions(template).items():
        attributes = dict(queue.attributes)
        if queue.dead_letter is not None:
            dlq_arn = sqs.get_queue_attributes(
                QueueUrl=urls[queue.dead_letter], AttributeNames=["QueueArn"]
            )["Attributes"]["QueueArn"]
            attributes["RedrivePolicy"] = json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": queue.max_receive_count}
            )
        try:
            urls[name] = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        except sqs.exceptions.QueueNameExists:
            # Made earlier with other settings (another runner, other parameters, a store
            # shared with tests): the template's settings win, as a deploy's would.
            urls[name] = sqs.get_queue_url(QueueName=name)["QueueUrl"]
            sqs.set_queue_attributes(QueueUrl=urls[name], Attributes=attributes)
    return urls


def load_handler(fn: Function) -> Any:
    """Import the function's handler from its CodeUri: the same code Lambda runs. HTTP
    functions are served through the ASGI app their Mangum handler wraps (`.app`)."""
    module_name, attr = fn.handler.rsplit(".", 1)
    spec = importlib.util.spec_from_file_location(
        f"hermes_function_{fn.logical_id}", fn.code_uri / f"{module_name}.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, attr)


STORE_DESCRIPTION = ""
MODEL_DESCRIPTION = ""


def start_embedded_store() -> str:
    """DynamoDB Local when Java and the npm package are there (AWS's implementation, ~2 ms
    per write), else moto's server serialized to one request at a time. Returns its URL.
    DynamoDB Local runs only where it can have a network namespace of its own (it would
    listen on every interface otherwise): when it cannot, `auto` takes moto."""
    choice = os.environ.get("HERMES_LOCAL_STORE", "auto")
    if choice not in ("auto", "dynamodb-local", "moto"):
        sys.exit(f"hermes: HERMES_LOCAL_STORE must be auto, dynamodb-local or moto, not {choice!r}")
    if choice != "moto" and (choice == "dynamodb-local" or dynamodb_local.available()):
        try:
            store = dynamodb_local.DynamoDBLocal().start()
        except dynamodb_local.IsolationUnavailable as exc:
            if choice == "dynamodb-local":
                sys.exit(f"hermes: {exc}")
            print(f"hermes: {exc}; using moto instead", flush=True)
        else:
            atexit.register(store.stop)
            return _described(f"embedded DynamoDB Local on {store.url}", store.url)
    from local.embedded_moto import start_embedded_moto

    url = start_embedded_moto()
    return _described(f"embedded moto (in-process, serialized) on {url}", url)


def _described(description: str, url: str) -> str:
    global STORE_DESCRIPTION
    STORE_DESCRIPTION = description
    return url


def start_embedded_model() -> None:
    """No OLLAMA_URL and no Ollama on its default address: serve `gemma` from the embedded
    Gemma 3 270M instead, so a fresh machine answers real text."""
    if os.environ.get("OLLAMA_URL") or os.environ.get("HERMES_EMBEDDED_MODEL") == "0":
        return
    if embedded_model.ollama_answers("http://localhost:11434"):
        return
    from hermes.config import DEFAULT_MODELS_FILE, ConfigError, load_config
    from hermes.service import MODEL_NAME

    source = Path(os.environ.get("HERMES_MODELS_FILE") or DEFAULT_MODELS_FILE)
    try:
        names = sorted(load_config(source).models)  # a bad file: one sentence, no traceback
    except ConfigError as error:
        sys.exit(f"hermes: {error}")
    chosen = os.environ.get("HERMES_EMBEDDED_MODEL_AS")
    if chosen is not None and not MODEL_NAME.fullmatch(chosen):
        sys.exit(
            "hermes: environment variable HERMES_EMBEDDED_MODEL_AS must be a model name "
            f"(letters, digits, '.', '_', ':', '-'), got {chosen[:100]!r}"
        )
    serve_as = chosen or "gemma"
    if serve_as not in names and chosen is None:
        print(
            f"hermes: no Ollama at http://localhost:11434 and models file {source} has no "
            f"model 'gemma' for the embedded Gemma 3 270M: {', '.join(names)} "
            f"{'has' if len(names) == 1 else 'have'} no backend and will answer 503. Start "
            "Ollama, set OLLAMA_URL, or set "
            "HERMES_EMBEDDED_MODEL_AS=<name> to serve the embedded model as <name>",
            flush=True,
        )
        return
    if not embedded_model.available():
        print(
            "hermes: no Ollama at http://localhost:11434 and no embedded model installed "
            "(make install builds it); models will answer 503",
            flush=True,
        )
        return
    print(
        "hermes: no Ollama at http://localhost:11434: starting the embedded Gemma 3 270M "
        f"(llama-cpp-python) as model '{serve_as}'...",
        flush=True,
    )
    # One log per runner port: `make run` always writes .cache/logs/model-server-4020.log.
    log = embedded_model.LOG_DIR / f"model-server-{os.environ.get('PORT') or 4020}.log"
    server = embedded_model.ModelServer(dynamodb_local.free_port(), log=log)
    print(f"hermes: model server log: {server.log}", flush=True)
    try:
        server.start()
    except ProcessFailed as exc:
        sys.exit(f"hermes: {exc}")
    atexit.register(server.stop)
    from hermes.backends import set_down_reason

    # When the server dies, requests for its models answer 503 with why (e.g. killed by
    # SIGILL) and where its log is, instead of a 502 about a closed connection.
    set_down_reason(server.url, server.down_reason)

    target = ROOT / ".cache" / "models.embedded.json"
    target.parent.mkdir(exist_ok=True)
    path = embedded_model.models_with_embedded_gemma(source, server.url, target, serve_as)
    os.environ["HERMES_MODELS_FILE"] = str(path)
    global MODEL_DESCRIPTION
    MODEL_DESCRIPTION = (
        f"embedded Gemma 3 270M (llama-cpp-python, {path.name}; {server.backend or 'llama.cpp'};"
        f" log {server.log.relative_to(ROOT)})"
    )


def use_this_layer() -> None:
    """This checkout's layer first on sys.path, before anything imports hermes: the venv may
    hold an editable install of another checkout (a git worktree uses the main checkout's
    venv), whose hermes would otherwise serve this checkout's functions."""
    layer = str(ROOT / "layers" / "hermes")
    if sys.path[:1] != [layer]:
        sys.path.insert(0, layer)


def build_app() -> Router:
    """Prepare the environment, the store and the tables, then mount every declared route."""
    template = load_template()
    use_this_layer()
    start_embedded_model()
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    if not os.environ.get("AWS_ENDPOINT_URL_DYNAMODB"):
        os.environ["AWS_ENDPOINT_URL_DYNAMODB"] = start_embedded_store()
    if not os.environ.get("AWS_ENDPOINT_URL_SQS"):
        from local.embedded_moto import start_embedded_moto

        os.environ["AWS_ENDPOINT_URL_SQS"] = start_embedded_moto()
    fns = functions(template)
    ensure_tables(template)
    queue_urls = ensure_queues(template)
    apply_function_environment(template, fns, queue_urls)
    handlers = {name: load_handler(fn) for name, fn in fns.items()}
    for source in queue_sources(template):
        fn = fns[source.function]
        QueuePoller(
            handlers[source.function],
            fn.logical_id,
            fn.timeout,
            queue_urls[source.queue],
            source.batch_size,
            source.max_concurrency,
        ).start()
    return Router(
        [
            MountedRoute(r.method, path_pattern(r.path), handlers[r.function].app)
            for r in http_routes(template)
        ]
        # One OpenAPI document for every route above (the runner's own; not an API route).
        + [MountedRoute("GET", path_pattern(OPENAPI_PATH), openapi.DocumentApp(handlers))],
        keys=local_keys(),
        max_body_bytes=body_limit(),
    )


def local_keys() -> dict[str, str]:
    """{key: caller} from HERMES_API_KEYS and HERMES_API_KEY (hermes.callers.api_keys)."""
    from hermes.callers import api_keys
    from hermes.config import ConfigError

    try:
        return api_keys(os.environ.get("HERMES_API_KEYS"), os.environ.get("HERMES_API_KEY"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """127.0.0.1 (any 127.x), ::1 or localhost: an address no other machine reaches."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name, or an interface's address: reachable from elsewhere


def bind_refusal(host: str) -> str | None:
    """Why the runner must not listen on `host` (None: it may): beyond loopback, only with a
    key, else anyone who reaches the machine could use the models as any caller."""
    if is_loopback(host) or local_keys():
        return None
    return (
        f"hermes: HOST={host} would let other machines reach this runner without a key, so it "
        "does not start: set HERMES_API_KEY (or HERMES_API_KEYS) to require one, or listen on "
        "127.0.0.1"
    )


def describe(port: int, host: str) -> str:
    from hermes.config import get_settings

    settings = get_settings()
    store = STORE_DESCRIPTION or os.environ["AWS_ENDPOINT_URL_DYNAMODB"]
    lines = [f"Hermes listening on http://{host}:{port}", f"  DynamoDB: {store}"]
    for name, config in sorted(settings.hosts.items()):
        kind = "Ollama" if config.kind == "ollama" else "OpenAI-compatible server"
        note = (
            f" = {MODEL_DESCRIPTION}" if name == embedded_model.HOST and MODEL_DESCRIPTION else ""
        )
        lines.append(
            f"  host {name}: {kind} at {settings.host_url(name)}{note}, "
            f"memory_budget={config.memory_budget}"
        )
    for name, model in sorted(settings.models.items()):
        lines.append(
            f"  model {name}: {model.backend_model} on host{'s' if model.hosts else ''} "
            f"{', '.join(model.pool)}, max_concurrency={model.max_concurrency}"
            f"{' per host' if model.hosts else ''}, memory_cost={model.memory_cost}, "
            f"queue_timeout={model.queue_timeout_ms} ms, "
            f"timeout={model.timeout} ms"
        )
    lines += [f"  route {r.method} {r.path} -> {r.function}" for r in http_routes()]
    lines += [
        f"  queue {q.queue} -> {q.function} (batches of {q.batch_size})" for q in queue_sources()
    ]
    return "\n".join(lines)


def backends_line() -> str | None:
    """One line naming the models that no backend can serve now, from /v1/status's own
    probes (`make run` without Ollama: llama3 and mistral, while gemma runs on the embedded
    model); None when every model has one."""
    from hermes.service import get_service
    from hermes.status import render_status

    _, body = asyncio.run(render_status(get_service()))
    missing = body["failing"]["models"]
    if not missing:
        return None
    theirs = {h for m in body["models"] if m["name"] in missing for h in m["failing_hosts"]}
    why = "; ".join(
        f"host {h['name']}: {h['error']}" for h in body["failing"]["hosts"] if h["name"] in theirs
    )
    return (
        f"hermes: no backend for {', '.join(missing)} ({len(missing)} of "
        f"{len(body['models'])} models) - {why}; their requests answer 503 "
        "upstream_unavailable until a backend answers, and /v1/status shows them as no_backend"
    )


def port_taken(host: str, port: int) -> str | None:
    """Why the runner could not listen on host:port (None: it can), found before anything
    starts, so that the answer is one sentence rather than uvicorn's error after the start."""
    import socket

    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    try:
        with socket.create_server((bare, port), family=family):
            return None
    except OSError as error:
        return os.strerror(error.errno) if error.errno else str(error)


def main() -> None:
    import uvicorn

    use_this_layer()
    from hermes.config import ConfigError

    raw_port = os.environ.get("PORT") or "4020"
    if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
        sys.exit(f"hermes: environment variable PORT must be a port number, got {raw_port!r}")
    port = int(raw_port)
    host = os.environ.get("HOST") or "127.0.0.1"

    try:
        refusal = bind_refusal(host)
        if refusal:
            sys.exit(refusal)
        taken = port_taken(host, port)
        if taken:
            sys.exit(
                f"hermes: cannot listen on {host}:{port} ({taken}): set PORT to a free port, "
                "or stop what listens there"
            )
        app = build_app()
        print(describe(port, host), flush=True)
        missing = backends_line()
        if missing:
            print(missing, flush=True)
    except ConfigError as exc:
        sys.exit(f"hermes: configuration error: {exc}")
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=os.environ.get("HERMES_ACCESS_LOG", "1") == "1",
        lifespan="off",
    )


if __name__ == "__main__":
    main()
