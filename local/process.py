"""Child processes of the runner, the tests and the benchmark (DynamoDB Local, the embedded
model server, Hermes runners, the Ollama emulator), all handled one way:

- output goes to a log file, never to an unread pipe (a full pipe blocks the child on its
  next write), and its tail explains a process that died;
- the child dies with its parent (Linux PR_SET_PDEATHSIG), so a killed runner or test never
  leaves a JVM or a model server behind;
- waiting for readiness fails at once, with the log's tail, when the process exits;
- stopping is polite first (SIGTERM), then firm (SIGKILL).

And one for a server that cannot be told where to listen (DynamoDB Local listens on every
interface): `loopback_only` runs it in a network namespace of its own whose one interface is
loopback, reached through a relay on this machine's 127.0.0.1 only (run as a script: `python
-P local/process.py loopback-only PORT -- COMMAND...`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
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


# ---------------------------------------------------------------------------------------------
# A server reachable from this machine only.

# The relay's exit status when no private network namespace can be had (EX_CONFIG).
ISOLATION_UNAVAILABLE = 78
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000


class IsolationUnavailable(ProcessFailed):
    """Neither unshare(CLONE_NEWNET) nor a user namespace with one is permitted here."""


def loopback_only(command: Sequence[str], port: int) -> list[str]:
    """The command line that runs `command` in a network namespace of its own, with only a
    loopback interface: whatever it listens on, on whichever interface, no other machine can
    reach. Its one way in is a relay listening on 127.0.0.1:`port` of this machine (and
    forwarding to 127.0.0.1:`port` inside), which starts accepting once the server does.
    The relay runs `command` in an empty temporary directory (removed when it exits), kills it
    when told to stop (SIGTERM) and exits with its status when it exits; the command dies with
    the relay (SIGKILL), the relay with its parent when started by ChildProcess. Root may
    create the namespace; anyone else gets it through a user namespace when the kernel allows
    them; else the relay exits with ISOLATION_UNAVAILABLE without running `command`."""
    # -P: not local/ first on sys.path (this file runs as a script: the stdlib only, no
    # import of the `local` package, ~50 ms).
    return [sys.executable, "-P", str(Path(__file__).resolve()), "loopback-only", str(port),
            "--", *command]  # fmt: skip


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _private_network() -> None:
    """Move this process (single-threaded still) into a new network namespace with loopback up."""
    try:
        _unshare(_CLONE_NEWNET)
    except OSError as exc:
        if exc.errno != errno.EPERM:
            raise
        # Not root: a user namespace of our own may own the network namespace.
        uid, gid = os.getuid(), os.getgid()
        _unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
        for name, line in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):  # fmt: skip
            with contextlib.suppress(OSError), open(f"/proc/self/{name}", "w") as file:
                file.write(line)
    import fcntl
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)  # struct ifreq: name, flags
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))


def _killed_with_parent() -> None:
    """preexec_fn: SIGKILL when the relay dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _loopback_only_main(argv: list[str]) -> int:
    if len(argv) < 3 or not argv[0].isdigit() or argv[1] != "--":
        print("usage: process.py loopback-only PORT -- COMMAND...", file=sys.stderr)
        return 2
    port, command = int(argv[0]), argv[2:]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Bound now (in this machine's namespace: a socket keeps the one it was made in), listening
    # only once the server answers inside: until then a client is refused, as by a server
    # that is not up yet.
    listener.bind(("127.0.0.1", port))
    try:
        _private_network()
    except OSError as exc:
        print(
            f"cannot run {Path(command[0]).name} in a private network namespace "
            f"(unshare: {exc.strerror}), so it does not start: it would listen on every "
            "interface; run as root or allow user namespaces (sysctl "
            "kernel.unprivileged_userns_clone=1, user.max_user_namespaces)",
            flush=True,
        )
        return ISOLATION_UNAVAILABLE
    # Told to stop before the relay's loop handles it (or once it is over): clean up all the
    # same, and a second signal (a stop, then the parent's death) does not interrupt that.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _stop_now)
    workdir = ""
    try:
        workdir = tempfile.mkdtemp(prefix="loopback-only-")
        child = subprocess.Popen(
            command, cwd=workdir, stdin=subprocess.DEVNULL, preexec_fn=_killed_with_parent
        )
        try:
            return asyncio.run(_relay(listener, port, child))
        finally:
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
            if child.poll() is None:
                child.kill()
            child.wait()
    except SystemExit:
        return 0
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _stop_now(signum: int, frame: object) -> None:
    for stop in _STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    raise SystemExit(0)


async def _relay(listener: socket.socket, port: int, child: subprocess.Popen[bytes]) -> int:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, finish)
    exited = os.pidfd_open(child.pid)  # readable once the child has exited
    loop.add_reader(exited, finish)
    try:
        while not done.done():  # until the server accepts inside
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.wait([done], timeout=0.05)
        if done.done():
            return _status(child)
        server = await loop.create_server(lambda: _Inbound(port), sock=listener, backlog=1024)
        await done
        server.close()
        return _status(child)
    finally:
        loop.remove_reader(exited)
        os.close(exited)


def _status(child: subprocess.Popen[bytes]) -> int:
    """The child's exit status as the relay's (128 + signal when killed); 0 when asked to stop."""
    code = child.poll()
    if code is None:
        return 0
    return 128 - code if code < 0 else code


class _Half(asyncio.Protocol):
    """One side of a relayed connection: what it receives, the other side sends on."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Half | None = None
        self.ended = False  # its peer sent EOF
        self.early: list[bytes] = []  # received before the other side was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        self.ended = True
        self.pass_eof()
        return True

    def pass_eof(self) -> None:
        """A half-close passes on as one; both ended: the connection is over."""
        other = self.other
        if other is not None and other.transport is not None:
            if other.ended or not other.transport.can_write_eof():
                self.close()
            else:
                other.transport.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        for half in (self, self.other):
            if half is not None and half.transport is not None:
                half.transport.close()

    # Flow control: a side that cannot send fast enough stops the other from reading.
    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class _Inbound(_Half):
    """A client on this machine's loopback; its other side connects inside."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # What arrives meanwhile waits in `early` (pause_reading() here is lost on Python
        # 3.11.2's transports, which start reading after connection_made).
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        outbound = _Half()
        outbound.other = self
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: outbound, "127.0.0.1", self.port
            )
        except OSError:
            self.transport.close()
            return
        assert outbound.transport is not None
        self.other = outbound
        if self.transport.is_closing():
            self.close()
            return
        outbound.transport.writelines(self.early)
        self.early.clear()
        if self.ended:
            self.pass_eof()


if __name__ == "__main__":
    if sys.argv[1:2] == ["loopback-only"]:
        sys.exit(_loopback_only_main(sys.argv[2:]))
    sys.exit("usage: process.py loopback-only PORT -- COMMAND...")
