"""Configuration: the models file and the environment, validated once and cached.

Nothing else in Hermes reads `os.environ`; everything asks `get_settings()`.
"""

from __future__ import annotations

import json
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hermes.callers import CALLER_ID, EVERY_OTHER, CallerConfig

DEFAULT_MODELS_FILE = Path(__file__).with_name("models.json")

MemoryCost = Literal["low", "medium", "high"]
# memory_cost names the seed uses, as weights charged against a host's memory budget.
DEFAULT_MEMORY_WEIGHTS: dict[MemoryCost, int] = {"low": 1, "medium": 2, "high": 4}
DEFAULT_HOST = "default"


class ConfigError(Exception):
    """The models file or an environment variable is invalid; the message names the field."""


class ModelConfig(BaseModel):
    """One entry of the models file; field names and units follow the seed (timeout in ms)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Per host: Ollama's parallelism (OLLAMA_NUM_PARALLEL) is a server's, not a model's.
    max_concurrency: int = Field(ge=1, le=1000)
    memory_cost: MemoryCost
    timeout: int = Field(ge=1, le=15 * 60 * 1000, description="milliseconds")
    backend_model: str = Field(min_length=1, max_length=200)
    host: str = DEFAULT_HOST
    # A pool: the model is served by each of these hosts (placement picks one per request).
    # `host` alone is a pool of one, exactly as before.
    hosts: tuple[str, ...] | None = Field(default=None, min_length=1, max_length=50)
    # Optional cap on the model's requests in flight over all of its hosts together.
    max_concurrency_total: int | None = Field(default=None, ge=1, le=50_000)
    # 0 = answer 429 at once (the seed's behaviour); >0 = retry admission up to this long.
    queue_timeout_ms: int = Field(default=0, ge=0, le=15 * 60 * 1000)
    # Requests of this model that may wait on each of its hosts at once (each holds a Lambda
    # instance while it waits); past it, 429 queue_full. None = `waiting_limit`'s default.
    max_waiting: int | None = Field(default=None, ge=0, le=10_000)
    # memory_cost is only true for a bounded context: a request asking for a larger
    # options.num_ctx gets a 400. None = no cap (the backend's own default applies).
    max_num_ctx: int | None = Field(default=None, ge=1, le=1_048_576)
    # What the model serves: text generation (/v1/llm, /api/generate, /api/chat, OpenAI's
    # completions) and/or embeddings (/api/embed, /api/embeddings, /v1/embeddings); a
    # request for the other is a 400 naming the model and what it serves.
    capabilities: tuple[Literal["completion", "embedding"], ...] = Field(
        default=("completion",), min_length=1, max_length=2
    )
    # The most texts one embedding request may send (a batch holds its slot for all of them).
    max_inputs: int = Field(default=64, ge=1, le=2048)
    # Callers' keep_alive (how long Ollama keeps the model loaded) is dropped unless allowed:
    # a caller could otherwise pin a model in GPU memory forever, or unload it for everyone.
    allow_keep_alive: bool = False
    # The output cap passed to the backend when a request with token budgets (callers) gives
    # none: its tokens are reserved before the call, so the cap must be a true bound.
    max_output_tokens: int | None = Field(default=None, ge=1, le=1_048_576)

    @model_validator(mode="after")
    def _one_way_to_name_hosts(self) -> ModelConfig:
        if self.hosts is not None:
            if "host" in self.model_fields_set:
                raise ValueError("give either 'host' or 'hosts', not both")
            if len(set(self.hosts)) != len(self.hosts):
                raise ValueError("'hosts' lists a host twice")
            object.__setattr__(self, "host", self.hosts[0])  # frozen; `host` = the first
        return self

    @property
    def waiting_limit(self) -> int:
        """max_waiting, or by default twice what the model's slots serve within the wait if
        every call took its whole timeout (calls are usually much shorter); 0 without wait."""
        if self.max_waiting is not None:
            return self.max_waiting
        if self.queue_timeout_ms == 0:
            return 0
        return 2 * self.max_concurrency * math.ceil(self.queue_timeout_ms / self.timeout)

    @property
    def pool(self) -> tuple[str, ...]:
        """The hosts that serve this model, in the order the models file lists them."""
        return self.hosts if self.hosts is not None else (self.host,)


# Where a host's bearer token is stored (hermes.backends.tokens): an SSM Parameter Store
# parameter by its full path ("/hermes/tokens/gpu1", a SecureString), or a Secrets Manager
# secret by its ARN. The template lets the functions read only under BackendTokenSsmPrefix
# and BackendTokenSecretPrefix.
STORE_NAME = (
    r"^(/[A-Za-z0-9_.\-/]{1,1010}"
    r"|arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]{1,512})$"
)


class HostConfig(BaseModel):
    """An Ollama host; its memory budget is in the same units as the memory weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_budget: int = Field(ge=1, le=100_000)
    url: str | None = Field(default=None, pattern=r"^https?://", description="default OLLAMA_URL")
    # What the server at `url` speaks: Ollama's API, or OpenAI's (llama.cpp server, vLLM...).
    kind: Literal["ollama", "openai"] = "ollama"
    # How many models the server keeps loaded at once (Ollama's OLLAMA_MAX_LOADED_MODELS);
    # None = as many as its memory allows. Placement avoids making it evict a busy model.
    max_loaded_models: int | None = Field(default=None, ge=1, le=100)
    # A server behind an authenticating proxy: where its bearer token is stored (never the
    # token itself). Each request to it then carries `Authorization: Bearer <token>`.
    token_parameter: str | None = None

    @field_validator("token_parameter")
    @classmethod
    def _names_where_the_token_is(cls, value: str | None) -> str | None:
        # The message never repeats the value: it may be a token pasted in by mistake.
        if value is not None and not re.fullmatch(STORE_NAME, value):
            raise ValueError(
                "must name where the token is stored: an SSM parameter path (/...) or a "
                "Secrets Manager secret ARN (arn:aws:secretsmanager:...), never the token"
            )
        return value


