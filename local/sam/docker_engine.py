"""A Docker engine for SAM's emulator: the one already running, else a private dockerd.

Our machines run no Docker engine. Debian's `docker.io` installs one, but the packaged
service would keep state in /var/lib/docker, write iptables NAT rules and turn on
ip_forward for the whole machine. The private engine keeps everything under a temp dir
(--data-root, --exec-root, its own socket and pidfile) and changes no sysctl and no
iptables rule (--iptables=false --ip-forward=false). It keeps the default bridge: SAM
publishes each container's port 8080 on 127.0.0.1 (docker-proxy does that without
iptables), and containers reach the host at the bridge's gateway (172.17.0.1).

The docker0 bridge is machine-wide, so two private engines at once would both claim it.
Every user (`make sam-api`, a test session) therefore registers in one state file under a
lock: the first starts the engine, later ones share it, the last one stops it and deletes
docker0 if the engine created it. An engine left by a killed user is adopted by the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

STATE_DIR = Path(tempfile.gettempdir()) / "hermes-sam-docker"
# The engine's images and containers (a few hundred MB) live in RAM when there is room:
# deleting them from our disks (ext4 with online discard) takes minutes, from tmpfs no time.
SHM = Path("/dev/shm")  # noqa: S108 - a private mkdtemp inside it
DEFAULT_SOCKET = "/var/run/docker.sock"
BRIDGE = "docker0"


@dataclass
class Engine:
    host: str  # DOCKER_HOST for docker and SAM, e.g. unix:///tmp/.../docker.sock
    private: bool  # ours (registered in the state file) rather than the machine's own

    def env(self) -> dict[str, str]:
        return {"DOCKER_HOST": self.host}

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        result = subprocess.run(
            ["docker", *args],
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout.strip()

    def gateway(self) -> str:
        """The host's address as containers on the default bridge see it."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            found = self.docker(
                "network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}"
            )
            if found:
                return found
        return "172.17.0.1"


def apt_install(*packages: str) -> None:
    """Debian packages, as the Makefile installs Java: only as root, only when missing."""
    if os.geteuid() != 0:
        raise RuntimeError(
            f"{', '.join(packages)} missing: run as root, or `apt-get install {' '.join(packages)}`"
        )
    print(f"installing {' '.join(packages)} (apt)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        env=env,
        check=True,
    )


def ensure_docker_installed() -> None:
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        apt_install("docker.io")


def answers(host: str) -> bool:
    """Does a Docker engine answer at this DOCKER_HOST?"""
    if host.startswith("unix://"):
        path = host.removeprefix("unix://")
        if not os.path.exists(path):
            return False
        transport = httpx.HTTPTransport(uds=path)
        with contextlib.suppress(httpx.HTTPError), httpx.Client(transport=transport) as client:
            return client.get("http://docker/_ping", timeout=3).text == "OK"
        return False
    result = subprocess.run(
        ["docker", "-H", host, "version"], capture_output=True, timeout=15, check=False
    )
    return result.returncode == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return True


def _bridge_exists() -> bool:
    return Path(f"/sys/class/net/{BRIDGE}").exists()


@contextlib.contextmanager
def _locked_state() -> Iterator[dict]:  # type: ignore[type-arg]
    """The shared engine's state (pid, socket, users...), read and written under a lock."""
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = STATE_DIR / "state.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        yield state
        if state:
            path.write_text(json.dumps(state))
        else:
            path.unlink(missing_ok=True)


def acquire() -> Engine:
    """The engine to use: DOCKER_HOST's or the system's when one answers, else the shared
    private engine (started now if nobody runs it)."""
    for host in filter(None, [os.environ.get("DOCKER_HOST"), f"unix://{DEFAULT_SOCKET}"]):
        if answers(host):
            return Engine(host, private=False)
    with _locked_state() as state:
        if state and _alive(state["pid"]) and answers(state["host"]):
            state["users"] = [p for p in state["users"] if _alive(p)] + [os.getpid()]
            print(f"sharing the private Docker engine (dockerd pid {state['pid']})", flush=True)
            return Engine(state["host"], private=True)
        if state:  # its dockerd died with its users: clear what it left
            _clean_up(state)
            state.clear()
        ensure_docker_installed()
        state.update(_start_dockerd())
        state["users"] = [os.getpid()]
        return Engine(state["host"], private=True)


def release(engine: Engine) -> None:
    """Unregister; the last user stops the private engine. The machine's engine is left be."""
    if not engine.private:
        return
    with _locked_state() as state:
        if not state or state["host"] != engine.host:
            return
        state["users"] = [p for p in state["users"] if p != os.getpid() and _alive(p)]
        if not state["users"]:
            _stop_dockerd(state)
            _clean_up(state)
            state.clear()


def bridge_in_use() -> bool:
    """Whether a running engine accounts for the docker0 bridge (when there is one)."""
    if not _bridge_exists():
        return True
    with _locked_state() as state:
        if state and _alive(state["pid"]):
            return True
    return any(
        answers(h)
        for h in filter(None, [os.environ.get("DOCKER_HOST"), f"unix://{DEFAULT_SOCKET}"])
    )


@contextlib.contextmanager
def docker_engine() -> Iterator[Engine]:
    engine = acquire()
    try:
        yield engine
    finally:
        release(engine)


def _engine_parent() -> Path:
    with contextlib.suppress(OSError):
        stats = os.statvfs(SHM)
        if stats.f_bavail * stats.f_frsize > 4e9:
            return SHM
    return STATE_DIR


def _start_dockerd() -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="hermes-sam-engine-", dir=_engine_parent()))
    socket = root / "docker.sock"
    bridge_existed = _bridge_exists()
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 - handed to the daemon
    command = [
        "dockerd",
        "--data-root", str(root / "data"),
        "--exec-root", str(root / "exec"),
        "-H", f"unix://{socket}",
        "--pidfile", str(root / "docker.pid"),
        # No NAT rules, no ip_forward: containers only talk to the host over the bridge.
        "--iptables=false",
        "--ip-forward=false",
        "--shutdown-timeout", "5",
    ]  # fmt: skip
    print(f"starting a private Docker engine (state in {root})", flush=True)
    # Its own session: a Ctrl-C meant for SAM must not take the engine down under it.
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    state: dict[str, object] = {
        "pid": process.pid,
        "host": f"unix://{socket}",
        "root": str(root),
        "created_bridge": not bridge_existed,
    }
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _clean_up(state)
            raise RuntimeError(f"dockerd exited at start:\n{_tail(root / 'dockerd.log')}")
        if answers(f"unix://{socket}"):
            return state
        time.sleep(0.2)
    _stop_dockerd(state)
    _clean_up(state)
    raise RuntimeError("dockerd did not answer within 60 s")


def _stop_dockerd(state: dict) -> None:  # type: ignore[type-arg]
    pid = int(state["pid"])
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)  # dockerd stops its containers and its containerd
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # reap it when it is our child


def _clean_up(state: dict) -> None:  # type: ignore[type-arg]
    """What a stopped engine may leave: processes and mounts under its root (a killed
    dockerd's containerd and shims), the root itself, and the bridge if it made it."""
    root = str(state["root"])
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if root in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
    mounts = [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(root)
    ]
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)
    if state.get("created_bridge") and _bridge_exists():
        subprocess.run(["ip", "link", "delete", BRIDGE], check=False, capture_output=True)


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""
