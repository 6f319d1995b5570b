"""The Ollama emulator in its own process (as Ollama is), driven through its control API."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import httpx

from local.dynamodb_local import free_port
from local.template import ROOT


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

    def control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        # trust_env=False: a proxy configured in the shell must not see loopback traffic.
        with httpx.Client(base_url=self.url, timeout=10, trust_env=False) as client:
            response = client.request(method, path, json=body)
            response.raise_for_status()
            return response.json()

    def stats(self) -> dict[str, Any]:
        return self.control("GET", "/_emulator/stats")  # type: ignore[no-any-return]

    def set_behaviour(self, model: str = "*", mode: str = "ok", **fields: Any) -> None:
        self.control("POST", "/_emulator/behaviour", {"model": model, "mode": mode, **fields})

    def set_weights(self, weights: dict[str, int]) -> None:
        self.control("POST", "/_emulator/weights", weights)

    def reset(self) -> None:
        self.control("POST", "/_emulator/reset", {})
