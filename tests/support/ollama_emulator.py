"""Ollama emulator for Hermes' tests and benchmarks.

A Starlette app speaking enough of Ollama's HTTP API (native ``/api/*`` and the OpenAI-compatible
``/v1/*``) for the official ``ollama`` and ``openai`` clients, plus a control API (``/_emulator/*``)
to inject faults per model tag and read exact in-flight accounting. One emulator stands for one
Ollama host: residency (which models are loaded) is per emulator.

In-process::

    with OllamaEmulator(max_loaded_models=2, load_delay_ms=50) as emu:
        ollama.Client(host=emu.url).generate(model="gemma3:1b", prompt="hi there")
        emu.stats()["requests"]["gemma3:1b"]  # -> 1
        emu.stats()["loads"]["gemma3:1b"]  # -> 1

As a process: ``python -m tests.support.ollama_emulator --port 11434`` (``--port 0`` picks a free
port; the "listening on" line tells which), with ``--max-loaded-models N`` (0: unlimited, the
default), ``--load-delay-ms MS`` (default 0) and ``--keep-alive-s S`` (default 300; negative:
forever), as ``OLLAMA_MAX_LOADED_MODELS`` and ``OLLAMA_KEEP_ALIVE`` are for Ollama.

Control API (``OllamaEmulator`` has the same as methods, acting on the state directly):

- ``POST /_emulator/behaviour`` ``{"model": tag | "*", "mode": one of MODES, "delay_ms",
  "token_delay_ms", "tokens", "status"}``: replaces that key's behaviour (a tag's wins over "*").
- ``POST /_emulator/weights`` ``{tag | "*": int}``: merged into the current weights.
- ``POST /_emulator/residency`` ``{"max_loaded_models", "load_delay_ms", "keep_alive_s"}``: any
  of them, the others stay; answers ``{"residency": {...}}``. A lower ``max_loaded_models`` evicts
  at the next load; a change of ``keep_alive_s`` applies at once to models whose last request
  gave no ``keep_alive``.
- ``GET /_emulator/stats``: in_flight, peak_in_flight, requests, weight_in_use, peak_weight,
  busy_time_s (integral of in_flight over time), elapsed_s (since reset), behaviours, weights,
  residency (the settings), loads and evictions (per tag), resident (tags, most recently used
  first), loading (tags being loaded), served (every answer's reported tokens, with its time),
  meta_calls (/api/ps and /api/show calls) and last_show (the last /api/show body).
- ``GET /_emulator/received``: every model call received since reset (the completion and
  embedding routes), oldest first: ``{"received": [{"path", "body", "at"}]}``, ``body`` the JSON
  as sent, ``at`` the epoch time it arrived (the last RECEIVED_KEPT only).
- ``POST /_emulator/reset`` (optional ``{"weights": true}`` to clear weights too).
- ``POST /_emulator/release``: every request held by mode ``hold`` goes on as ``ok`` (with the
  behaviour's delays and tokens); answers ``{"released": n}``. Later requests are held again
  while the mode stays ``hold``.

Residency, as Ollama does it:

- A model is resident once loaded. A request for a model that is not loads it first, taking
  ``load_delay_ms`` (concurrent requests for it wait for that one load). At ``max_loaded_models``
  resident or loading models, the least recently used resident model with no request in flight
  (held and hanging requests are in flight) is evicted; when every one is busy, the request waits
  until one is idle, as Ollama queues it.
- A model expires ``keep_alive`` after its last request ended: the request's own ``keep_alive``
  (seconds, or a duration such as "10m"; 0 unloads the model once its requests are done; negative:
  never) or else ``keep_alive_s``. ``/api/ps`` lists exactly the resident models, most recently
  used first, with ``expires_at``.
- The final object of ``/api/generate`` and ``/api/chat`` reports ``load_duration``: the time the
  request waited for its model (a few microseconds when resident), included in
  ``total_duration``. Modes ``busy`` and ``not_found`` answer without loading anything.

Choices worth knowing:

- Answers are ``"Echo:"`` followed by the prompt's (or last message's) words, one token each,
  cycling the words when the prompt is shorter than the token count. ``format``/``response_format``
  JSON yields ``{"echo": ...}`` split into the same number of chunks.
- Weights are charged per request, like Hermes' memory budget: ``weight_in_use`` is the sum over
  models of weight x in-flight requests. Models without a weight count 1 (or ``weights["*"]``).
- Requests for unknown models (and malformed requests) are rejected before accounting.
- Reset clears counters, peaks, busy time and behaviours but not the live ``in_flight`` gauge, so
  a request straddling a reset is still decremented correctly. It also unloads every model and
  clears loads and evictions (a load under way still completes); the residency settings stay.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import itertools
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

DEFAULT_MODELS = ("gemma3:1b", "llama3:8b", "mistral:7b")
OLLAMA_VERSION = "0.12.0"
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
MODES = ("ok", "hang", "error", "busy", "cut_stream", "not_found", "hold")
CUT_AFTER = 2  # chunks sent before cut_stream drops the connection
RECEIVED_KEPT = 10_000  # bodies recorded at most (a long benchmark run keeps the latest)
_ids = itertools.count(1)


_FOREVER = timedelta(microseconds=2**63 // 1000)  # Ollama's negative keep_alive: max duration


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _base(name: str) -> str:
    return name.removesuffix(":latest")  # Ollama treats "llama3" and "llama3:latest" alike


def _not_found(model: str) -> str:
    return f'model "{model}" not found, try pulling it first'


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error_body(openai: bool, status: int, message: str) -> dict[str, Any]:
    if not openai:
        return {"error": message}
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class Received(NamedTuple):
    """A model call as the emulator received it: the route, the JSON body as sent, and when
    it arrived (epoch seconds, before any delay, load or hang)."""

    path: str
    body: dict[str, Any]
    at: float


class BadRequest(Exception):
    """Malformed request: answered 400 in the shape of the API that was called."""


class _CutStream(Exception):
    """Raised mid-response so uvicorn closes the socket: ASGI has no other way to abort."""


class _QuietCut(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _CutStream))


_QUIET_CUT = _QuietCut()  # one instance, so repeated addFilter calls are no-ops


@dataclass(frozen=True)
class Behaviour:
    mode: str = "ok"
    delay_ms: int = 0  # before the first byte
    token_delay_ms: int = 0  # between streamed tokens
    tokens: int | None = None  # None: the emulator-wide default
    status: int = 500  # for mode "error"

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Behaviour:
        def integer(key: str, default: int | None, low: int) -> Any:
            value = body.get(key, default)
            if value is None and default is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BadRequest(f"{key} must be an integer >= {low}")
            return value

        mode = body.get("mode", "ok")
        if mode not in MODES:
            raise BadRequest(f"mode must be one of {', '.join(MODES)}")
        return cls(
            mode,
            integer("delay_ms", 0, 0),
            integer("token_delay_ms", 0, 0),
            integer("tokens", None, 1),
            integer("status", 500, 100),
        )


_OK = Behaviour()

RESIDENCY_FIELDS = ("max_loaded_models", "load_delay_ms", "keep_alive_s")


def _residency(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validated residency settings (any subset of RESIDENCY_FIELDS)."""
    unknown = sorted(set(fields) - set(RESIDENCY_FIELDS))
    if unknown:
        raise BadRequest(f"unknown residency fields: {', '.join(unknown)}")
    for key, value in fields.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise BadRequest(f"{key} must be a number")
        if key == "max_loaded_models" and (not isinstance(value, int) or value < 0):
            raise BadRequest("max_loaded_models must be an integer >= 0 (0: unlimited)")
        if key == "load_delay_ms" and value < 0:
            raise BadRequest("load_delay_ms must be >= 0")
    return dict(fields)


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def _keep_alive(value: Any) -> float | None:
    """A request's keep_alive in seconds as Ollama reads it: a number of seconds or a Go duration
    ("5m", "1h30m", "0s"); negative keeps the model forever (inf). None when absent."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            digits = text.lstrip("+-")
            parts = _DURATION_PART.findall(digits)
            if not digits or "".join(n + u for n, u in parts) != digits:
                raise BadRequest(f'time: invalid duration "{value}"') from None
            seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
            seconds = -seconds if text.startswith("-") else seconds
    else:
        raise BadRequest("keep_alive must be a number or a duration string")
    if math.isnan(seconds):
        raise BadRequest(f'time: invalid duration "{value}"')
    return math.inf if seconds < 0 else seconds


@dataclass
class _Resident:
    last_used: float  # time.monotonic() of the last request's start or end
    keep_alive: float | None  # from that request; None: the emulator's keep_alive_s


def _model_info(name: str) -> dict[str, Any]:
    family, _, tag = name.partition(":")
    try:
        billions = float(tag[:-1]) if tag.lower().endswith("b") else 7.0
    except ValueError:
        billions = 7.0
    return {
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "size": int(billions * 0.6e9),  # roughly a Q4 quantisation
        "parameter_count": int(billions * 1e9),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": f"{billions:g}B",
            "quantization_level": "Q4_K_M",
        },
    }


class EmulatorState:
    """Known models, injected behaviours and accounting, shared by the server and test threads."""

    def __init__(
        self,
        models: Sequence[str] = DEFAULT_MODELS,
        tokens: int = 5,
        *,
        max_loaded_models: int = 0,
        load_delay_ms: float = 0,
        keep_alive_s: float = 300,
    ) -> None:
        self.default_tokens = tokens
        self.started_at = _now_iso()
        self.models = {_base(m): m for m in models}
        self.info = {m: _model_info(m) for m in models}  # precomputed: requests do no hashing
        self.behaviours: dict[str, Behaviour] = {}
        self.weights: dict[str, int] = {}
        self.in_flight = dict.fromkeys(models, 0)
        self.weight_in_use = 0
        self.live: set[asyncio.Event] = set()  # one per running request; event-loop thread only
        self.held: set[asyncio.Event] = set()  # one per request held by mode "hold"; same thread
        settings = (max_loaded_models, load_delay_ms, keep_alive_s)
        _residency(dict(zip(RESIDENCY_FIELDS, settings, strict=True)))  # raises BadRequest
        self.max_loaded_models = max_loaded_models  # 0: unlimited
        self.load_delay_ms = float(load_delay_ms)
        self.keep_alive_s = float(keep_alive_s)  # negative: forever
        self.resident: dict[str, _Resident] = {}  # least recently used first
        self.loading: dict[str, asyncio.Task[None]] = {}  # event-loop thread only
        self._waiters: set[asyncio.Future[None]] = set()  # requests waiting for an idle model
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop serving requests
        self._lock = threading.Lock()  # the test thread reads/mutates while the loop serves
        self._clear()

    def _clear(self) -> None:
        now = time.monotonic()
        self.peak = dict(self.in_flight)
        self.requests = dict.fromkeys(self.in_flight, 0)
        self.busy = dict.fromkeys(self.in_flight, 0.0)
        self.since = dict.fromkeys(self.in_flight, now)  # when in_flight[tag] last changed
        self.peak_weight = self.weight_in_use
        self.loads = dict.fromkeys(self.in_flight, 0)
        self.evictions = dict.fromkeys(self.in_flight, 0)
        self.served: list[tuple[float, str, int, int]] = []  # (epoch s, tag, prompt, completion)
        self.meta_calls: dict[str, int] = {}  # /api/ps, /api/show...: calls per path
        self.last_show: dict[str, Any] | None = None  # the last /api/show body, as received
        self.received: collections.deque[Received] = collections.deque(maxlen=RECEIVED_KEPT)
        self.resident.clear()
        self.reset_at = now

    def resolve(self, name: str) -> str | None:
        return self.models.get(_base(name))

    def _key(self, model: str) -> str:
        tag = "*" if model == "*" else self.resolve(model)
        if tag is None:
            raise BadRequest(_not_found(model))
        return tag

    def behaviour(self, tag: str) -> Behaviour:
        with self._lock:
            return self.behaviours.get(tag) or self.behaviours.get("*") or _OK

    def set_behaviour(self, model: str, behaviour: Behaviour) -> None:
        key = self._key(model)
        with self._lock:
            self.behaviours[key] = behaviour

    def set_weights(self, weights: Mapping[str, Any]) -> None:
        for value in weights.values():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadRequest("weights must be integers >= 0")
        keyed = {self._key(model): value for model, value in weights.items()}
        with self._lock:
            self.weights.update(keyed)
            self._reweigh()

    def _reweigh(self) -> None:
        default = self.weights.get("*", 1)
        self.weight_in_use = sum(
            self.weights.get(t, default) * n for t, n in self.in_flight.items()
        )
        self.peak_weight = max(self.peak_weight, self.weight_in_use)

    def _add(self, tag: str, delta: int) -> None:
        now = time.monotonic()
        self.busy[tag] += self.in_flight[tag] * (now - self.since[tag])
        self.since[tag] = now
        self.in_flight[tag] += delta
        self.peak[tag] = max(self.peak[tag], self.in_flight[tag])
        self._reweigh()

    def answered(self, tag: str, prompt_tokens: int, completion_tokens: int) -> None:
        """An answer's token counts, as its last object reports them, when it was sent."""
        with self._lock:
            self.served.append((time.time(), tag, prompt_tokens, completion_tokens))

    def record(self, path: str, body: dict[str, Any]) -> None:
        """A model call arrived (before its model is even looked up)."""
        with self._lock:
            self.received.append(Received(path, body, time.time()))

    def calls(self) -> list[Received]:
        """The model calls received since reset, oldest first."""
        with self._lock:
            return list(self.received)

    def enter(self, tag: str) -> None:
        with self._lock:
            self.requests[tag] += 1
            self._add(tag, 1)

    def leave(self, tag: str, loaded: bool = False) -> None:
        """A request ends; `loaded`: it had its model resident (it counts as a use)."""
        with self._lock:
            self._add(tag, -1)
            model = self.resident.get(tag)
            if loaded and model is not None:
                model.last_used = time.monotonic()
                if not self.in_flight[tag] and self._keep_alive_of(model) <= 0:
                    del self.resident[tag]  # keep_alive 0: unloaded once its requests are done
        self._wake()  # a model may be idle now

    # Residency. Requests run on the event loop; the test thread may reset or change settings.

    def _set_residency(self, fields: Mapping[str, Any]) -> None:
        for key, value in fields.items():
            setattr(self, key, float(value) if key != "max_loaded_models" else value)

    def set_residency(self, fields: Mapping[str, Any]) -> None:
        checked = _residency(fields)
        with self._lock:
            self._set_residency(checked)
        self._wake_threadsafe()  # a higher max_loaded_models may let a waiting request load

    def residency(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in RESIDENCY_FIELDS}

    def _keep_alive_of(self, model: _Resident) -> float:
        seconds = self.keep_alive_s if model.keep_alive is None else model.keep_alive
        return math.inf if seconds < 0 else seconds

    def _expire(self, now: float) -> None:
        """Unload idle models whose keep_alive has run out (under the lock)."""
        for tag, model in list(self.resident.items()):
            if not self.in_flight[tag] and now >= model.last_used + self._keep_alive_of(model):
                del self.resident[tag]

    async def load(self, tag: str, keep_alive: float | None, gone: asyncio.Event) -> bool:
        """Make `tag` resident for a request that is in flight, loading it (and evicting another
        model, or waiting for one to be idle) if need be. False if the client went away first."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new server (OllamaEmulator.start again): new loop
            self._loop, self._waiters = loop, set()
        while True:
            with self._lock:
                wait_for = self._place(tag, keep_alive, loop)
            if wait_for is None:
                return True
            if await _until(gone, wait_for):
                return False

    def _place(
        self, tag: str, keep_alive: float | None, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[None] | None:
        """Under the lock: None once `tag` is resident (and marked used), else what to wait for:
        its load, or a change that may free a slot."""
        now = time.monotonic()
        self._expire(now)
        if tag in self.resident:
            self.resident.pop(tag)  # re-inserted last: most recently used
            self.resident[tag] = _Resident(now, keep_alive)
            return None
        if tag in self.loading:
            return self.loading[tag]
        limit = self.max_loaded_models
        while limit and len(self.resident) + len(self.loading) >= limit:
            idle = next((t for t in self.resident if not self.in_flight[t]), None)
            if idle is None:  # every slot busy: wait, as Ollama queues the request
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.add(waiter)
                return waiter
            del self.resident[idle]
            self.evictions[idle] += 1
        task = self.loading[tag] = loop.create_task(self._load(tag, self.load_delay_ms))
        return task

    async def _load(self, tag: str, delay_ms: float) -> None:
        loaded, until = False, time.monotonic() + delay_ms / 1000
        try:
            while (left := until - time.monotonic()) > 0:  # asyncio may wake a little early
                await asyncio.sleep(left)
            loaded = True
        finally:  # cancelled (server stopping): not loaded, waiters try again
            with self._lock:
                del self.loading[tag]
                if loaded:
                    self.loads[tag] += 1
                    self.resident[tag] = _Resident(time.monotonic(), None)
            self._wake()

    def _wake(self) -> None:
        """Event-loop thread: waiting requests check again."""
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _wake_threadsafe(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake()
        else:
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(self._wake)

    def loaded(self) -> list[tuple[str, datetime]]:
        """The resident models, most recently used first, with when each expires."""
        with self._lock:
            now, wall = time.monotonic(), datetime.now(UTC)
            self._expire(now)
            models = []
            for tag, model in reversed(self.resident.items()):
                left = model.last_used + self._keep_alive_of(model) - now
                models.append(
                    (tag, wall + (_FOREVER if math.isinf(left) else timedelta(seconds=left)))
                )
            return models

    def reset(self, weights: bool = False) -> None:
        with self._lock:
            self.behaviours.clear()
            if weights:
                self.weights.clear()
                self._reweigh()
            self._clear()
        self._wake_threadsafe()  # slots are free

    def stats(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            busy = {t: b + self.in_flight[t] * (now - self.since[t]) for t, b in self.busy.items()}
            return {
                "in_flight": dict(self.in_flight),
                "peak_in_flight": dict(self.peak),
                "requests": dict(self.requests),
                "weight_in_use": self.weight_in_use,
                "peak_weight": self.peak_weight,
                "busy_time_s": busy,  # / elapsed_s = time-averaged in-flight requests
                "elapsed_s": now - self.reset_at,
                "behaviours": {k: asdict(b) for k, b in self.behaviours.items()},
                "weights": dict(self.weights),
                "residency": self.residency(),
                "loads": dict(self.loads),
                "evictions": dict(self.evictions),
                "resident": list(reversed(self.resident)),  # most recently used first
                "loading": sorted(self.loading),
                # Every answer's tokens as reported to the client: [epoch s, tag, prompt,
                # completion] (what a caller's token budget must count).
                "served": [list(answer) for answer in self.served],
                "meta_calls": dict(self.meta_calls),
                "last_show": self.last_show,
            }


async def _until(gone: asyncio.Event, future: asyncio.Future[None]) -> bool:
    """Wait for `future` (not cancelling it); True if the client went away first."""
    if gone.is_set():
        return True
    watch = asyncio.ensure_future(gone.wait())
    either: list[asyncio.Future[Any]] = [watch, future]
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    return gone.is_set()


@dataclass
class _Job:
    api: str  # "generate" | "chat" | "openai_chat" | "openai_completion" | an EMBED_APIS
    model: str  # as requested, echoed back like Ollama does
    tag: str  # as configured, the accounting key
    stream: bool
    prompt: str
    prompt_tokens: int
    limit: int | None  # num_predict / max_tokens
    json_mode: bool
    include_usage: bool
    keep_alive: float | None  # seconds (inf: forever); None: the emulator's keep_alive_s
    inputs: tuple[str, ...] = ()  # the texts of an embedding request
    dimensions: int | None = None  # an embedding request's vector size (default EMBED_DIM)

    @property
    def openai(self) -> bool:
        return self.api.startswith("openai")

    @property
    def embedding(self) -> bool:
        return self.api in EMBED_APIS


# Ollama's /api/embed and older /api/embeddings, OpenAI's /v1/embeddings.
EMBED_APIS = ("embed", "embeddings", "openai_embeddings")
EMBED_DIM = 16


def _vector(text: str, dimensions: int) -> list[float]:
    """A text's embedding: deterministic (the same text, the same vector), unit length, as
    Ollama's /api/embed answers them."""
    import hashlib
    import math

    raw = [
        b / 127.5 - 1
        for i in range(0, dimensions, 32)
        for b in hashlib.sha256(f"{i}:{text}".encode()).digest()
    ][:dimensions]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def _parse_embed_job(api: str, body: dict[str, Any], tag: str) -> _Job:
    given = body.get("prompt") if api == "embeddings" else body.get("input")
    inputs = [given] if isinstance(given, str) else given
    if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
        raise BadRequest("input must be a string or a list of strings")
    if api == "embeddings" and len(inputs) != 1:
        raise BadRequest("prompt must be a string")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or dimensions < 1):
        raise BadRequest("dimensions must be a positive integer")
    return _Job(
        api=api,
        model=body["model"],
        tag=tag,
        stream=False,
        prompt=" ".join(inputs),
        prompt_tokens=sum(len(t.split()) for t in inputs),
        limit=None,
        json_mode=False,
        include_usage=False,
        keep_alive=None if api.startswith("openai") else _keep_alive(body.get("keep_alive")),
        inputs=tuple(inputs),
        dimensions=dimensions,
    )


