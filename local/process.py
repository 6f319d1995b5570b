"""Child processes of the runner, the tests and the benchmark (DynamoDB Local, the embedded
model server, Hermes runners, the Ollama emulator), all handled one way:

- output goes to a log file, never to an unread pipe (a full pipe blocks the child on its
  next write), and its tail explains a process that died;
- the child dies with its parent (Linux PR_SET_PDEATHSIG), so a killed runner or test never
  leaves a JVM or a model server behind;
- waiting for readiness fails at once, with the log's tail, when the process exits;
- stopping is polite first (SIGTERM), then firm (SIGKILL).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the thread that started it dies, even by SIGKILL.
    (The parent *thread*: start children from a thread that outlives them.)"""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def describe_exit(returncode: int) -> str:
    """'exited with status 1', 'was killed by SIGILL'."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class ProcessFailed(RuntimeError):
    """The process exited, or did not get ready in time; the message ends with its log's tail."""


class ChildProcess:
    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        tied_to_parent: bool = True,
    ) -> None:
        """`name` says what it is in messages ("DynamoDB Local"); `log` is the file that
        receives stdout and stderr (a temporary file when None)."""
        self.name = name
        self.command = list(command)
        self.log = log
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.tied_to_parent = tied_to_parent
        self.process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    def start(self) -> ChildProcess:
        if self.log is None:
            self._output = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        else:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self._output = self.log.open("w+b")
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent if self.tied_to_parent else None,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs (or before it started)."""
        return self.process.poll() if self.process is not None else None

    def wait_until(
        self, ready: Callable[[], Any], timeout_s: float, interval_s: float = 0.1
    ) -> None:
        """Call `ready` until it returns something true. An exception from it counts as
        "not yet". Raises ProcessFailed when the process exits first or time runs out (and
        then stops it)."""
        deadline = time.monotonic() + timeout_s
        last = "no check finished"
        while True:
            if self.returncode is not None:
                raise ProcessFailed(f"{self.name} {describe_exit(self.returncode)}{self._tail()}")
            try:
                if ready():
                    return
                last = "not ready yet"
            except Exception as exc:  # any failure of a probe means "not yet"
                last = f"{type(exc).__name__}: {exc}"[:200]
            if time.monotonic() >= deadline:
                break
            time.sleep(interval_s)
        self.stop()
        raise ProcessFailed(
            f"{self.name} was not ready within {timeout_s:g} s (last check: {last}){self._tail()}"
        )

    def output(self) -> str:
        """Everything the process wrote so far."""
        if self._output is None:
            return ""
        # pread: the child shares the file offset, so never move it.
        fd = self._output.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output().rstrip().splitlines()[-lines:])

    def _tail(self) -> str:
        tail = self.tail()
        where = f" ({self.log})" if self.log else ""
        return f"; last output{where}:\n{tail}" if tail else f"; no output{where}"

    def kill(self) -> None:
        """SIGKILL: no cleanup in the child."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, grace_s: float = 10) -> None:
        """SIGTERM, up to `grace_s` to exit, then SIGKILL."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        """Stop it and let go of its log (a temporary log is gone then)."""
        self.stop()
        if self._output is not None:
            self._output.close()
            self._output = None
