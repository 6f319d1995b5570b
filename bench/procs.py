"""What the benchmark starts and stops, all on 127.0.0.1: the Ollama emulator process,
one shared DynamoDB Local, Hermes runner processes, and in-process Hermes services built
exactly as `hermes.service.get_service()` builds them."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx

from local.dynamodb_local import DynamoDBLocal
from local.process import ChildProcess
from local.template import ROOT
from tests.support.conflict_store import ConflictingDynamoDB
from tests.support.emulator_process import EmulatorProcess
from tests.support.hermes_process import HermesProcess

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


def write_models_file(directory: Path, name: str, config: dict[str, Any]) -> Path:
    path = directory / name
    path.write_text(json.dumps(config, indent=2))
    return path


class Infra:
    """Shared services, started on first use and stopped when the run ends."""

    def __init__(self, stack: ExitStack, output_dir: Path) -> None:
        self._stack = stack
        self.output_dir = output_dir  # where RESULTS.md and the plots go

    @cached_property
    def emulator(self) -> EmulatorProcess:
        print("  starting the Ollama emulator process", flush=True)
        return self._stack.enter_context(EmulatorProcess())

    @cached_property
    def dynamodb(self) -> DynamoDBLocal:
        print("  starting DynamoDB Local", flush=True)
        server = DynamoDBLocal().start()
        self._stack.callback(server.stop)
        server.create_tables()
        return server

    @cached_property
    def strict_dynamodb(self) -> ConflictingDynamoDB:
        """DynamoDB Local behind the conflict-faithful store (tests/support/conflict_store.py):
        overlapping transactions cancelled as on real DynamoDB. Sections that measure the
        limiter's own traffic run on it."""
        print("  starting the conflict-faithful store in front of DynamoDB Local", flush=True)
        return self._stack.enter_context(ConflictingDynamoDB(self.dynamodb.url))

    @cached_property
    def tmp(self) -> Path:
        return Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="hermes-bench-")))


class Runner(HermesProcess):
    """`python -m local.runner` in its own process: one stand-in Lambda instance, started as
    the tests start one, but with an environment that inherits nothing that would change
    what is measured. Its embedded DynamoDB Local dies with it (PR_SET_PDEATHSIG)."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env)
        self.env = clean_env(HOST="127.0.0.1", PORT=str(self.port), HERMES_ACCESS_LOG="0", **env)

    def launch(self) -> Runner:
        """Start the process without waiting for it. Call this from the main thread: the
        child dies with the thread that started it (PR_SET_PDEATHSIG, local/process.py)."""
        self.child = ChildProcess(
            "the Hermes runner", [sys.executable, "-m", "local.runner"], env=self.env, cwd=ROOT
        ).start()
        return self

    def ready(self, timeout_s: float = 90) -> Runner:
        """Wait until the runner answers /v1/status."""
        if self.child is None:
            raise RuntimeError("the runner was never launched")
        self.child.wait_until(self._answers, timeout_s)
        return self

    def start(self, timeout_s: float = 90) -> Runner:
        return self.launch().ready(timeout_s)

    @property
    def store(self) -> str:
        """The DynamoDB the runner says it uses (its startup banner)."""
        for line in self.read_output().splitlines():
            if line.strip().startswith("DynamoDB:"):
                return line.split(":", 1)[1].strip()
        return "unknown"

    def peak_rss_mb(self) -> float:
        assert self.process is not None
        return peak_rss_mb(self.process.pid)

    def __enter__(self) -> Runner:
        return self.start()


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


def build_service(ddb: Any, models_file: Path, ollama_url: str, usage: bool = False) -> Any:
    """A HermesService put together as get_service() does, on the given client and config;
    with `usage`, it writes usage rows to the template's UsageTable as get_service()'s does."""
    from hermes.backends.ollama import OllamaClient
    from hermes.config import get_settings
    from hermes.limiter import Limiter
    from hermes.service import HermesService
    from hermes.usage import Usage

    env = {"HERMES_MODELS_FILE": str(models_file), "OLLAMA_URL": ollama_url}
    with patched_env({**env, "HERMES_LEASE_TABLE": "LeaseTable"}):
        settings = get_settings.__wrapped__()  # bypass the per-process cache
    backends = {host: OllamaClient(settings.host_url(host)) for host in settings.hosts}
    limiter = Limiter(ddb, settings.lease_table)
    rows = Usage(limiter.table, settings.usage_table) if usage else None
    return HermesService(settings, limiter, backends, rows)
