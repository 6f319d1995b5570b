"""What the benchmark starts and stops, all on 127.0.0.1: the Ollama emulator process,
one shared DynamoDB Local, Hermes runner processes, and in-process Hermes services built
exactly as `hermes.service.get_service()` builds them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx

from local.dynamodb_local import DynamoDBLocal, free_port
from local.template import ROOT
from tests.support.emulator_process import EmulatorProcess

# DynamoDB Local ignores credentials, but the SDK wants some.
AWS_ENV = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
}
# Variables a runner must not inherit from the shell: they would change what is measured
# (another store, another models file) or send loopback traffic through a proxy.
_NOT_INHERITED = ("AWS_ENDPOINT_URL", "HERMES_", "OLLAMA_", "POWERTOOLS_")
_PROXIES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without what would change the measurement, plus
    `overrides`: the environment of every child process the benchmark starts."""
    inherited = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_NOT_INHERITED) and k.lower() not in _PROXIES
    }
    return {**inherited, **overrides}


def http_client(**kwargs: Any) -> httpx.Client:
    """A keep-alive client that ignores proxy settings: every call stays on loopback."""
    return httpx.Client(trust_env=False, **kwargs)


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size since it started."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/<pid>/stat), which tells
    a process apart from a later one that reuses its pid; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def child_processes(pid: int) -> list[tuple[int, str]]:
    """The direct children of `pid` as (pid, start time), from /proc/<pid>/task/*/children."""
    found: list[tuple[int, str]] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in map(int, children.read_text().split()):
                started = _start_time(child)
                if started is not None:
                    found.append((child, started))
    return found


def kill_if_same(pid: int, started: str) -> None:
    if _start_time(pid) == started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def write_models_file(directory: Path, name: str, config: dict[str, Any]) -> Path:
    path = directory / name
    path.write_text(json.dumps(config, indent=2))
    return path


class Emulator(EmulatorProcess):
    """The tests' emulator process, with a proxy-free control client."""

    def control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with http_client(base_url=self.url, timeout=10) as client:
            response = client.request(method, path, json=body)
            response.raise_for_status()
            return response.json()

    def stats(self) -> dict[str, Any]:
        return self.control("GET", "/_emulator/stats")  # type: ignore[no-any-return]

    def reset(self) -> None:
        self.control("POST", "/_emulator/reset", {})

    def delay(self, tag: str, delay_ms: int) -> None:
        self.control(
            "POST", "/_emulator/behaviour", {"model": tag, "mode": "ok", "delay_ms": delay_ms}
        )


class Infra:
    """Shared services, started on first use and stopped when the run ends."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack

    @cached_property
    def emulator(self) -> Emulator:
        print("  starting the Ollama emulator process", flush=True)
        return self._stack.enter_context(Emulator())

    @cached_property
    def dynamodb(self) -> DynamoDBLocal:
        print("  starting DynamoDB Local", flush=True)
        server = DynamoDBLocal().start()
        self._stack.callback(server.stop)
        server.create_tables()
        return server

    @cached_property
    def tmp(self) -> Path:
        return Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="hermes-bench-")))


class Runner:
    """`python -m local.runner` in its own process: one stand-in Lambda instance.

    Its output goes to a temporary file, not a pipe, so a chatty runner can never block."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = clean_env(HOST="127.0.0.1", PORT=str(self.port), HERMES_ACCESS_LOG="0", **env)
        self.process: subprocess.Popen[str] | None = None
        # Kept open for the runner's lifetime (closed in stop), so no `with` block.
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115

    def start(self, timeout_s: float = 90) -> Runner:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "local.runner"],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout_s
        with http_client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"runner exited at start:\n{self.output()}")
                with contextlib.suppress(httpx.TransportError):
                    client.get(f"{self.url}/v1/status")
                    return self
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"runner did not start within {timeout_s:g} s:\n{self.output()}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read()

    @property
    def store(self) -> str:
        """The DynamoDB the runner says it uses (its startup banner)."""
        for line in self.output().splitlines():
            if line.strip().startswith("DynamoDB:"):
                return line.split(":", 1)[1].strip()
        return "unknown"

    def peak_rss_mb(self) -> float:
        assert self.process is not None
        return peak_rss_mb(self.process.pid)

    def stop(self) -> None:
        """Stop the runner as Ctrl-C does. Not SIGTERM: uvicorn re-raises a captured SIGTERM
        once it has shut down, which kills the process before atexit stops the DynamoDB Local
        it embedded; a re-raised SIGINT becomes KeyboardInterrupt and atexit does run. Any
        child still alive afterwards (started by this runner) is killed by its pid."""
        if self.process is not None and self.process.poll() is None:
            children = child_processes(self.process.pid)
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            for pid, started in children:
                kill_if_same(pid, started)
        self._log.close()

    def __enter__(self) -> Runner:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


@contextlib.contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block (this process only)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def quiet_in_process_hermes() -> None:
    """The services this process builds (sections 1 and 3) would log a line per request,
    burying the figures. Child processes do not inherit this (clean_env drops POWERTOOLS_*):
    they run as configured."""
    os.environ["POWERTOOLS_METRICS_DISABLED"] = "true"
    os.environ["POWERTOOLS_LOG_LEVEL"] = "WARNING"


@contextlib.contextmanager
def muted_stdout() -> Iterator[None]:
    """For in-process service calls: hermes.observability's EMF metric lines are print()ed
    by powertools' single_metric, which ignores POWERTOOLS_METRICS_DISABLED."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def dynamodb_client(endpoint_url: str) -> Any:
    """A fresh DynamoDB client made by Hermes' own factory (same botocore Config as the
    service), pointed at `endpoint_url` the way Lambda code is: through the environment."""
    from hermes import aws

    with patched_env({**AWS_ENV, "AWS_ENDPOINT_URL_DYNAMODB": endpoint_url}):
        return aws.client.__wrapped__("dynamodb")  # bypass the per-process cache


def build_service(ddb: Any, models_file: Path, ollama_url: str) -> Any:
    """A HermesService put together as get_service() does, on the given client and config."""
    from hermes.backend import OllamaClient
    from hermes.config import get_settings
    from hermes.limiter import Limiter
    from hermes.service import HermesService

    env = {"HERMES_MODELS_FILE": str(models_file), "OLLAMA_URL": ollama_url}
    with patched_env({**env, "HERMES_LEASE_TABLE": "LeaseTable"}):
        settings = get_settings.__wrapped__()  # bypass the per-process cache
    backends = {host: OllamaClient(settings.host_url(host)) for host in settings.hosts}
    return HermesService(settings, Limiter(ddb, settings.lease_table), backends)
