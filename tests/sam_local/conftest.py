"""SAM's own emulator, for real: one Docker engine, one Lambda image, one set of services,
one build and one `sam local start-api` for the whole tier, plus a Docker-free runner on
the same DynamoDB Local, queues and Ollama emulator for the parity checks.

Everything started here is stopped here, also when a test fails: containers (sam removes
them on SIGTERM; any it leaves are removed by the ids it logged), the private dockerd and
its docker0 bridge (local/sam/docker_engine.py), DynamoDB Local. The tier ends by
checking that the machine's network settings are as they were.

Fixtures are package-scoped, not session-scoped: everything stops when the tier ends. The
parity runner polls the jobs queue of moto's server in this process, and moto's state is
global: left running, it took the unit tests' job messages from their own mock_aws queues.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from local.process import free_port
from local.sam import api, lambda_image
from local.sam.docker_engine import BRIDGE, Engine, acquire, bridge_in_use, release
from local.sam.wiring import Services, Wiring
from local.template import http_routes
from tests.sam_local.answers import Answer
from tests.support.hermes_process import HermesProcess
from tests.support.ollama_emulator import OllamaEmulator

# A short synchronous budget (API Gateway's is 29 s) so the 504 check takes seconds.
SYNC_BUDGET_MS = 5000
# Status probes on every call: the parity tests compare two instances' answers at one
# moment, and a cached probe (5 s by default) would answer an earlier one.
PARAMETERS = {"SyncBudgetMs": str(SYNC_BUDGET_MS), "StatusProbeIntervalS": "0"}
TIMINGS: dict[str, float] = {}  # printed at the end of the run


class timed:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, *_: object) -> None:
        TIMINGS[self.name] = time.monotonic() - self.started


# (what was asked, through which command, the runner's answer, sam's answer), for the summary.
PARITY: list[tuple[str, str, Answer, Answer]] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if PARITY:
        terminalreporter.write_sep("-", "sam_local parity: the runner's answer | sam's answer")
        for asked, via, runner, sam in PARITY:
            line = f"{asked:44} {via:18} {_brief(runner):34} {_brief(sam)}"
            terminalreporter.write_line(line.rstrip())
    if TIMINGS:
        terminalreporter.write_sep("-", "sam_local timings (s)")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{name:48} {seconds:7.1f}")


def _network_settings() -> dict[str, str]:
    """Every net.* sysctl except those of interfaces that come and go with containers."""
    found = {}
    for path in Path("/proc/sys/net").rglob("*"):
        parts = path.parts
        if any(p == BRIDGE or p.startswith("veth") for p in parts) or not path.is_file():
            continue
        try:
            found[str(path)] = path.read_text()
        except OSError:
            continue
    return found


@pytest.fixture(scope="package")
def machine_unchanged() -> Iterator[None]:
    """Torn down last: no network sysctl changed, and no bridge left that no engine uses
    (an engine left by a killed session, adopted by this one, takes its bridge with it)."""
    before = _network_settings()
    yield
    after = _network_settings()
    changed = {
        k: (before[k], after[k]) for k in before.keys() & after.keys() if before[k] != after[k]
    }
    # Counters and per-boot randomness move by themselves; settings do not.
    changed = {k: v for k, v in changed.items() if "/neigh/" not in k and "random" not in k}
    assert not changed, changed
    assert bridge_in_use(), f"{BRIDGE} left behind"


@pytest.fixture(scope="package")
def build(
    machine_unchanged: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Future[Path]]:
    """`sam build` needs none of the rest: it runs while the engine, the image and the
    servers start (the tests use the repository's models file)."""
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()

        def run() -> Path:
            path = api.build(build_dir=tmp_path_factory.mktemp("sam-local-build"))
            TIMINGS["sam build (cached; while the rest starts)"] = time.monotonic() - started
            return path

        yield pool.submit(run)


@pytest.fixture(scope="package")
def engine(machine_unchanged: None, build: Future[Path]) -> Iterator[Engine]:
    with timed("docker engine: start or reuse"):
        found = acquire()
    try:
        yield found
    finally:
        with timed("docker engine: stop (when this session was its last user)"):
            release(found)


@pytest.fixture(scope="package")
def image(engine: Engine) -> str | None:
    cached = lambda_image.tarball().exists()
    with timed(f"lambda image ({'cached tarball' if cached else 'built'}: import)"):
        return lambda_image.invoke_image(engine)


@pytest.fixture(scope="package")
def emulator(engine: Engine) -> Iterator[OllamaEmulator]:
    """The Ollama emulator on the bridge's gateway address, where containers reach it."""
    with OllamaEmulator(host=engine.gateway()) as emu:
        yield emu


@pytest.fixture(scope="package")
def wiring(engine: Engine, emulator: OllamaEmulator) -> Iterator[Wiring]:
    with Services(engine.gateway(), from_environment=False) as services:
        with timed("DynamoDB Local, SQS, tables and queues"):
            found = services.start(ollama=emulator.url)
        yield found


@pytest.fixture(scope="package")
def built(build: Future[Path], wiring: Wiring) -> Path:
    with timed("waiting for sam build"):
        return build.result()


@pytest.fixture(scope="package")
def sam_api(
    engine: Engine, image: str | None, wiring: Wiring, built: Path
) -> Iterator[api.StartApi]:
    server = api.StartApi(
        engine, wiring, image, port=free_port(), parameters=PARAMETERS, template=built
    )
    try:
        with timed("sam local start-api: listening (EAGER containers)"):
            server.start()
        with timed("first request to every function (in parallel)"):
            warm_up(server.url)
        warm_latencies(server.url)
        yield server
    finally:
        server.stop()
    running = engine.docker("ps", "-aq", "--no-trunc").split()
    assert not server.container_ids() & set(running), "sam left containers behind"


@pytest.fixture(scope="package")
def runner_env(wiring: Wiring, emulator: OllamaEmulator) -> dict[str, str]:
    """The Docker-free runner on the very store, queues and emulator the functions use."""
    return {
        "AWS_ENDPOINT_URL_DYNAMODB": wiring.host_dynamodb,
        "AWS_ENDPOINT_URL_SQS": wiring.host_sqs,
        "OLLAMA_URL": emulator.url,
        "HERMES_SYNC_BUDGET_MS": str(SYNC_BUDGET_MS),
        "HERMES_STATUS_PROBE_INTERVAL_S": "0",
    }


@pytest.fixture(scope="package")
def runner(runner_env: dict[str, str]) -> Iterator[HermesProcess]:
    with HermesProcess(runner_env) as process:
        yield process


@pytest.fixture(scope="package")
def runner_subprocess_env(runner_env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **runner_env}


def warm_up(url: str) -> None:
    """One request per function: the first invoke of a container starts its runtime, which
    the synchronous budget would count (it runs from the request's arrival, as on AWS)."""
    first = {}
    for route in http_routes():
        first.setdefault(route.function, route)

    def hit(route) -> None:  # type: ignore[no-untyped-def]
        path = re.sub(r"\{[^}]+\}", "warm-up", route.path)
        for _ in range(3):  # a cold start past a 10 s timeout gets sam's own 502: again
            answer = httpx.request(route.method, url + path, content=b"{}", timeout=120)
            if answer.status_code != 502 or "code" in answer.text:  # Hermes' own answer
                return

    with ThreadPoolExecutor(len(first)) as pool:
        list(pool.map(hit, first.values()))


def warm_latencies(url: str) -> None:
    """Median of 10 requests to a warm container, into the timings summary."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for method, path, body in (
            ("GET", "/v1/status", None),
            ("POST", "/v1/llm/gemma", {"prompt": "hi"}),
        ):
            seconds = []
            for _ in range(10):
                started = time.monotonic()
                client.request(method, path, json=body)
                seconds.append(time.monotonic() - started)
            TIMINGS[f"warm request {method} {path}: median (ms)"] = sorted(seconds)[5] * 1000


def _brief(answer: Answer) -> str:
    if answer.status is None:  # a direct or SQS answer: its code, else its keys
        keys = sorted(answer.body) if isinstance(answer.body, dict) else []
        shown = ",".join(keys) if len(keys) <= 3 else f"{','.join(keys[:2])},... {len(keys)} keys"
        return answer.code or f"{{{shown}}}"
    retry = dict(answer.headers).get("retry-after")
    words = [str(answer.status), answer.code, f"Retry-After {retry}" if retry else None]
    return " ".join(word for word in words if word)