def _text_of(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    raise BadRequest("message content must be a string")


def _object(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key) or {}
    if not isinstance(value, dict):
        raise BadRequest(f"{key} must be an object")
    return value


def _parse_job(api: str, body: dict[str, Any], tag: str) -> _Job:
    openai = api.startswith("openai")
    stream = body.get("stream")
    stream = not openai if stream is None else stream
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean")
    if api in ("generate", "openai_completion"):
        prompt = body.get("prompt") or ""
        if isinstance(prompt, list) and openai:
            prompt = " ".join(map(str, prompt))
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string")
        context = f"{body.get('system') or ''} {prompt}"
    else:
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("messages must be a list of objects")
        if openai and not messages:
            raise BadRequest("[] is too short - 'messages'")
        texts = [_text_of(m.get("content")) for m in messages]
        prompt, context = (texts[-1] if texts else ""), " ".join(texts)
    if openai:
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        fmt = _object(body, "response_format").get("type")
    else:
        limit, fmt = _object(body, "options").get("num_predict"), body.get("format")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        limit = None  # absent, or a value Ollama would treat as "no limit"
    return _Job(
        api=api,
        model=body["model"],
        tag=tag,
        stream=stream,
        prompt=prompt,
        prompt_tokens=len(context.split()),
        limit=limit,
        json_mode=fmt in ("json", "json_object", "json_schema") or isinstance(fmt, dict),
        include_usage=stream and bool(_object(body, "stream_options").get("include_usage")),
        keep_alive=None if openai else _keep_alive(body.get("keep_alive")),
    )


def _tokens(prompt: str, n: int, json_mode: bool) -> list[str]:
    words = prompt.split() or ["..."]
    tokens = ["Echo:"] + [" " + words[i % len(words)] for i in range(n - 1)]
    if not json_mode:
        return tokens
    text = json.dumps({"echo": "".join(tokens)})
    return [text[len(text) * i // n : len(text) * (i + 1) // n] for i in range(n)]


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    # The body has been read already, so the next message can only be http.disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def _pause(gone: asyncio.Event, ms: float) -> bool:
    """Sleep ``ms``; True if the client went away (or the server is stopping) meanwhile."""
    if ms <= 0:
        return gone.is_set()
    try:
        await asyncio.wait_for(gone.wait(), ms / 1000)
        return True
    except TimeoutError:
        return False


class _Completion(Response):
    """One model call. Raw ASGI rather than StreamingResponse: it controls every byte (cut_stream),
    notices disconnects while sleeping (hang, delays) and keeps in-flight accounting exact."""

    def __init__(self, state: EmulatorState, job: _Job) -> None:
        # No super().__init__(): nothing of Response is used beyond being awaitable as ASGI.
        self.state, self.job, self.started = state, job, False
        self.loaded = False  # its model is resident and it counts as a use of it
        self.load_ns = 0  # time spent waiting for the model to load (Ollama's load_duration)
        self.head: dict[str, Any] = {"model": job.model}
        if job.openai:
            chat = job.api == "openai_chat"
            self.head = {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{next(_ids)}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": job.model,
                "system_fingerprint": "fp_ollama",
            }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.monotonic_ns()
        self.state.enter(self.job.tag)
        self.send = send
        gone = asyncio.Event()  # set on client disconnect or server shutdown
        self.state.live.add(gone)
        watcher = asyncio.create_task(_watch_disconnect(receive, gone))
        try:
            await self._respond(self.state.behaviour(self.job.tag), gone, t0)
        finally:
            watcher.cancel()
            self.state.live.discard(gone)
            self.state.leave(self.job.tag, self.loaded)

    async def _respond(self, b: Behaviour, gone: asyncio.Event, t0: int) -> None:
        job = self.job
        if b.mode not in ("busy", "not_found"):  # those are answered before any load
            started = time.monotonic_ns()
            if not await self.state.load(job.tag, job.keep_alive, gone):
                return await self._abandon()
            self.loaded, self.load_ns = True, max(1, time.monotonic_ns() - started)
            # The behaviour as it is now: a release or a change during the load applies.
            b = self.state.behaviour(job.tag)
        if b.mode == "hang":
            await gone.wait()
            return await self._abandon()
        if b.mode == "hold" and await self._hold(gone):
            return await self._abandon()
        if await _pause(gone, b.delay_ms):
            return await self._abandon()
        faults = {
            "error": (b.status, "emulated failure"),
            "busy": (503, BUSY_MESSAGE),
            "not_found": (404, _not_found(job.model)),
        }
        if b.mode in faults:
            status, message = faults[b.mode]
            return await self._send(_dumps(_error_body(job.openai, status, message)), status)
        if job.embedding:
            return await self._send(_dumps(self._embeddings(t0)))
        n, reason = b.tokens or self.state.default_tokens, "stop"
        if job.limit is not None and job.limit < n:
            n, reason = job.limit, "length"
        tokens = _tokens(job.prompt, n, job.json_mode)
        cut = b.mode == "cut_stream"
        if not job.stream:
            if await _pause(gone, b.token_delay_ms * (n - 1)):
                return await self._abandon()
            timings = self._timings(t0, time.monotonic_ns(), n)
            body = _dumps(self._full("".join(tokens), reason, timings))
            if cut:  # headers promise the whole body, half of it arrives, then the socket closes
                await self._start("application/json", len(body))
                await self._body(body[: len(body) // 2])
                raise _CutStream
            return await self._send(body)
        await self._start("text/event-stream" if job.openai else "application/x-ndjson")
        t1 = time.monotonic_ns()
        for i, token in enumerate(tokens[:CUT_AFTER] if cut else tokens):
            if i and await _pause(gone, b.token_delay_ms):
                return await self._abandon()
            await self._line(self._delta(token))
        if cut:
            raise _CutStream
        for obj in self._final(reason, self._timings(t0, t1, n)):
            await self._line(obj)
        await self._body(b"data: [DONE]\n\n" if job.openai else b"", more=False)

    async def _hold(self, gone: asyncio.Event) -> bool:
        """Wait for /_emulator/release; True if the client went away first."""
        released = asyncio.Event()
        self.state.held.add(released)
        try:
            waits = [asyncio.create_task(e.wait()) for e in (released, gone)]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
            return not released.is_set()
        finally:
            self.state.held.discard(released)

    async def _start(self, media_type: str, length: int | None = None, status: int = 200) -> None:
        headers = [(b"content-type", media_type.encode())]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def _body(self, data: bytes, more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def _send(self, body: bytes, status: int = 200) -> None:
        await self._start("application/json", len(body), status)
        await self._body(body, more=False)

    async def _line(self, obj: dict[str, Any]) -> None:  # one NDJSON line or SSE event
        await self._body(
            b"data: " + _dumps(obj) + b"\n\n" if self.job.openai else _dumps(obj) + b"\n"
        )

    async def _abandon(self) -> None:
        # Client gone: uvicorn drops whatever we send. Server stopping: end the response cleanly.
        if self.started:
            await self._body(b"", more=False)
        else:
            await self._send(_dumps({"error": "emulator shutting down"}), 503)

    def _timings(self, t0: int, t1: int, count: int) -> dict[str, int]:
        """t0: the request arrived; t1: the first token (the prompt was evaluated)."""
        now = time.monotonic_ns()
        self.state.answered(self.job.tag, self.job.prompt_tokens, count)
        return {  # max(1, ...): clients divide by these to get tokens/s
            "total_duration": max(1, now - t0),  # >= load + prompt_eval + eval
            "load_duration": max(1, self.load_ns),
            "prompt_eval_count": self.job.prompt_tokens,
            "prompt_eval_duration": max(1, t1 - t0 - self.load_ns),
            "eval_count": count,
            "eval_duration": max(1, now - t1),
        }

    def _delta(self, text: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        if self.job.api == "generate":
            return {**self.head, "created_at": _now_iso(), "response": text, "done": False}
        if self.job.api == "chat":
            return {**self.head, "created_at": _now_iso(), "message": message, "done": False}
        choice = {"delta": message} if self.job.api == "openai_chat" else {"text": text}
        return {**self.head, "choices": [{"index": 0, **choice, "finish_reason": None}]}

    def _embeddings(self, t0: int) -> dict[str, Any]:
        """The answer of an embedding request, in its API's shape."""
        job = self.job
        vectors = [_vector(text, job.dimensions or EMBED_DIM) for text in job.inputs]
        timings = self._timings(t0, time.monotonic_ns(), 0)
        if job.api == "openai_embeddings":
            data = [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
            ]
            tokens = job.prompt_tokens
            usage = {"prompt_tokens": tokens, "total_tokens": tokens}
            return {"object": "list", "data": data, "model": job.model, "usage": usage}
        if job.api == "embeddings":
            return {"embedding": vectors[0]}
        keep = ("total_duration", "load_duration", "prompt_eval_count")
        return {"model": job.model, "embeddings": vectors} | {k: timings[k] for k in keep}

    def _full(self, text: str, reason: str, timings: dict[str, int]) -> dict[str, Any]:
        if not self.job.openai:
            obj = {**self._delta(text), "done": True, "done_reason": reason, **timings}
            return obj | {"context": []} if self.job.api == "generate" else obj
        choice: dict[str, Any]
        if self.job.api == "openai_chat":
            choice = {"message": {"role": "assistant", "content": text}}
            obj = {**self.head, "object": "chat.completion"}
        else:
            choice, obj = {"text": text, "logprobs": None}, dict(self.head)
        choices = [{"index": 0, **choice, "finish_reason": reason}]
        return obj | {"choices": choices, "usage": self._usage(timings)}

    def _usage(self, timings: dict[str, int]) -> dict[str, int]:
        prompt, completion = timings["prompt_eval_count"], timings["eval_count"]
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _final(self, reason: str, timings: dict[str, int]) -> list[dict[str, Any]]:
        if not self.job.openai:
            return [self._full("", reason, timings)]
        last = self._delta("")
        last["choices"][0]["finish_reason"] = reason
        if not self.job.include_usage:
            return [last]
        return [last, {**self.head, "choices": [], "usage": self._usage(timings)}]


async def _json_body(request: Request, optional: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if not raw and optional:
        return {}
    if not raw:
        raise BadRequest("missing request body")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def create_app(state: EmulatorState) -> Starlette:
    def completion(api: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            body = await _json_body(request)
            state.record(request.url.path, body)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise BadRequest("model is required")
            tag = state.resolve(model)
            if tag is None:
                error = _error_body(api.startswith("openai"), 404, _not_found(model))
                return JSONResponse(error, 404)
            parse = _parse_embed_job if api in EMBED_APIS else _parse_job
            return _Completion(state, parse(api, body, tag))

        return endpoint

    def entry(tag: str, **extra: Any) -> dict[str, Any]:
        info = state.info[tag]
        fields = {k: info[k] for k in ("size", "digest", "details")}
        return {"name": tag, "model": tag, **extra, **fields}

    async def tags(request: Request) -> Response:
        models = [entry(t, modified_at=state.started_at) for t in state.info]
        return JSONResponse({"models": models})

    def count(path: str) -> None:
        with state._lock:
            state.meta_calls[path] = state.meta_calls.get(path, 0) + 1

    async def ps(request: Request) -> Response:
        count("/api/ps")
        models = [
            entry(
                tag,
                expires_at=expires.isoformat(),
                size_vram=state.info[tag]["size"],
                context_length=4096,
            )
            for tag, expires in state.loaded()
        ]
        return JSONResponse({"models": models})

    async def show(request: Request) -> Response:
        body = await _json_body(request)
        count("/api/show")
        state.last_show = body
        name = body.get("model") or body.get("name") or ""
        tag = state.resolve(str(name))
        if tag is None:
            return JSONResponse({"error": _not_found(str(name))}, 404)
        info, family = state.info[tag], state.info[tag]["details"]["family"]
        return JSONResponse(
            {
                "modelfile": f"# Modelfile generated by ollama-emulator\nFROM {tag}\n",
                "parameters": 'stop "<end_of_turn>"',
                "template": "{{ .Prompt }}",
                "details": info["details"],
                "model_info": {
                    "general.architecture": family,
                    "general.parameter_count": info["parameter_count"],
                    f"{family}.context_length": 8192,
                },
                "capabilities": ["completion"],
                "modified_at": state.started_at,
            }
        )

    async def models(request: Request) -> Response:
        data = [
            {"id": t, "object": "model", "created": 0, "owned_by": "library"} for t in state.info
        ]
        return JSONResponse({"object": "list", "data": data})

    async def behaviour(request: Request) -> Response:
        body = await _json_body(request)
        state.set_behaviour(str(body.get("model", "*")), Behaviour.parse(body))
        return JSONResponse({"behaviours": state.stats()["behaviours"]})

    async def weights(request: Request) -> Response:
        state.set_weights(await _json_body(request))
        return JSONResponse({"weights": state.stats()["weights"]})

    async def residency(request: Request) -> Response:
        state.set_residency(await _json_body(request, optional=True))
        return JSONResponse({"residency": state.residency()})

    async def reset(request: Request) -> Response:
        state.reset(weights=bool((await _json_body(request, optional=True)).get("weights")))
        return JSONResponse({"ok": True})

    async def bad_request(request: Request, exc: Exception) -> Response:
        openai = request.url.path.startswith("/v1/")
        return JSONResponse(_error_body(openai, 400, str(exc)), 400)

    async def release(request: Request) -> Response:
        held = list(state.held)
        for released in held:
            released.set()
        return JSONResponse({"released": len(held)})

    async def version(request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_VERSION})

    async def stats(request: Request) -> Response:
        return JSONResponse(state.stats())

    async def received(request: Request) -> Response:
        return JSONResponse({"received": [call._asdict() for call in state.calls()]})

    async def root(request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    post = ["POST"]
    routes = [
        Route("/", root),
        Route("/api/generate", completion("generate"), methods=post),
        Route("/api/chat", completion("chat"), methods=post),
        Route("/api/tags", tags),
        Route("/api/ps", ps),
        Route("/api/version", version),
        Route("/api/show", show, methods=post),
        Route("/api/embed", completion("embed"), methods=post),
        Route("/api/embeddings", completion("embeddings"), methods=post),
        Route("/v1/embeddings", completion("openai_embeddings"), methods=post),
        Route("/v1/chat/completions", completion("openai_chat"), methods=post),
        Route("/v1/completions", completion("openai_completion"), methods=post),
        Route("/v1/models", models),
        Route("/_emulator/behaviour", behaviour, methods=post),
        Route("/_emulator/weights", weights, methods=post),
        Route("/_emulator/residency", residency, methods=post),
        Route("/_emulator/reset", reset, methods=post),
        Route("/_emulator/release", release, methods=post),
        Route("/_emulator/stats", stats),
        Route("/_emulator/received", received),
    ]
    return Starlette(routes=routes, exception_handlers={BadRequest: bad_request})


class _NoDelayHTTP(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    # asyncio only sets TCP_NODELAY on accepted sockets whose listener was created with
    # proto=IPPROTO_TCP (true when uvicorn binds host/port itself, false for a socket made with
    # socket.socket() and passed in). uvicorn never sets it, so do it for every connection.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


class _Server(uvicorn.Server):
    def __init__(self, state: EmulatorState, host: str, port: int) -> None:
        config = uvicorn.Config(
            create_app(state),
            host=host,
            port=port,
            http=_NoDelayHTTP,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        logging.getLogger("uvicorn.error").addFilter(_QUIET_CUT)
        super().__init__(config)
        self.state = state
        self.ready = threading.Event()

    @property
    def port(self) -> int:
        return int(self.servers[0].sockets[0].getsockname()[1])

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.ready.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for gone in list(self.state.live):  # wake hanging requests: don't wait out the grace
            gone.set()
        await super().shutdown(sockets)


class OllamaEmulator:
    """Runs the emulator on a background thread; use as a context manager."""

    def __init__(
        self,
        models: Sequence[str] = DEFAULT_MODELS,
        *,
        tokens: int = 5,
        host: str = "127.0.0.1",
        port: int = 0,
        max_loaded_models: int = 0,
        load_delay_ms: float = 0,
        keep_alive_s: float = 300,
    ) -> None:
        self.state = EmulatorState(
            models,
            tokens,
            max_loaded_models=max_loaded_models,
            load_delay_ms=load_delay_ms,
            keep_alive_s=keep_alive_s,
        )
        self.host, self.port, self.url = host, port, ""
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        self._server = server = _Server(self.state, self.host, self.port)
        self._thread = threading.Thread(target=server.run, name="ollama-emulator", daemon=True)
        self._thread.start()
        while not server.ready.wait(0.01):
            if not self._thread.is_alive():
                raise RuntimeError(f"ollama emulator failed to start on {self.host}:{self.port}")
        self.port = server.port
        self.url = f"http://{self.host}:{self.port}"
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    def received(self, *paths: str) -> list[Received]:
        """The model calls received since reset, oldest first; only those to `paths` if any
        are given (e.g. "/api/generate", "/api/chat")."""
        return [call for call in self.state.calls() if not paths or call.path in paths]

    def set_behaviour(
        self,
        model: str = "*",
        mode: str = "ok",
        *,
        delay_ms: int = 0,
        token_delay_ms: int = 0,
        tokens: int | None = None,
        status: int = 500,
    ) -> None:
        fields = {"mode": mode, "delay_ms": delay_ms, "token_delay_ms": token_delay_ms}
        fields |= {"tokens": tokens, "status": status}
        self.state.set_behaviour(model, Behaviour.parse(fields))

    def set_weights(self, weights: Mapping[str, int]) -> None:
        self.state.set_weights(weights)

    def set_residency(
        self,
        *,
        max_loaded_models: int | None = None,
        load_delay_ms: float | None = None,
        keep_alive_s: float | None = None,
    ) -> None:
        """Change the given residency settings; the others stay."""
        fields = {
            "max_loaded_models": max_loaded_models,
            "load_delay_ms": load_delay_ms,
            "keep_alive_s": keep_alive_s,
        }
        self.state.set_residency({k: v for k, v in fields.items() if v is not None})

    def reset(self, *, weights: bool = False) -> None:
        """Counters, behaviours and residency (every model unloaded); weights if asked."""
        self.state.reset(weights=weights)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Ollama HTTP API emulator for tests/benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated")
    parser.add_argument("--tokens", type=int, default=5, help="tokens per answer")
    parser.add_argument(
        "--max-loaded-models", type=int, default=0, help="resident models at most (0: unlimited)"
    )
    parser.add_argument("--load-delay-ms", type=float, default=0, help="time to load a model")
    parser.add_argument(
        "--keep-alive-s", type=float, default=300, help="idle time before unload (<0: never)"
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        state = EmulatorState(
            models,
            args.tokens,
            max_loaded_models=args.max_loaded_models,
            load_delay_ms=args.load_delay_ms,
            keep_alive_s=args.keep_alive_s,
        )
    except BadRequest as exc:
        parser.error(str(exc))
    server = _Server(state, args.host, args.port)

    def announce() -> None:
        server.ready.wait()
        print(f"ollama-emulator listening on http://{args.host}:{server.port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run()


if __name__ == "__main__":
    main()
