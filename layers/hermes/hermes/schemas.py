"""The body of POST /v1/llm/{model}, validated strictly: bad input gets a 400 naming the field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hermes.errors import InvalidRequest, PromptTooLarge


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


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    system: str | None = None
    options: GenerateOptions | None = None
    format: Literal["json"] | dict[str, Any] | None = None

    def to_ollama(self) -> dict[str, Any]:
        """The body of Ollama's /api/generate (without model and stream)."""
        return self.model_dump(exclude_none=True)


def parse_generate_request(body: Any, max_prompt_chars: int) -> GenerateRequest:
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


Body = TypeVar("Body", bound=BaseModel)


def validate_body(
    body: Any, kind: type[Body], max_prompt_chars: int, prompt_chars: Callable[[Body], int]
) -> Body:
    """The compatible APIs' bodies: a JSON object, valid for `kind`, prompt within the limit."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        parsed = kind.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None
    size = prompt_chars(parsed)
    if size > max_prompt_chars:
        raise PromptTooLarge(f"the prompt has {size} characters; the limit is {max_prompt_chars}")
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
