"""Configuration: the models file and the environment, validated once and cached.

Nothing else in Hermes reads `os.environ`; everything asks `get_settings()`.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_MODELS_FILE = Path(__file__).with_name("models.json")

# memory_cost names the seed uses, as weights charged against a host's memory budget.
MEMORY_WEIGHTS = {"low": 1, "medium": 2, "high": 4}


class ConfigError(Exception):
    """The models file or an environment variable is invalid; the message names the field."""


class ModelConfig(BaseModel):
    """One entry of the models file; field names and units follow the seed (timeout in ms)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrency: int = Field(ge=1, le=1000)
    memory_cost: Literal["low", "medium", "high"]
    timeout: int = Field(ge=1, le=15 * 60 * 1000, description="milliseconds")
    backend_model: str = Field(min_length=1, max_length=200)

    @property
    def memory_weight(self) -> int:
        return MEMORY_WEIGHTS[self.memory_cost]


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelConfig] = Field(min_length=1)


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    models: dict[str, ModelConfig]
    ollama_url: str
    lease_table: str
    max_prompt_chars: int
    # Added to a lease's length so that a slow release is never mistaken for a crash.
    lease_margin_ms: int
    retry_after_s: int
    # Each /v1/status probe gets at most this long, so status answers within ~2 s.
    probe_timeout_s: float


def load_models(path: Path) -> dict[str, ModelConfig]:
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read models file {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"models file {path} is not valid JSON: {exc}") from exc
    try:
        parsed = ModelsFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"models file {path}: field '{field}': {first['msg']}") from exc
    for name in parsed.models:
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(
                f"models file {path}: field 'models.{name}': model names may use only "
                "letters, digits, '-', '_' and '.'"
            )
    return parsed.models


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"environment variable {name} must be at least {minimum}, got {value}")
    return value


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"environment variable {name} must be positive, got {value}")
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    models_file = Path(os.environ.get("HERMES_MODELS_FILE") or DEFAULT_MODELS_FILE)
    ollama_url = os.environ.get("OLLAMA_URL") or "http://localhost:11434"
    if not ollama_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"environment variable OLLAMA_URL must be an http(s) URL, got {ollama_url!r}"
        )
    return Settings(
        models=load_models(models_file),
        ollama_url=ollama_url.rstrip("/"),
        lease_table=os.environ.get("HERMES_LEASE_TABLE") or "LeaseTable",
        max_prompt_chars=_env_int("HERMES_MAX_PROMPT_CHARS", 100_000, 1),
        lease_margin_ms=_env_int("HERMES_LEASE_MARGIN_MS", 5_000, 0),
        retry_after_s=_env_int("HERMES_RETRY_AFTER_S", 1, 1),
        probe_timeout_s=_env_float("HERMES_PROBE_TIMEOUT_S", 1.0),
    )
