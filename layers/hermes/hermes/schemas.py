"""The body of POST /v1/llm/{model}, validated strictly: bad input gets a 400 naming the field;
and the per-model bounds every route applies to what callers may ask of a backend."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hermes.bounds import check_request
from hermes.config import ModelConfig
from hermes.errors import InvalidRequest, PromptTooLarge

# Ollama's documented runtime options (API docs, Modelfile parameters, the official client's
# Options): they shape one generation and pass through.
RUNTIME_OPTIONS = frozenset(
    {
        "num_ctx",
        "num_keep",
        "num_predict",
        "seed",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "typical_p",
        "tfs_z",
        "repeat_last_n",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
        "penalize_newline",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "stop",
    }
)
# Documented too, but they decide how the backend loads the model (GPU layers, threads, batch,
# memory mapping): a caller setting them reloads the model with another footprint than the
# memory_cost Hermes charges, so they belong to the operator's Modelfile, not to a request.
LOAD_OPTIONS = frozenset(
    {
        "numa",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "embedding_only",
        "num_thread",
    }
)


class GenerateOptions(BaseModel):
    """The Ollama options Hermes passes through; ranges keep obvious mistakes out of the GPU."""

    model_config = ConfigDict(extra="forbid", strict=True)

    temperature: float | None = Field(default=None, ge=0, le=5)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=10_000)
    num_predict: int | None = Field(default=None, ge=-2, le=1_000_000)
    num_ctx: int | None = Field(default=None, ge=1, le=1_048_576)
    seed: int | None = None
    stop: list[str] | None = Field(default=None, max_length=16)


# Order among waiting requests (issue 12): high first, low last, with aging (hermes.limiter).
Priority = Literal["high", "normal", "low"]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    system: str | None = None
    options: GenerateOptions | None = None
    format: Literal["json"] | dict[str, Any] | None = None
    # Hermes' own: the place among waiting requests (the X-Hermes-Priority header otherwise).
    priority: Priority | None = None

    def to_ollama(self) -> dict[str, Any]:
        """The body of Ollama's /api/generate (without model, stream and Hermes' fields)."""
        return self.model_dump(exclude_none=True, exclude={"priority"})


def parse_generate_request(
    body: Any, max_prompt_chars: int, model: ModelConfig | None = None
) -> GenerateRequest:
    """The validated body, its texts and schema within bounds (hermes.bounds); with the
    model's config, also within its bounds (max_num_ctx)."""
    request = _parse_generate_request(body, max_prompt_chars)
    check_request(request.to_ollama(), max_prompt_chars)
    if model is not None and request.options is not None and request.options.num_ctx is not None:
        check_num_ctx(request.options.num_ctx, model)
    return request


def _parse_generate_request(body: Any, max_prompt_chars: int) -> GenerateRequest:
    if not isinstance(body, dict):
        raise InvalidRequest('the request body must be a JSON object such as {"prompt": "..."}')
    prompt = body.get("prompt")
    if isinstance(prompt, str) and len(prompt) > max_prompt_chars:
        raise PromptTooLarge(
            f"prompt has {len(prompt)} characters; the limit is {max_prompt_chars}",
            limit=max_prompt_chars,
        )
    try:
        return GenerateRequest.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc), field=_field(exc)) from None


def check_num_ctx(value: Any, model: ModelConfig) -> int:
    """A context size within the model's max_num_ctx: larger ones are refused, never clamped,
    so a caller never gets a silently shorter context than it asked for."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not float(value).is_integer()
        or value < 1
    ):
        raise InvalidRequest(
            "field 'options.num_ctx': must be a positive integer", field="options.num_ctx"
        )
    if model.max_num_ctx is not None and value > model.max_num_ctx:
        raise InvalidRequest(
            f"field 'options.num_ctx': {int(value)} is over this model's limit of "
            f"{model.max_num_ctx} tokens (max_num_ctx)",
            field="options.num_ctx",
            max_num_ctx=model.max_num_ctx,
        )
    return int(value)


def bound_options(options: dict[str, Any] | None, model: ModelConfig) -> dict[str, Any] | None:
    """Ollama `options` as a caller may send them: documented runtime options only (null
    values dropped, as clients that send every option do), num_ctx within max_num_ctx."""
    if options is None:
        return None
    given = {key: value for key, value in options.items() if value is not None}
    for key in given:
        if key in LOAD_OPTIONS:
            raise InvalidRequest(
                f"option 'options.{key}' sets how the backend loads the model; the operator "
                "sets it in the model's Modelfile, not a request",
                field=f"options.{key}",
            )
        if key not in RUNTIME_OPTIONS:
            raise InvalidRequest(f"unknown option 'options.{key}'", field=f"options.{key}")
    if "num_ctx" in given:
        given["num_ctx"] = check_num_ctx(given["num_ctx"], model)
    return given


Body = TypeVar("Body", bound=BaseModel)


def validate_body(body: Any, kind: type[Body]) -> Body:
    """The compatible APIs' bodies: a JSON object, valid for `kind`. Their texts are counted
    on the way to the backend, as every route's are (hermes.bounds, HermesService)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        parsed = kind.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None
    return parsed


def _field(exc: ValidationError) -> str:
    return ".".join(str(part) for part in exc.errors()[0]["loc"])


def describe_validation_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = _field(exc)
    if field == "prompt" and first["type"] in ("missing", "string_type", "string_too_short"):
        return "'prompt' is required and must be a non-empty string"
    if first["type"] == "extra_forbidden":
        return f"unknown field '{field}'"
    return f"field '{field}': {first['msg']}"