class ModelsFile(BaseModel):
    # Inputs stay out of validation errors (and so out of a failed cold start's traceback):
    # a token pasted into token_parameter by mistake must not reach the logs.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    models: dict[str, ModelConfig] = Field(min_length=1)
    hosts: dict[str, HostConfig] = Field(
        default_factory=lambda: {DEFAULT_HOST: HostConfig(memory_budget=8)}, min_length=1
    )
    memory_weights: dict[MemoryCost, int] = Field(
        default_factory=lambda: dict(DEFAULT_MEMORY_WEIGHTS)
    )
    # Per caller id ("*": every caller not listed); absent: no caller limits.
    callers: dict[str, CallerConfig] | None = None

    def weight(self, model: ModelConfig) -> int:
        return self.memory_weights.get(model.memory_cost, DEFAULT_MEMORY_WEIGHTS[model.memory_cost])


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    models: dict[str, ModelConfig]
    hosts: dict[str, HostConfig]
    memory_weights: dict[MemoryCost, int]
    ollama_url: str
    lease_table: str
    max_prompt_chars: int
    # Added to a lease's length so that a slow release is never mistaken for a crash.
    lease_margin_ms: int
    retry_after_s: int
    # Each /v1/status probe gets at most this long, so status answers within ~2 s.
    probe_timeout_s: float
    # How long a synchronous HTTP request may run: API Gateway's HTTP API gives up at 30 s,
    # so Hermes answers its own 504 first. 0 = unlimited (the local runner).
    sync_budget_ms: int
    # Async jobs (issue 4): their table, queue, idempotency store and retry policy.
    jobs_table: str
    jobs_queue_url: str
    idempotency_table: str
    # A row per caller, model and UTC day (hermes.usage, GET /v1/usage).
    usage_table: str
    job_max_attempts: int
    job_retry_base_s: int
    job_retention_s: int
    job_max_wait_s: int
    # The worker's own Lambda timeout (WorkerFunction's Timeout), so the jobs machinery can
    # refuse a model whose jobs could never finish; 0 = unknown (tests, scripts).
    worker_timeout_s: int = 0
    # Where the worker parks a job it gives up on itself (it waited too long for capacity).
    jobs_dlq_url: str = ""
    # Model pools (several hosts per model): how long a failing host's circuit stays open
    # before one probe decides, and how placement ranks hosts ("residency"; "random" and
    # "round_robin" are the benchmark's baselines).
    circuit_cooldown_s: int = 10
    placement: Literal["residency", "random", "round_robin"] = "residency"
    callers: dict[str, CallerConfig] | None = None
    # The JWT claim that names the caller (the template's CallerClaim).
    caller_claim: str = "sub"

    def weight(self, model: ModelConfig) -> int:
        return self.memory_weights.get(model.memory_cost, DEFAULT_MEMORY_WEIGHTS[model.memory_cost])

    def host_url(self, host: str) -> str:
        return (self.hosts[host].url or self.ollama_url).rstrip("/")


