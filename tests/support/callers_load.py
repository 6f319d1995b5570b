"""Load from named callers against runners that take HERMES_API_KEYS (tests/integration/
test_callers.py, bench/fair_share.py): each caller sends its own key."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.support.hermes_process import HermesProcess

CALLERS = ("flood", "other", "budget", "heavy", "light")
KEYS = {caller: f"key-{caller}" for caller in CALLERS}
API_KEYS = ",".join(f"{caller}:{key}" for caller, key in KEYS.items())  # HERMES_API_KEYS


def ask(runner: HermesProcess, caller: str, path: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS[caller]}"}
    return httpx.post(f"{runner.url}{path}", json=body, headers=headers, timeout=60)


def usage_rows(runner: HermesProcess, caller: str, **query: str) -> list[dict[str, Any]]:
    """GET /v1/usage as `caller`: its rows (an admin's: everyone's)."""
    headers = {"Authorization": f"Bearer {KEYS[caller]}"}
    answer = httpx.get(f"{runner.url}/v1/usage", params=query, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    rows: list[dict[str, Any]] = answer.json()["usage"]
    return rows


def closed_loop(
    runners: list[HermesProcess],
    caller: str,
    clients: int,
    until: float,
    starts: list[float] | None = None,
) -> list[tuple[float, float]]:
    """`clients` clients of `caller`, each sending its next request when its answer comes,
    spread over the runners, until `until` (time.monotonic()); every answer must be a 200.
    `starts`: each client's first request that many seconds from now. Each request as
    (sent, answered)."""
    done: list[tuple[float, float]] = []
    began = time.monotonic()

    def client(number: int) -> None:
        runner = runners[number % len(runners)]
        time.sleep(max(0.0, began + (starts[number] if starts else 0.0) - time.monotonic()))
        while time.monotonic() < until:
            sent = time.monotonic()
            answer = ask(runner, caller, "/v1/llm/gemma", {"prompt": "hi"})
            assert answer.status_code == 200, answer.text
            done.append((sent, time.monotonic()))

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client, i) for i in range(clients)]:
            future.result()
    return done
