"""DynamoDB Local, reachable from this machine only: it has no option for the address it listens
on (it takes every interface), so it runs in a network namespace of its own whose one
interface is loopback, behind a relay on 127.0.0.1. It sends no telemetry, lets no browser page
of another origin call it, and writes nothing in the checkout."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from local.dynamodb_local import DynamoDBLocal
from local.template import ROOT
from tests.support.listening import (
    gone,
    interfaces,
    is_loopback,
    listening,
    non_loopback_addresses,
    ss,
)

METADATA = "dynamodb-local-metadata.json"


def arguments(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as file:
        return file.read().decode().split("\0")


def dynamodb_processes(port: int) -> tuple[int, set[int]]:
    """(the JVM's pid, every pid of the store: the JVM and its relay if any), found by the
    JVM's command line (`-jar .../DynamoDBLocal.jar ... -port <port>`)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = arguments(int(entry))
            with open(f"/proc/{entry}/comm") as comm:
                is_java = comm.read().strip() == "java"
        except OSError:
            continue
        jar = any(a.endswith("DynamoDBLocal.jar") for a in args)
        if is_java and jar and option(args, "-port") == str(port):
            java = int(entry)
            with open(f"/proc/{java}/status") as status:
                parent = next(int(s.split()[1]) for s in status if s.startswith("PPid:"))
            relay = {parent} if "loopback-only" in arguments(parent) else set()
            return java, {java, *relay}
    raise AssertionError(f"no DynamoDB Local JVM with -port {port}")


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_nothing_of_dynamodb_local_listens_beyond_loopback(dynamodb_local: DynamoDBLocal) -> None:
    java, pids = dynamodb_processes(dynamodb_local.port)
    here = listening(pids)
    # In this machine's network namespace, its one listening socket is on loopback...
    assert here and all(is_loopback(address) for address, _ in here), ss(dynamodb_local.port)
    assert here == [("127.0.0.1", dynamodb_local.port)], ss(dynamodb_local.port)
    # ...and the JVM's own (on every interface) is in a namespace with no interface but lo.
    assert interfaces(java) == ["lo"]
    assert os.readlink(f"/proc/{java}/ns/net") != os.readlink("/proc/self/ns/net")
    for address in non_loopback_addresses():
        with pytest.raises(OSError):
            socket.create_connection((address, dynamodb_local.port), timeout=2).close()
    assert "TableNames" in dynamodb_local.client().list_tables()  # still answers here


def test_it_sends_no_telemetry(dynamodb_local: DynamoDBLocal) -> None:
    java, _ = dynamodb_processes(dynamodb_local.port)
    assert "-disableTelemetry" in arguments(java)
    with open(f"/proc/{java}/environ", "rb") as environ:
        assert b"DDB_LOCAL_TELEMETRY=0" in environ.read().split(b"\0")


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "*", "http://localhost:4020"])
def test_no_page_of_another_origin_may_call_it(dynamodb_local: DynamoDBLocal, origin: str) -> None:
    java, _ = dynamodb_processes(dynamodb_local.port)
    # -cors without it means '*' (its help); the value given is no origin a browser sends.
    cors = option(arguments(java), "-cors")
    assert cors is not None and "*" not in cors and "://" not in cors and cors != "null"
    preflight = httpx.options(
        dynamodb_local.url,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-amz-target,authorization",
        },
    )
    call = httpx.post(
        dynamodb_local.url,
        content=b"{}",
        headers={
            "Origin": origin,
            "Content-Type": "application/x-amz-json-1.0",
            "X-Amz-Target": "DynamoDB_20120810.ListTables",
            "Authorization": "AWS4-HMAC-SHA256 Credential=local/20240101/us-east-1/dynamodb/"
            "aws4_request, SignedHeaders=host, Signature=0",
        },
    )
    assert call.status_code == 200 and "TableNames" in call.json()
    for response in (preflight, call):
        assert "access-control-allow-origin" not in response.headers


def test_its_metadata_file_is_neither_tracked_nor_written_in_the_checkout() -> None:
    git = ["git", "-C", str(ROOT)]
    tracked = subprocess.run([*git, "ls-files", "--error-unmatch", METADATA], capture_output=True)
    assert tracked.returncode != 0, f"{METADATA} is tracked"
    ignored = subprocess.run([*git, "check-ignore", "-q", "--no-index", METADATA])
    assert ignored.returncode == 0, f"{METADATA} is not ignored"

    before = (ROOT / METADATA).stat().st_mtime_ns if (ROOT / METADATA).exists() else None
    store = DynamoDBLocal().start()
    try:
        java, pids = dynamodb_processes(store.port)
        workdir = Path(os.readlink(f"/proc/{java}/cwd"))
        assert ROOT not in (workdir, *workdir.parents)
        assert not (workdir / METADATA).exists()
    finally:
        store.stop()
    after = (ROOT / METADATA).stat().st_mtime_ns if (ROOT / METADATA).exists() else None
    assert after == before, f"a start wrote {ROOT / METADATA}"
    # stop() leaves nothing behind: no JVM, no relay, no working directory.
    assert all(gone(pid) for pid in pids)
    assert not workdir.exists()
