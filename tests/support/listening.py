"""What listens where, read from /proc: the proof that a server is reachable from this machine
only (tests of local.process.loopback_only, DynamoDB Local and the runner)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
import time


def socket_inodes(pids: set[int]) -> set[str]:
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    return inodes


def listening(pids: set[int], namespace_of: int | str = "self") -> list[tuple[str, int]]:
    """(address, port) of each TCP socket in LISTEN state held by one of `pids`, among the
    sockets of the network namespace `namespace_of` is in (by default this process's)."""
    inodes = socket_inodes(pids)
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{namespace_of}/net/{table}") as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    found.append(decode_address(fields[1]))
    return sorted(found)


def decode_address(field: str) -> tuple[str, int]:
    """/proc/net/tcp's HEX_ADDRESS:HEX_PORT (32-bit words in host byte order) as text."""
    address, port = field.split(":")
    raw = bytes.fromhex(address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words)), int(port, 16)


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def interfaces(pid: int | str = "self") -> list[str]:
    """The network interfaces of the namespace `pid` is in."""
    with open(f"/proc/{pid}/net/dev") as dev:
        return [line.split(":")[0].strip() for line in list(dev)[2:]]


def non_loopback_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback's (from `ip`; none without it)."""
    if shutil.which("ip") is None:
        return []
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True)
    addresses = [line.split()[3].split("/")[0] for line in out.stdout.splitlines()]
    return [a for a in addresses if not ipaddress.ip_address(a).is_loopback]


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(child) for child in file.read().split()]


def gone(pid: int, within_s: float = 5) -> bool:
    """The process has exited within `within_s` (a zombie counts: it runs no more)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as file:
                if file.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except OSError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def ss(port: int) -> str:
    """`ss -ltnp` lines about `port`, for assertion messages."""
    if shutil.which("ss") is None:
        return "(no ss)"
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines() if f":{port} " in line)