# A job runs with its model's whole timeout (and admission wait, queue_timeout_ms); around
# the call the worker also writes the job record (running, finished), the idempotency record
# (in progress, result), admits and releases (a few DynamoDB writes, ~2 s each when DynamoDB
# is slow) and keeps hermes.http.LAMBDA_SAFETY_S (3.5 s) back at the Lambda deadline. A
# record is only started with this much time left; a later record of a batch that finds less
# is handed back (jobs.py).
JOB_OVERHEAD_S = 15
# What an invocation may spend before its first job starts (reading the job record).
WORKER_START_S = 5


def job_time_needed_s(model: ModelConfig) -> float:
    """Lambda time a job of `model` needs from its start to be sure of the whole timeout."""
    return (model.timeout + model.queue_timeout_ms) / 1000 + JOB_OVERHEAD_S


def check_worker_timeout(settings: Settings) -> None:
    """Refuse a model whose jobs the worker could never finish (ConfigError naming the field).
    Checked where jobs are loaded (jobs API, worker), not for the synchronous routes, which
    a local models file with longer timeouts may still serve."""
    if settings.worker_timeout_s <= 0:
        return
    path = os.environ.get("HERMES_MODELS_FILE") or DEFAULT_MODELS_FILE
    for name, model in sorted(settings.models.items()):
        needed = job_time_needed_s(model) + WORKER_START_S
        if needed > settings.worker_timeout_s:
            wait = f" + queue_timeout_ms {model.queue_timeout_ms}" if model.queue_timeout_ms else ""
            raise ConfigError(
                f"models file {path}: field 'models.{name}.timeout': {model.timeout} ms{wait} "
                f"+ {JOB_OVERHEAD_S + WORKER_START_S} s of job overhead is {needed:g} s, more "
                f"than the worker's timeout of {settings.worker_timeout_s} s "
                "(HERMES_WORKER_TIMEOUT_S, WorkerFunction's Timeout): its jobs could never "
                "finish. Raise the worker's Timeout in template.yaml (and JobsQueue's "
                "VisibilityTimeout to 6 times it) or lower the model's timeout"
            )


def reserved_concurrency(models: dict[str, ModelConfig]) -> int:
    """Lambda instances one generating function may hold at once: every slot of every model
    on every host of its pool (at most max_concurrency_total), plus the requests that may
    wait there (waiting_limit per host). Each waits in an instance of its own; a reserved
    concurrency below this lets Lambda throttle, and API Gateway answers that with its own
    5xx instead of Hermes' 429."""
    total = 0
    for model in models.values():
        slots = len(model.pool) * model.max_concurrency
        total += min(slots, model.max_concurrency_total or slots)
        total += len(model.pool) * model.waiting_limit
    return total


def load_models(path: Path) -> dict[str, ModelConfig]:
    return load_config(path).models


def load_config(path: Path) -> ModelsFile:
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
    for name, model in parsed.models.items():
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(
                f"models file {path}: field 'models.{name}': model names may use only "
                "letters, digits, '-', '_' and '.'"
            )
        field = "hosts" if model.hosts is not None else "host"
        for host_name in model.pool:
            host = parsed.hosts.get(host_name)
            if host is None:
                raise ConfigError(
                    f"models file {path}: field 'models.{name}.{field}': no host '{host_name}' "
                    f"in 'hosts' ({', '.join(sorted(parsed.hosts))})"
                )
            if parsed.weight(model) > host.memory_budget:
                raise ConfigError(
                    f"models file {path}: field 'models.{name}.memory_cost': weight "
                    f"{parsed.weight(model)} exceeds host '{host_name}' memory_budget "
                    f"{host.memory_budget}, so it could never run"
                )
    for caller, limits in (parsed.callers or {}).items():
        if caller != EVERY_OTHER and not CALLER_ID.fullmatch(caller):
            raise ConfigError(
                f"models file {path}: field 'callers.{caller[:100]}': caller ids are 1 to 200 "
                'letters, digits or ._:@/+=,- (or "*" for every caller not listed)'
            )
        for capped in limits.models:
            if capped not in parsed.models:
                raise ConfigError(
                    f"models file {path}: field 'callers.{caller}.models.{capped}': no model "
                    f"'{capped}' in 'models' ({', '.join(sorted(parsed.models))})"
                )
    _check_capacities(path, parsed)
    return parsed


# What one host may serve. hermes.limiter keeps a host's counters (its memory and each of its
# models' in-flight count) in one small state item; leases and waiters are items of their
# own, so no number of leases approaches DynamoDB's 400 KB per item. What grows with the
# models of a host is the grant pass, whose state update names every counter it changes
# (about 45 bytes per counter in each expression): 50 models with 100-character names keep
# it under 2.2 KB of DynamoDB's 4 KB per expression (tests/unit/test_limiter.py). The state
# item then stays under 16 KB (under 2 KB for a few models with short names), which is what
# a write of it costs in WCU: it depends on the models of a host, never on its leases.
MAX_MODELS_PER_HOST = 50
MAX_MODEL_NAME_CHARS = 100  # also the longest name a request can carry


