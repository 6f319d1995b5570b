"""The Ollama emulator in its own process (as Ollama is), driven through its control API."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import httpx

from local.process import ChildProcess, free_port
from local.template import ROOT


class EmulatorProcess:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.child: ChildProcess | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.child.process if self.child is not None else None

    def __enter__(self) -> EmulatorProcess:
        command = [sys.executable, "-m", "tests.support.ollama_emulator", "--port", str(self.port)]
        child = self.child = ChildProcess("the Ollama emulator", command, cwd=ROOT).start()
        child.wait_until(lambda: "listening" in child.output(), timeout_s=30)  # its first line
        return self

    def __exit__(self, *_: object) -> None:
        if self.child is not None:
            self.child.kill()
            self.child.close()

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

    def release(self) -> int:
        """Let every request held by mode "hold" go on; how many there were."""
        return int(self.control("POST", "/_emulator/release")["released"])

    def reset(self) -> None:
        self.control("POST", "/_emulator/reset", {})
