"""local/process.py: how the runner, the tests and the benchmark start, await and stop
their child processes (DynamoDB Local, the model server, runners, the emulator)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from local.process import ChildProcess, ProcessFailed, describe_exit


def python(code: str, log: Path | None = None) -> ChildProcess:
    return ChildProcess("the test child", [sys.executable, "-c", code], log=log).start()


def test_a_child_that_dies_while_awaited_fails_at_once_with_its_output(tmp_path: Path) -> None:
    child = python("print('cannot bind the port', flush=True); raise SystemExit(3)", tmp_path / "l")
    started = time.monotonic()
    with pytest.raises(ProcessFailed) as failed:
        child.wait_until(lambda: False, timeout_s=30)
    assert time.monotonic() - started < 10  # not the whole timeout
    message = str(failed.value)
    assert "the test child exited with status 3" in message
    assert "cannot bind the port" in message and str(tmp_path / "l") in message


def test_a_child_that_never_gets_ready_is_stopped_and_named() -> None:
    child = python("import time; time.sleep(60)")
    with pytest.raises(ProcessFailed, match=r"was not ready within 0\.5 s"):
        child.wait_until(lambda: 1 / 0, timeout_s=0.5)  # the probe's error is "not yet"
    assert child.returncode is not None


def test_stop_kills_a_child_that_ignores_sigterm() -> None:
    child = python(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    child.wait_until(lambda: "ready" in child.output(), timeout_s=10)
    child.stop(grace_s=0.5)
    assert child.returncode == -9


def test_exits_are_described_by_signal_name() -> None:
    assert describe_exit(-4) == "was killed by SIGILL"
    assert describe_exit(1) == "exited with status 1"