def _check_capacities(path: Path, parsed: ModelsFile) -> None:
    for cost, weight in parsed.memory_weights.items():
        if weight < 0:
            raise ConfigError(
                f"models file {path}: field 'memory_weights.{cost}': must be at least 0, "
                f"got {weight}"
            )
    for name in parsed.models:
        if len(name) > MAX_MODEL_NAME_CHARS:
            raise ConfigError(
                f"models file {path}: field 'models.{name[:20]}...': model names are at most "
                f"{MAX_MODEL_NAME_CHARS} characters, got {len(name)}"
            )
    for host_name in parsed.hosts:
        served = sorted(n for n, m in parsed.models.items() if host_name in m.pool)
        if len(served) > MAX_MODELS_PER_HOST:
            over = served[MAX_MODELS_PER_HOST]
            field = "hosts" if parsed.models[over].hosts is not None else "host"
            raise ConfigError(
                f"models file {path}: field 'models.{over}.{field}': host "
                f"'{host_name}' would serve {len(served)} models, over the bound of "
                f"{MAX_MODELS_PER_HOST} per host (the limiter's writes name every counter of "
                "a host, and DynamoDB allows 4 KB per expression): add a host entry"
            )


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


def _env_float(name: str, default: float, zero: bool = False) -> float:
    """A positive number from the environment (`zero`: 0 allowed too), else ConfigError."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        at_least = "0 or more" if zero else "positive"
        raise ConfigError(f"environment variable {name} must be {at_least}, got {raw!r}")
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    models_file = Path(os.environ.get("HERMES_MODELS_FILE") or DEFAULT_MODELS_FILE)
    ollama_url = os.environ.get("OLLAMA_URL") or "http://localhost:11434"
    if not ollama_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"environment variable OLLAMA_URL must be an http(s) URL, got {ollama_url!r}"
        )
    config = load_config(models_file)
    return Settings(
        models=config.models,
        hosts=config.hosts,
        memory_weights=config.memory_weights,
        ollama_url=ollama_url.rstrip("/"),
        lease_table=os.environ.get("HERMES_LEASE_TABLE") or "LeaseTable",
        max_prompt_chars=_env_int("HERMES_MAX_PROMPT_CHARS", 100_000, 1),
        lease_margin_ms=_env_int("HERMES_LEASE_MARGIN_MS", 5_000, 0),
        retry_after_s=_env_int("HERMES_RETRY_AFTER_S", 1, 1),
        probe_timeout_s=_env_float("HERMES_PROBE_TIMEOUT_S", 1.0),
        sync_budget_ms=_env_int("HERMES_SYNC_BUDGET_MS", 0, 0),
        jobs_table=os.environ.get("HERMES_JOBS_TABLE") or "JobsTable",
        jobs_queue_url=os.environ.get("HERMES_JOBS_QUEUE_URL") or "",
        idempotency_table=os.environ.get("HERMES_IDEMPOTENCY_TABLE") or "IdempotencyTable",
        usage_table=os.environ.get("HERMES_USAGE_TABLE") or "UsageTable",
        job_max_attempts=_env_int("HERMES_JOB_MAX_ATTEMPTS", 10, 1),
        job_retry_base_s=_env_int("HERMES_JOB_RETRY_BASE_S", 5, 0),
        job_retention_s=_env_int("HERMES_JOB_RETENTION_S", 7 * 24 * 3600, 60),
        job_max_wait_s=_env_int("HERMES_JOB_MAX_WAIT_S", 3600, 1),
        worker_timeout_s=_env_int("HERMES_WORKER_TIMEOUT_S", 0, 0),
        jobs_dlq_url=os.environ.get("HERMES_JOBS_DLQ_URL") or "",
        circuit_cooldown_s=_env_int("HERMES_CIRCUIT_COOLDOWN_S", 10, 1),
        placement=_env_choice("HERMES_PLACEMENT", ("residency", "random", "round_robin")),
        callers=config.callers,
        caller_claim=os.environ.get("HERMES_CALLER_CLAIM") or "sub",
    )


def _env_choice(name: str, choices: tuple[str, ...]) -> Any:
    raw = os.environ.get(name) or choices[0]
    if raw not in choices:
        raise ConfigError(
            f"environment variable {name} must be one of {', '.join(choices)}, got {raw!r}"
        )
    return raw
