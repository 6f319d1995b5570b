"""Streamed answers and the slots behind them, over real sockets (issue 18, item 4f): a slow
reader cannot keep a backend call past its lease, and a client that leaves while its streamed
request waits frees its place and its slot at once."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from hermes.limiter import Limiter
from hermes.placement import host_pool
from hermes.service import LEASE_SAFETY_MS
from local.dynamodb_local import DynamoDBLocal
from tests.support.hermes_process import HermesProcess
from tests.support.ollama_emulator import OllamaEmulator
from tests.support.polling import wait_until

# A lease is the call's time plus the reserve (HERMES_LEASE_MARGIN_MS + LEASE_SAFETY_MS) that
# covers ending the call and releasing. What these tests prove is measured against the leases:
# whatever happens before a lease could have expired did not wait for it to expire. A margin
# of 2 s (the default is 5 s) leaves a loaded machine time to end and release a call, while
# the calls themselves are cut by the models' timeouts as before.
LEASE_MARGIN_MS = 2000
RESERVE_S = (LEASE_MARGIN_MS + LEASE_SAFETY_MS) / 1000
BRIEF_TIMEOUT_S = 1.5
SOLO_TIMEOUT_S = 10
SOLO_QUEUE_TIMEOUT_S = 8
MODELS = {
    "models": {
        # A short call: its lease ends long before the emulator's answer would.
        "brief": {
            "max_concurrency": 1,
            "memory_cost": "low",
            "timeout": int(BRIEF_TIMEOUT_S * 1000),
            "backend_model": "mistral:7b",
        },
        # One slot, and requests wait for it (far longer than the test needs).
        "solo": {
            "max_concurrency": 1,
            "memory_cost": "low",
            "timeout": SOLO_TIMEOUT_S * 1000,
            "queue_timeout_ms": SOLO_QUEUE_TIMEOUT_S * 1000,
            "backend_model": "llama3:8b",
        },
    }
}
# Large tokens, so that a reader who reads nothing fills the socket buffers within the lease.
WORD = "x" * 40_000


@pytest.fixture(scope="module")
def hermes(
    runner_env: dict[str, str],
    dynamodb_local: DynamoDBLocal,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HermesProcess]:
    dynamodb_local.reset_tables()
    models = tmp_path_factory.mktemp("streaming") / "models.json"
    models.write_text(json.dumps(MODELS))
    env = {
        **runner_env,
        "HERMES_MODELS_FILE": str(models),
        "HERMES_MAX_PROMPT_CHARS": "50000",
        "HERMES_LEASE_MARGIN_MS": str(LEASE_MARGIN_MS),
    }
    with HermesProcess(env) as process:
        yield process


@pytest.fixture(autouse=True)
def clean_emulator(emulator: OllamaEmulator) -> None:
    emulator.reset()


def send_request(url: str, path: str, body: object, *, rcvbuf: int | None = None) -> socket.socket:
    """An HTTP/1.1 request on a raw socket of our own, so the test decides when (and whether)
    the answer is read. `rcvbuf`: a tiny receive buffer makes a reader that reads nothing
    push back on the server at once."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: window
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect((parts.hostname, parts.port))
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def read_body(sock: socket.socket) -> bytes:
    """Everything until the server closes, de-chunked."""
    raw = bytearray()
    while block := sock.recv(1 << 20):
        raw += block
    sock.close()
    head, _, rest = bytes(raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    body = bytearray()
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return bytes(body)


def by(condition: Callable[[], bool], limit: float, what: str) -> float:
    """Poll `condition` until it holds, and fail naming `what` unless it held by `limit` (a
    time.monotonic() instant). Returns the instant it was seen to hold."""
    wait_until(condition, max(limit - time.monotonic(), 0) + 5, what, interval_s=0.05)
    seen = time.monotonic()
    assert seen < limit, f"{what}: only {seen - limit:.2f} s after the bound"
    return seen


def test_a_slow_reader_cannot_keep_the_backend_call_past_its_lease(
    hermes: HermesProcess, emulator: OllamaEmulator
) -> None:
    # Given an answer of 2,000 tokens of 40 KB (over 4 s), from a model whose calls get 1.5 s
    emulator.set_behaviour(model="mistral:7b", mode="ok", tokens=2000, token_delay_ms=2)
    body = {"model": "brief", "prompt": WORD, "stream": True}
    # When a client asks for it and then reads nothing
    sent = time.monotonic()  # before the lease was taken: it expires after sent + its length
    lease_ends = sent + BRIEF_TIMEOUT_S + RESERVE_S
    sock = send_request(hermes.url, "/api/generate", body, rcvbuf=4096)
    try:
        wait_until(lambda: emulator.stats()["requests"].get("mistral:7b") == 1, 30, "the call")
        # Then the backend call ended before its lease could have expired, while the client
        # still read nothing (a call that waited for the reader would go on for ever)
        ended = by(
            lambda: emulator.stats()["in_flight"]["mistral:7b"] == 0,
            lease_ends,
            "the backend call ended within its lease",
        )
        print(f"the backend call ended {ended - sent:.2f} s after the request was sent")
        # And its slot was released, not left to expire
        by(lambda: hermes.in_flight("brief") == 0, lease_ends, "brief's slot released")
        # And when the client finally reads, the stream ends with the timeout line
        lines = read_body(sock).splitlines()
    finally:
        sock.close()
    assert len(lines) > 1 and all(b'"response"' in line for line in lines[:-1])
    last = json.loads(lines[-1])
    assert last["code"] == "upstream_timeout" and "brief" in last["error"], last


def release(emulator: OllamaEmulator) -> None:
    """The held requests go on (the control API: the in-process emulator's own loop does it)."""
    httpx.post(f"{emulator.url}/_emulator/release", timeout=5).raise_for_status()


CLIENTS = {
    "ollama": ("/api/generate", {"model": "solo", "prompt": "hi", "stream": True}),
    "openai": (
        "/v1/chat/completions",
        {"model": "solo", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ),
}


@pytest.mark.parametrize("dialect", sorted(CLIENTS))
def test_a_streamed_request_whose_client_left_while_waiting_frees_its_place_and_slot(
    hermes: HermesProcess,
    emulator: OllamaEmulator,
    dynamodb_local: DynamoDBLocal,
    dialect: str,
    request: pytest.FixtureRequest,
) -> None:
    path, body = CLIENTS[dialect]
    limiter = Limiter(dynamodb_local.client(), "LeaseTable", notice_poller=False)
    pool = host_pool("default")
    # Given solo's one slot held by a streamed request whose backend holds its answer
    emulator.set_behaviour(model="llama3:8b", mode="hold")
    request.addfinalizer(lambda: release(emulator))  # never leave a held request behind
    first: list[bytes] = []
    holder = threading.Thread(
        target=lambda: first.append(read_body(send_request(hermes.url, path, body))), daemon=True
    )
    # Every lease of solo (the first's, and one handed to the second) is taken after this, so
    # none can expire before it + solo's lease length
    first_sent = time.monotonic()
    holder.start()
    wait_until(lambda: emulator.stats()["in_flight"]["llama3:8b"] == 1, 30, "solo's slot held")
    # And a second streamed request waiting for that slot
    waiter_sent = time.monotonic()  # its place lapses after waiter_sent + its queue timeout
    waiter = send_request(hermes.url, path, body)
    wait_until(lambda: limiter.waiting(pool) == 1, 30, "the second request waiting")

    # When the second client disconnects
    left = time.monotonic()
    waiter.close()

    # Then its place in the queue is given back before it could have lapsed
    freed = by(
        lambda: limiter.waiting(pool) == 0,
        waiter_sent + SOLO_QUEUE_TIMEOUT_S,
        "the place given back before its queue timeout",
    )
    print(f"the place was given back {freed - left:.2f} s after the client left")
    # And when the first request ends, the slot is free before any lease of solo could have
    # expired (not held until then)
    emulator.set_behaviour(model="llama3:8b", mode="ok")
    release(emulator)
    holder.join(30)
    assert first and first[0], "the first request did not complete"
    ended = time.monotonic()
    free = by(
        lambda: hermes.in_flight("solo") == 0,
        first_sent + SOLO_TIMEOUT_S + RESERVE_S,
        "solo's slot free before a lease of it could have expired",
    )
    print(f"the slot was free {free - ended:.2f} s after the first request ended")
    third = httpx.post(f"{hermes.url}/v1/llm/solo", json={"prompt": "hi"}, timeout=15)
    assert third.status_code == 200, third.text
    assert emulator.stats()["requests"]["llama3:8b"] == 2  # the second never reached Ollama
