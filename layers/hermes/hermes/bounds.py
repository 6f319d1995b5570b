"""What a caller may send, whichever route it came by: one set of bounds, checked on the
JSON as it is parsed and on the Ollama-shaped body the service sends to a backend.

- JSON: nesting at most MAX_JSON_DEPTH deep, no NaN or Infinity (Python's parser takes them,
  no backend does), every failure a 400 `invalid_request`.
- Texts: every text a caller sends counts toward HERMES_MAX_PROMPT_CHARS — prompt, system,
  suffix, template, messages (content, thinking, tool_calls), tools — and a 413 names the
  largest; `context`, `images` and `stop` have bounds of their own.
- Structured output (`format`, OpenAI's `response_format` schema): size, nesting and the
  numbers a grammar engine expands (maxItems, maxLength, maximum, enum width) are bounded, so
  a schema cannot make the backend's sampler build something huge (vllm#17894).
"""

from __future__ import annotations

import json
import math
from typing import Any

from hermes.errors import InvalidRequest, PromptTooLarge

MAX_JSON_DEPTH = 64
# Ollama's `context` (the token ids a previous /api/generate returned), `images` (base64) and
# `stop` sequences.
MAX_CONTEXT_TOKENS = 131_072
MAX_IMAGES = 16
MAX_IMAGE_CHARS = 8 * 1024 * 1024  # base64 of a 6 MiB image
MAX_STOP = 16
MAX_STOP_CHARS = 200
# Structured output.
MAX_SCHEMA_CHARS = 16_384
MAX_SCHEMA_DEPTH = 24  # JSON levels: a property of an object of an array... ~10 schema levels
MAX_SCHEMA_COUNT = 1_000  # minItems, maxItems, minProperties, maxProperties
MAX_SCHEMA_LENGTH = 100_000  # minLength, maxLength
MAX_SCHEMA_NUMBER = 10**9  # |minimum|, |maximum|, exclusive ones, multipleOf
MAX_ENUM = 256
COUNT_KEYWORDS = (
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "minContains",
    "maxContains",
)
LENGTH_KEYWORDS = ("minLength", "maxLength")
NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _not_a_number(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of a number's range")
    return value


def parse_json(raw: bytes | str) -> Any:
    """The body as JSON, or InvalidRequest: not JSON, NaN / Infinity, a number out of range,
    or nested deeper than MAX_JSON_DEPTH."""
    try:
        value = json.loads(raw, parse_constant=_not_a_number, parse_float=_finite)
    except RecursionError:
        raise InvalidRequest(
            f"the request body nests deeper than {MAX_JSON_DEPTH} levels"
        ) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digits, ours
        raise InvalidRequest(f"the request body is not valid JSON ({exc})") from None
    check_json(value, "the request body")
    return value


def check_json(value: Any, what: str = "the payload") -> None:
    """A parsed value (a direct invoke's payload: Lambda's parser takes NaN) within bounds:
    nesting at most MAX_JSON_DEPTH, every float finite. Iterative: any depth is safe here."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise InvalidRequest(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(node, float) and not math.isfinite(node):
            raise InvalidRequest(f"{what} holds {node}, which is not a JSON number")


def _text(value: Any) -> int:
    """Characters of a text field, or of a structured one (tools, tool_calls) as JSON."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    return len(json.dumps(value, ensure_ascii=False))


def check_request(body: dict[str, Any], max_prompt_chars: int) -> None:
    """An Ollama-shaped body (/api/generate or /api/chat, as every route sends its request to
    the backend) within the bounds: its texts together within `max_prompt_chars` (413 names
    the largest), `context`, `images` and `stop` within theirs, `format` a bounded schema."""
    sizes: dict[str, int] = {}
    for field in ("prompt", "system", "suffix", "template", "tools"):
        if body.get(field) is not None:
            sizes[field] = _text(body[field])
    if isinstance(body.get("input"), list):  # an embedding request's texts, all of them
        sizes["input"] = sum(_text(text) for text in body["input"])
    images = list(body.get("images") or [])
    for index, message in enumerate(body.get("messages") or []):
        if not isinstance(message, dict):
            continue
        for field in ("content", "thinking", "tool_calls"):
            if message.get(field) is not None:
                sizes[f"messages[{index}].{field}"] = _text(message[field])
        images += list(message.get("images") or [])
    total = sum(sizes.values())
    if total > max_prompt_chars:
        largest = max(sizes, key=lambda field: sizes[field])
        raise PromptTooLarge(
            f"the request's texts have {total} characters, {sizes[largest]} of them in "
            f"'{largest}'; the limit is {max_prompt_chars} (HERMES_MAX_PROMPT_CHARS), counting "
            "prompt, system, suffix, template, messages, tools and an embedding's inputs",
            field=largest,
            limit=max_prompt_chars,
        )
    context = body.get("context")
    if isinstance(context, list) and len(context) > MAX_CONTEXT_TOKENS:
        raise PromptTooLarge(
            f"field 'context' has {len(context)} tokens; the limit is {MAX_CONTEXT_TOKENS}",
            field="context",
            limit=MAX_CONTEXT_TOKENS,
        )
    _bounded("images", [len(images)], MAX_IMAGES, "{} images; the limit is {} per request")
    _bounded(
        "images",
        [_text(image) for image in images],
        MAX_IMAGE_CHARS,
        "an image has {} characters of base64; the limit is {}",
    )
    _check_stop((body.get("options") or {}).get("stop"))
    if body.get("format") is not None:
        check_schema(body["format"], "format")


def _check_stop(stop: Any) -> None:
    sequences = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    _bounded("options.stop", [len(sequences)], MAX_STOP, "{} sequences; the limit is {}")
    _bounded(
        "options.stop",
        [_text(sequence) for sequence in sequences],
        MAX_STOP_CHARS,
        "a sequence has {} characters; the limit is {}",
    )


def _bounded(field: str, sizes: list[int], limit: int, says: str) -> None:
    """413 naming `field` for the first of `sizes` over `limit` (`says`: size, limit)."""
    over = next((size for size in sizes if size > limit), None)
    if over is not None:
        raise PromptTooLarge(
            f"field '{field}': " + says.format(over, limit), field=field, limit=limit
        )


def check_schema(schema: Any, field: str) -> None:
    """A structured-output schema (`format` or OpenAI's `response_format`) a backend can
    compile: at most MAX_SCHEMA_CHARS as JSON and MAX_SCHEMA_DEPTH deep, counts, lengths and
    numbers within bounds, enums at most MAX_ENUM wide. A 400 names the limit."""
    if isinstance(schema, str):
        if schema != "json":
            raise InvalidRequest(
                f"field '{field}': must be \"json\" or a JSON schema object", field=field
            )
        return
    if not isinstance(schema, dict):
        raise InvalidRequest(f"field '{field}': must be \"json\" or a JSON schema", field=field)
    size = _text(schema)
    if size > MAX_SCHEMA_CHARS:
        _schema_limit(field, f"is {size} characters as JSON", f"{MAX_SCHEMA_CHARS} characters")
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
            continue
        if not isinstance(node, dict):
            continue
        if depth > MAX_SCHEMA_DEPTH:
            _schema_limit(field, "nests too deep", f"{MAX_SCHEMA_DEPTH} JSON levels")
        for keyword, limit in (
            *((k, MAX_SCHEMA_COUNT) for k in COUNT_KEYWORDS),
            *((k, MAX_SCHEMA_LENGTH) for k in LENGTH_KEYWORDS),
            *((k, MAX_SCHEMA_NUMBER) for k in NUMBER_KEYWORDS),
        ):
            value = node.get(keyword)
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and abs(value) > limit
            ):
                _schema_limit(field, f"has {keyword} {value}", f"{limit} for {keyword}")
        for keyword in ("enum", "anyOf", "oneOf", "allOf", "prefixItems"):
            value = node.get(keyword)
            if isinstance(value, list) and len(value) > MAX_ENUM:
                _schema_limit(field, f"has {len(value)} {keyword} values", f"{MAX_ENUM} values")
        stack.extend((child, depth + 1) for child in node.values())


def _schema_limit(field: str, what: str, limit: str) -> None:
    raise InvalidRequest(
        f"field '{field}': the schema {what}; the limit is {limit} (structured output bounds)",
        field=field,
    )
