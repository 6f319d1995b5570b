"""/v1/status answers within ~2 s even when Ollama accepts connections and never answers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.unit.test_handlers import LambdaContext, event, load_function


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts and then says nothing, like a wedged Ollama."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def test_status_stays_fast_when_ollama_hangs(
    aws: None, silent_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_URL", silent_server)
    started = time.monotonic()
    response = load_function("status").handler(event("status.json"), LambdaContext())
    elapsed = time.monotonic() - started
    body = json.loads(response["body"])
    assert (response["statusCode"], body["status"], body["checks"]["ollama"]["status"]) == (
        503,
        "degraded",
        "error",
    )
    assert body["checks"]["dynamodb"]["status"] == "ok"
    assert elapsed < 5, elapsed  # probes stop at 1.5 s; a wedged Ollama must not hold it
