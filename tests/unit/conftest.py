from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from tests.support.dynamodb_limits import ExpressionWatch
from tests.support.ollama_emulator import OllamaEmulator


@pytest.fixture(scope="session")
def emulator() -> Iterator[OllamaEmulator]:
    """One in-thread emulator for the unit tests; each test resets what it changes."""
    with OllamaEmulator() as emu:
        yield emu


@pytest.fixture
def dynamodb_limits() -> Iterator[ExpressionWatch]:
    """Checks every request of the DynamoDB clients it `watch`es against DynamoDB's documented
    limits (4 KB per expression, 2 MB of substitutions, 300 update operators, 100 keys per
    BatchGetItem), which moto and DynamoDB Local do not enforce. A request over a limit
    fails where it is made, and the test fails at teardown even if something caught it."""
    watch = ExpressionWatch()
    yield watch
    assert watch.found == [], watch.found


@pytest.fixture(autouse=True)
def _notices_polled_by_the_waiters(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto (in this process) is not thread-safe: the limiter's background notice poller
    would read it while a test writes. Waiters read their own notices here instead."""
    from hermes.limiter import Limiter

    monkeypatch.setattr(Limiter, "NOTICE_POLLER", False)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Hermes' log lines (powertools' JSON) while the test runs."""
    from hermes import observability

    stream = io.StringIO()
    old = observability.logger.registered_handler.setStream(stream)  # type: ignore[attr-defined]
    yield stream
    observability.logger.registered_handler.setStream(old)  # type: ignore[attr-defined]
