"""A Hermes local runner in its own process, standing in for one Lambda instance."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from local.dynamodb_local import free_port
from local.template import ROOT


class HermesProcess:
    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PORT": str(self.port), "HERMES_ACCESS_LOG": "0", **env}
        self.process: subprocess.Popen[str] | None = None
        # A file, not a pipe: nobody reads while it runs, and a full pipe (64 KB of request
        # log lines) would block the runner on its next print.
        self.output = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the runner

    def start(self, timeout_s: float = 30) -> HermesProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "local.runner"],
            cwd=ROOT,
            env=self.env,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"runner exited: {self.read_output()}")
            try:
                key = self.env.get("HERMES_API_KEY")
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                status = httpx.get(f"{self.url}/v1/status", headers=headers, timeout=5)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            # Only Hermes' own status counts (another server may hold the port).
            if "checks" in status.json() and self.process.poll() is None:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("runner did not start in time")

    def kill(self) -> None:
        """SIGKILL: no finally, no release, exactly like a Lambda that timed out."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> str:
        if self.process is None:
            return ""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.read_output()

    def read_output(self) -> str:
        self.output.seek(0)
        return self.output.read()

    def __enter__(self) -> HermesProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
