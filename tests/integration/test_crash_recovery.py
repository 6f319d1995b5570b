"""Liveness: a runner SIGKILLed while holding a slot (no finally, like a Lambda timeout)
leaves a lease that others take over once it expires, and not before."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx

from tests.support.hermes_process import HermesProcess
from tests.support.ollama_emulator import OllamaEmulator


def test_a_killed_holders_slot_is_taken_over_after_its_lease_expires(
    hermes_env: dict[str, str], emulator: OllamaEmulator
) -> None:
    emulator.set_behaviour(model="llama3:8b", mode="hang")
    with HermesProcess(hermes_env) as doomed, HermesProcess(hermes_env) as survivor:

        def hold_the_slot() -> None:
            with contextlib.suppress(httpx.TransportError):  # its server is about to die
                httpx.post(f"{doomed.url}/v1/llm/llama3", json={"prompt": "hi"}, timeout=30)

        holder = threading.Thread(target=hold_the_slot, daemon=True)
        granted_at = time.monotonic()
        holder.start()
        while emulator.stats()["in_flight"].get("llama3:8b", 0) < 1:
            time.sleep(0.01)
        doomed.kill()
        emulator.set_behaviour(model="llama3:8b", mode="ok")

        # Lease = llama3's 5 s timeout + 0.5 s margin. Before that: busy.
        status = httpx.get(f"{survivor.url}/v1/status", timeout=5).json()
        llama3 = next(m for m in status["models"] if m["name"] == "llama3")
        assert (llama3["in_flight"], status["hosts"][0]["memory_in_use"]) == (1, 4)
        busy = httpx.post(f"{survivor.url}/v1/llm/llama3", json={"prompt": "hi"}, timeout=10)
        assert (busy.status_code, busy.json()["code"]) == (429, "model_busy")
        assert time.monotonic() - granted_at < 5.0

        while True:
            response = httpx.post(
                f"{survivor.url}/v1/llm/llama3", json={"prompt": "hi"}, timeout=10
            )
            if response.status_code == 200:
                break
            assert response.status_code == 429
            assert time.monotonic() - granted_at < 15, "lease never expired"
            time.sleep(0.2)
        recovered_after = time.monotonic() - granted_at
        print(f"slot recovered {recovered_after:.2f} s after it was granted (lease 5.5 s)")
        assert recovered_after >= 5.0
        status = httpx.get(f"{survivor.url}/v1/status", timeout=5).json()
        assert status["hosts"][0]["memory_in_use"] == 0
