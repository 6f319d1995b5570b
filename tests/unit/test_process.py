"""local/process.py: how the runner, the tests and the benchmark start, await and stop
their child processes (DynamoDB Local, the model server, runners, the emulator)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local.process import (
    ISOLATION_UNAVAILABLE,
    ChildProcess,
    ProcessFailed,
    describe_exit,
    free_port,
    loopback_only,
)
from tests.support.listening import (
    children,
    gone,
    interfaces,
    listening,
    non_loopback_addresses,
)


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


# -- loopback_only: a server no other machine can reach ------------------------------------------


RELAY_SCRIPT = Path(__file__).resolve().parents[2] / "local" / "process.py"


def answers(url: str) -> bool:
    return httpx.get(url, timeout=2).status_code == 200


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ChildProcess, int]]:
    """A Python HTTP server told to listen on every interface (0.0.0.0), run loopback_only;
    it serves tmp_path."""
    port = free_port()
    server = [sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0",
              "--directory", str(tmp_path)]  # fmt: skip
    child = ChildProcess("the test server", loopback_only(server, port)).start()
    child.wait_until(lambda: answers(f"http://127.0.0.1:{port}/"), timeout_s=20)
    yield child, port
    child.close()


def test_a_loopback_only_server_is_reachable_from_this_machine_only(
    served: tuple[ChildProcess, int],
) -> None:
    relay, port = served
    (server,) = children(relay.pid)
    # The server is in a network namespace of its own, whose one interface is loopback:
    assert os.readlink(f"/proc/{server}/ns/net") != os.readlink("/proc/self/ns/net")
    assert interfaces(server) == ["lo"]
    # ...where it listens on every interface, as told:
    assert listening({server}, namespace_of=server) == [("0.0.0.0", port)]
    # Here, only the relay listens, on 127.0.0.1:
    assert listening({relay.pid, server}) == [("127.0.0.1", port)]
    for address in non_loopback_addresses():
        with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
            pass


def test_the_relay_carries_large_answers_whole(
    served: tuple[ChildProcess, int], tmp_path: Path
) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    (tmp_path / "big").write_bytes(payload)
    _, port = served
    with httpx.Client(timeout=30) as client:
        for _ in range(2):  # the same connection twice (keep-alive through the relay)
            assert client.get(f"http://127.0.0.1:{port}/big").content == payload


def test_stopping_the_relay_stops_its_server_and_cleans_up(
    served: tuple[ChildProcess, int],
) -> None:
    relay, _ = served
    (server,) = children(relay.pid)
    workdir = os.readlink(f"/proc/{server}/cwd")
    assert Path(workdir).name.startswith("loopback-only-") and not os.listdir(workdir)
    relay.stop(grace_s=5)
    assert relay.returncode == 0  # asked to stop, not killed
    assert gone(server) and not Path(workdir).exists()


@pytest.mark.parametrize("signals", [1, 2])
def test_a_relay_told_to_stop_cleans_up_even_when_told_twice(signals: int) -> None:
    """A stop (SIGTERM) and the parent's death (SIGTERM again) may come one after the other;
    the relay kills its server and removes its directory all the same, even before its
    server listens."""
    script = "import time; print('up', flush=True); time.sleep(60)"  # never listens
    relay = ChildProcess(
        "the relay", loopback_only([sys.executable, "-c", script], free_port())
    ).start()
    relay.wait_until(lambda: "up" in relay.output(), timeout_s=20)
    (server,) = children(relay.pid)
    workdir = os.readlink(f"/proc/{server}/cwd")
    for _ in range(signals):
        os.kill(relay.pid, signal.SIGTERM)
    assert relay.process is not None
    assert relay.process.wait(timeout=10) == 0
    assert gone(server) and not Path(workdir).exists()


def test_the_server_dies_with_the_relay_and_the_relay_with_its_parent() -> None:
    port = free_port()
    parent = python(
        "import sys, time\n"
        "from local.process import ChildProcess, loopback_only\n"
        f"child = ChildProcess('relay', loopback_only([sys.executable, '-m', 'http.server', "
        f"'{port}'], {port})).start()\n"
        "print('relay', child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent.wait_until(lambda: "relay" in parent.output(), timeout_s=10)
    relay = int(parent.output().split()[1])
    deadline = time.monotonic() + 20
    while not children(relay) and time.monotonic() < deadline:
        time.sleep(0.05)
    (server,) = children(relay)
    parent.kill()
    assert gone(relay) and gone(server)


def test_a_server_that_exits_ends_the_relay_with_its_status() -> None:
    port = free_port()
    child = ChildProcess(
        "the relay", loopback_only([sys.executable, "-c", "raise SystemExit(7)"], port)
    ).start()
    with pytest.raises(ProcessFailed, match="exited with status 7"):
        child.wait_until(lambda: False, timeout_s=20)


def test_without_a_private_namespace_the_command_never_runs(tmp_path: Path) -> None:
    """Where unshare is refused (no root, no user namespaces), the relay refuses too: the
    server would listen on every interface."""
    marker = tmp_path / "ran"
    refusing = (
        "import errno, sys\n"
        f"sys.path.insert(0, {str(RELAY_SCRIPT.parent)!r})\n"
        "import process\n"
        "def refuse(flags):\n"
        "    raise OSError(errno.EPERM, 'Operation not permitted')\n"
        "process._unshare = refuse\n"
        f"sys.exit(process._loopback_only_main(['{free_port()}', '--', 'touch', '{marker}']))\n"
    )
    child = python(refusing)
    with pytest.raises(ProcessFailed) as failed:
        child.wait_until(lambda: False, timeout_s=20)
    assert child.returncode == ISOLATION_UNAVAILABLE
    message = str(failed.value)
    assert "cannot run touch in a private network namespace" in message
    assert "Operation not permitted" in message
    assert not marker.exists()


@pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root to become nobody"
)
def test_a_user_without_root_gets_the_namespace_through_a_user_namespace() -> None:
    port = free_port()
    # The system's Python: nobody may not read the virtualenv's.
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None:
        pytest.skip("no /usr/bin/python3")
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", system_python,
               "-P", str(RELAY_SCRIPT), "loopback-only", str(port), "--", system_python, "-m",
               "http.server", str(port), "--bind", "0.0.0.0", "--directory", "/"]  # fmt: skip
    child = ChildProcess("the relay as nobody", command).start()
    try:
        child.wait_until(lambda: answers(f"http://127.0.0.1:{port}/"), timeout_s=20)
        relay = child.pid  # setpriv execs the relay
        (server,) = children(relay)
        assert os.readlink(f"/proc/{server}/ns/user") != os.readlink("/proc/self/ns/user")
        assert listening({relay, server}) == [("127.0.0.1", port)]
    finally:
        child.close()
