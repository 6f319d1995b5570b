"""Who is asking, and what that caller may use.

Identity: each request has a caller id, from wherever its authentication happened:
- API Gateway with IAM auth: the principal (`requestContext.authorizer.iam.userArn`);
- API Gateway with a JWT authorizer: a claim (HERMES_CALLER_CLAIM, the template's
  `CallerClaim`, `sub` by default);
- a direct invoke: the payload's `caller` (the invoke itself is authorized by IAM);
- a job: its submitter's, stored in the job;
- the local runner: the caller whose key the request's `Authorization: Bearer <key>` names
  (HERMES_API_KEYS, `caller:key` pairs; HERMES_API_KEY is the caller `default`);
- otherwise `anonymous`.
The id lives in a context variable for the request (`CALLER`): the service, its logs and
metrics read it there, so no signature between the handler and the limiter carries it.

Limits: the `callers` section of the models file, keyed by caller id, with `"*"` for every
caller not listed; without the section there are no caller limits (`limits_for` is None).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ANONYMOUS = "anonymous"
DEFAULT_KEY_CALLER = "default"  # HERMES_API_KEY's caller
EVERY_OTHER = "*"
# What a caller id may hold: IAM ARNs (arn:aws:iam::1:user/a.b), JWT subjects (UUIDs, emails),
# key names. Longer or other characters are refused where the id is given (a direct invoke's
# payload, the runner's keys); a gateway-authenticated id that does not fit is kept by its
# digest, never dropped: the limits still hold for it.
CALLER_ID = re.compile(r"[A-Za-z0-9._:@/+=,-]{1,200}")

CALLER: ContextVar[str] = ContextVar("hermes_caller", default=ANONYMOUS)


@contextlib.contextmanager
def acting_as(caller: str) -> Iterator[None]:
    """`caller` is CALLER within the block (and in the tasks it starts), and no longer after
    it: a warm instance's next invocation starts as nobody in particular."""
    token = CALLER.set(caller)
    try:
        yield
    finally:
        CALLER.reset(token)


def given_caller(value: Any) -> str:
    """A caller id given in a payload (a direct invoke's `caller`): checked, not digested.
    ValueError says what a caller id may be."""
    if value is None:
        return ANONYMOUS
    if not isinstance(value, str) or not CALLER_ID.fullmatch(value):
        raise ValueError(
            "caller must be a string of 1 to 200 letters, digits or ._:@/+=,- characters"
        )
    return value


class CallerScope:
    """ASGI middleware: the request's caller is CALLER while the app serves it. On Lambda,
    from the API Gateway event Mangum puts in the scope (its authorizer's principal or JWT
    claim); in the local runner, from the key its router checked (scope["hermes.caller"],
    which only the runner sets)."""

    def __init__(self, app: Any, claim: Any = None) -> None:
        self.app = app
        self.claim = claim  # () -> the JWT claim's name (read when first needed)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        caller = scope.get("hermes.caller")
        if caller is None:
            event = scope.get("aws.event")
            caller = caller_from_event(event, self.claim() if self.claim else "sub")
        with acting_as(caller):
            await self.app(scope, receive, send)


class CallerModelLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrency: int = Field(ge=1, le=100_000)


