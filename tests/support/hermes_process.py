"""A Hermes local runner in its own process, standing in for one Lambda instance."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from local.process import ChildProcess, free_port
from local.template import ROOT


class HermesProcess:
    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PORT": str(self.port), "HERMES_ACCESS_LOG": "0", **env}
        self.child: ChildProcess | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.child.process if self.child is not None else None

    def start(self, timeout_s: float = 30) -> HermesProcess:
        # Its output goes to a temporary file: read_output() shows it.
        self.child = ChildProcess(
            "the Hermes runner", [sys.executable, "-m", "local.runner"], env=self.env, cwd=ROOT
        ).start()
        self.child.wait_until(self._answers, timeout_s)
        return self

    def _answers(self) -> bool:
        # Any key the runner takes: HERMES_API_KEY, else the first of HERMES_API_KEYS.
        keys = self.env.get("HERMES_API_KEYS", "").split(",")[0].partition(":")[2]
        key = self.env.get("HERMES_API_KEY") or keys
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        status = httpx.get(f"{self.url}/v1/status", headers=headers, timeout=5)
        # Only Hermes' own status counts (another server may hold the port).
        return (
            "checks" in status.json() and self.child is not None and self.child.returncode is None
        )

    def in_flight(self, model: str) -> int:
        """Slots of `model` held across every instance, as this runner's /v1/status says."""
        status = httpx.get(f"{self.url}/v1/status", timeout=10, trust_env=False).json()
        return int(next(m["in_flight"] for m in status["models"] if m["name"] == model))

    def kill(self) -> None:
        """SIGKILL: no finally, no release, exactly like a Lambda that timed out."""
        if self.child is not None:
            self.child.kill()

    def stop(self) -> str:
        if self.child is None:
            return ""
        self.child.stop()
        return self.read_output()

    def read_output(self) -> str:
        return self.child.output() if self.child is not None else ""

    def __enter__(self) -> HermesProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
