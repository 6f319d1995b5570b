from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from local.dynamodb_local import DynamoDBLocal
from tests.support.conflict_store import ConflictingDynamoDB
from tests.support.ollama_emulator import OllamaEmulator

# The seed's models with short timeouts, so timeouts and lease expiry are quick to observe,
# plus a model Ollama does not have.
TEST_MODELS = {
    "models": {
        "gemma": {
            "max_concurrency": 2,
            "memory_cost": "medium",
            "timeout": 5000,
            "backend_model": "gemma3:1b",
        },
        "llama3": {
            "max_concurrency": 1,
            "memory_cost": "high",
            "timeout": 5000,
            "backend_model": "llama3:8b",
        },
        "mistral": {
            "max_concurrency": 2,
            "memory_cost": "medium",
            "timeout": 1000,
            "backend_model": "mistral:7b",
        },
        "ghost": {
            "max_concurrency": 1,
            "memory_cost": "low",
            "timeout": 5000,
            "backend_model": "ghost:1b",
        },
    }
}


@pytest.fixture(scope="session")
def dynamodb_local() -> Iterator[DynamoDBLocal]:
    server = DynamoDBLocal().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def conflict_store(dynamodb_local: DynamoDBLocal) -> Iterator[ConflictingDynamoDB]:
    """The session's DynamoDB Local behind a proxy as strict as real DynamoDB: a transaction
    holds its items for 10 ms (its commit), overlapping ones are cancelled."""
    with ConflictingDynamoDB(dynamodb_local.url, commit_s=0.01) as store:
        yield store


@pytest.fixture
def conflicting_dynamodb(conflict_store: ConflictingDynamoDB) -> ConflictingDynamoDB:
    """conflict_store with no fault injected and its counters at zero."""
    conflict_store.reset()
    conflict_store.commit_s = 0.01
    return conflict_store


@pytest.fixture(scope="session")
def emulator() -> Iterator[OllamaEmulator]:
    with OllamaEmulator() as emu:
        yield emu


@pytest.fixture(scope="session")
def models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "models.json"
    path.write_text(json.dumps(TEST_MODELS))
    return path


@pytest.fixture(scope="session")
def runner_env(
    dynamodb_local: DynamoDBLocal, emulator: OllamaEmulator, models_file: Path
) -> dict[str, str]:
    """Environment for a runner sharing the session's DynamoDB Local, emulator and models."""
    return {
        "AWS_ENDPOINT_URL_DYNAMODB": dynamodb_local.url,
        "OLLAMA_URL": emulator.url,
        "HERMES_MODELS_FILE": str(models_file),
        "HERMES_LEASE_MARGIN_MS": "500",
        "HERMES_MAX_PROMPT_CHARS": "1000",
    }


@pytest.fixture
def hermes_env(
    runner_env: dict[str, str], dynamodb_local: DynamoDBLocal, emulator: OllamaEmulator
) -> dict[str, str]:
    """runner_env, with clean tables and a reset emulator."""
    dynamodb_local.reset_tables()
    emulator.reset()
    return runner_env