class CallerConfig(BaseModel):
    """One entry of the models file's `callers` section (each limit optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Requests of this caller in flight at once, over all models and every instance.
    max_concurrency: int | None = Field(default=None, ge=1, le=100_000)
    # ... and per model.
    models: dict[str, CallerModelLimits] = Field(default_factory=dict)
    # Prompt + completion tokens per fixed UTC minute / day; requests per UTC minute.
    tokens_per_minute: int | None = Field(default=None, ge=1, le=10**12)
    tokens_per_day: int | None = Field(default=None, ge=1, le=10**12)
    requests_per_minute: int | None = Field(default=None, ge=1, le=10**9)
    # Its share of a contended model's slots against other callers' (fair share).
    weight: int = Field(default=1, ge=1, le=840)
    # The highest priority its requests wait at (a higher one asked for is lowered to it).
    max_priority: Literal["high", "normal", "low"] = "high"  # hermes.schemas.Priority
    # GET /v1/usage shows it every caller's rows (others see only their own).
    admin: bool = False

    @property
    def budgets_tokens(self) -> bool:
        return self.tokens_per_minute is not None or self.tokens_per_day is not None


def limits_for(callers: Mapping[str, CallerConfig] | None, caller: str) -> CallerConfig | None:
    """The caller's limits: its own entry, else `"*"`'s, else none."""
    if not callers:
        return None
    return callers.get(caller) or callers.get(EVERY_OTHER)


def caller_from_event(event: Any, claim: str = "sub") -> str:
    """The caller of an API Gateway (HTTP API, payload 2.0) event, as its authorizer saw it."""
    context = event.get("requestContext") if isinstance(event, dict) else None
    authorizer = context.get("authorizer") if isinstance(context, dict) else None
    if not isinstance(authorizer, dict):
        return ANONYMOUS
    iam = authorizer.get("iam")
    if isinstance(iam, dict) and iam.get("userArn"):
        return fitting(str(iam["userArn"]))
    jwt = authorizer.get("jwt")
    claims = jwt.get("claims") if isinstance(jwt, dict) else None
    if isinstance(claims, dict) and claims.get(claim) not in (None, ""):
        return fitting(str(claims[claim]))
    return ANONYMOUS


def fitting(caller: str) -> str:
    """An authenticated id as a caller id: itself, or (too long, odd characters) a digest."""
    if CALLER_ID.fullmatch(caller):
        return caller
    import hashlib

    return "id-" + hashlib.sha256(caller.encode()).hexdigest()[:32]


def api_keys(keys: str | None, key: str | None) -> dict[str, str]:
    """The local runner's keys: {key: caller} from HERMES_API_KEYS (`caller:key,...`) and
    HERMES_API_KEY (the caller `default`). ValueError names what is wrong."""
    found: dict[str, str] = {}
    for pair in (keys or "").split(","):
        if not pair.strip():
            continue
        caller, sep, secret = pair.strip().partition(":")
        if not sep or not secret or not CALLER_ID.fullmatch(caller):
            raise ValueError(
                "environment variable HERMES_API_KEYS must be comma-separated caller:key "
                f"pairs (caller ids: letters, digits and ._:@/+=-), got an entry {caller!r}"
            )
        if secret in found:
            raise ValueError("environment variable HERMES_API_KEYS gives one key to two callers")
        found[secret] = caller
    if key:
        found.setdefault(key, DEFAULT_KEY_CALLER)
    return found


# -- what a request reserves -------------------------------------------------------------------

# The output cap of a request with token budgets that gives none, when its model sets no
# max_output_tokens: passed to the backend, so the reservation is a true bound.
DEFAULT_MAX_OUTPUT_TOKENS = 2048
# A tokenizer's token covers at least one byte of text (BPE, SentencePiece), so a prompt's
# UTF-8 bytes bound its tokens; a chat template adds a few per message; an image is charged
# this many (vision models encode one in a few hundred).
TOKENS_PER_MESSAGE = 8
TOKENS_PER_IMAGE = 1024


def prompt_tokens_bound(body: dict[str, Any]) -> int:
    """An upper bound of the prompt tokens of an Ollama-shaped request (/api/generate or
    /api/chat body): the UTF-8 bytes of every text it sends, plus the template's per message
    and a charge per image."""
    import json

    texts = {k: v for k, v in body.items() if k not in ("images", "messages", "options", "model")}
    total = len(json.dumps(texts, ensure_ascii=False).encode())
    images = len(body.get("images") or [])
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            rest = {k: v for k, v in message.items() if k != "images"}
            total += len(json.dumps(rest, ensure_ascii=False).encode()) + TOKENS_PER_MESSAGE
            images += len(message.get("images") or [])
    return total + images * TOKENS_PER_IMAGE


def with_output_cap(
    body: dict[str, Any], max_output_tokens: int | None
) -> tuple[dict[str, Any], int]:
    """The body with a bounded `options.num_predict` (the request's own when it gives a
    positive one, else the model's max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS), and that
    bound. Ollama's -1 and -2 (no limit, fill the context) are not bounds."""
    given = body.get("options")
    options: dict[str, Any] = given if isinstance(given, dict) else {}
    asked = options.get("num_predict")
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
        return body, asked
    cap = max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS
    return {**body, "options": {**options, "num_predict": cap}}, cap


def used_tokens(answer: dict[str, Any] | None) -> int | None:
    """What the backend reported (Ollama's last object): prompt + completion, or None."""
    if not answer or (answer.get("prompt_eval_count") is None and answer.get("eval_count") is None):
        return None
    return int(answer.get("prompt_eval_count") or 0) + int(answer.get("eval_count") or 0)


def caller_pool(caller: str) -> str:
    """The limiter pool of a caller's concurrency over all models and instances."""
    return f"caller#{caller}"
