"""The Ollama emulator in its own process (as Ollama is), driven through its control API."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import httpx

from local.template import ROOT
from tests.support.dynamodb_local import free_port


class EmulatorProcess:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> EmulatorProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.ollama_emulator", "--port", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # printed once it listens
        assert "listening" in line, line
        # Keep draining: a full pipe would block the emulator on its next print.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_emulator/stats", timeout=5).json()  # type: ignore[no-any-return]

    def set_behaviour(self, model: str = "*", mode: str = "ok", **fields: Any) -> None:
        body = {"model": model, "mode": mode, **fields}
        httpx.post(f"{self.url}/_emulator/behaviour", json=body, timeout=5).raise_for_status()

    def set_weights(self, weights: dict[str, int]) -> None:
        httpx.post(f"{self.url}/_emulator/weights", json=weights, timeout=5).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_emulator/reset", json={}, timeout=5).raise_for_status()
