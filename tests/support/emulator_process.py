"""The Ollama emulator in its own process (as Ollama is), driven through its control API.
One process is one emulated host: its residency settings are those of that host, and `kill()`
then `restart()` is the host dying mid-answer and coming back (on the same port, empty)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import httpx

from local.process import ChildProcess, free_port
from local.template import ROOT


class EmulatorProcess:
    def __init__(
        self,
        *,
        port: int | None = None,
        max_loaded_models: int = 0,
        load_delay_ms: float = 0,
        keep_alive_s: float = 300,
    ) -> None:
        """`port`: None picks a free one. The residency settings become the CLI flags (see
        tests.support.ollama_emulator); `set_residency` changes them while it runs, until a
        restart."""
        self.port = free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "tests.support.ollama_emulator"]
        self.command += ["--port", str(self.port)]
        self.command += ["--max-loaded-models", str(max_loaded_models)]
        self.command += ["--load-delay-ms", str(load_delay_ms)]
        self.command += ["--keep-alive-s", str(keep_alive_s)]
        self.child: ChildProcess | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.child.process if self.child is not None else None

    def start(self) -> EmulatorProcess:
        """Start it and wait until it listens."""
        child = self.child = ChildProcess("the Ollama emulator", self.command, cwd=ROOT).start()
        child.wait_until(lambda: "listening" in child.output(), timeout_s=30)  # its first line
        return self

    def kill(self) -> None:
        """SIGKILL: the host dies mid-answer (open connections are reset)."""
        if self.child is not None:
            self.child.kill()

    def restart(self) -> EmulatorProcess:
        """Start again (killed first if it still runs) on the same port with the same flags:
        nothing loaded, counters at zero."""
        if self.child is not None:
            self.child.kill()
            self.child.close()
        return self.start()

    def __enter__(self) -> EmulatorProcess:
        return self.start()

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

    def set_residency(self, **fields: Any) -> dict[str, Any]:
        """Any of max_loaded_models, load_delay_ms, keep_alive_s; answers the settings now."""
        return self.control("POST", "/_emulator/residency", fields)["residency"]  # type: ignore[no-any-return]

    def release(self) -> int:
        """Let every request held by mode "hold" go on; how many there were."""
        return int(self.control("POST", "/_emulator/release")["released"])

    def reset(self) -> None:
        """Counters and behaviours cleared, every model unloaded (see the emulator's reset)."""
        self.control("POST", "/_emulator/reset", {})
