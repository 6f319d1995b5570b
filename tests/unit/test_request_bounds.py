"""Per-request resource bounds: a model's memory_cost only holds if callers cannot ask for any
context size or pin the model in memory. Per model, `max_num_ctx` is the context every request
runs with (a larger one is a 400 naming the field, never clamped; a smaller one or none is
replaced, as another num_ctx reloads the model in Ollama), callers' `keep_alive` is dropped
unless `allow_keep_alive`, and the Ollama-native routes pass only documented fields and options.
Through the real Lambda handlers with events/ files; what reaches the backend is what the
emulator received."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hermes.config import ConfigError, load_models
from hermes.service import get_service
from tests.support.lambda_calls import (
    LambdaContext,
    event,
    in_flight,
    load_function,
)
from tests.support.models_file import use_shipped_models
from tests.support.ollama_emulator import OllamaEmulator

CAP = 4096  # gemma's max_num_ctx in these tests; mistral has none and allows keep_alive


@pytest.fixture(autouse=True)
def env(
    aws: None, emulator: OllamaEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    emulator.reset()
    monkeypatch.setenv("OLLAMA_URL", emulator.url)
    use_shipped_models(
        tmp_path,
        monkeypatch,
        budget=8,
        gemma={"max_num_ctx": CAP},
        mistral={"allow_keep_alive": True, "max_num_ctx": None},
    )


def sent(emulator: OllamaEmulator) -> list[dict[str, Any]]:
    """Every model call's body as the backend (the emulator) received it, less the `stream`
    flag Hermes' client sets on each call."""
    return [
        {k: v for k, v in call.body.items() if k != "stream"}
        for call in emulator.received("/api/generate", "/api/chat")
    ]


def call(function: str, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = load_function(function).handler(event(name, body=json.dumps(body)), LambdaContext())
    text = response["body"]
    if response["headers"]["content-type"] == "application/x-ndjson":
        text = text.splitlines()[-1]
    elif response["headers"]["content-type"].startswith("text/event-stream"):
        return response["statusCode"], {"events": text}
    return response["statusCode"], json.loads(text)


def message(answer: dict[str, Any]) -> str:
    error = answer["error"]
    return error if isinstance(error, str) else error["message"]


# --- the models file ---------------------------------------------------------------------


def test_the_shipped_models_run_at_a_set_context_and_ignore_keep_alive() -> None:
    from local.template import ROOT

    shipped = load_models(ROOT / "layers/hermes/hermes/models.json")
    assert {name: (m.max_num_ctx, m.allow_keep_alive) for name, m in shipped.items()} == {
        "gemma": (8192, False),
        "llama3": (8192, False),
        "mistral": (8192, False),
    }
    assert get_service().settings.models["gemma"].max_num_ctx == CAP


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"max_num_ctx": 0}, "models.m.max_num_ctx"),
        ({"max_num_ctx": "8k"}, "models.m.max_num_ctx"),
        ({"allow_keep_alive": "sometimes"}, "models.m.allow_keep_alive"),
    ],
)
def test_a_bad_bound_is_named_in_the_config_error(
    tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    entry = {"max_concurrency": 1, "memory_cost": "low", "timeout": 1000, "backend_model": "x"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"models": {"m": {**entry, **changes}}}))
    with pytest.raises(ConfigError, match=f"'{field}'"):
        load_models(path)


# --- options.num_ctx on every route -----------------------------------------------------


@pytest.mark.parametrize(
    ("function", "name", "body"),
    [
        ("llm", "llm_generate.json", {"prompt": "hi"}),
        ("ollama_api", "ollama_generate.json", {"model": "gemma", "prompt": "hi"}),
        (
            "ollama_api",
            "ollama_chat.json",
            {"model": "gemma3:1b", "messages": [{"role": "user", "content": "hi"}]},
        ),
    ],
)
def test_a_context_over_the_models_cap_is_refused_naming_the_field(
    function: str, name: str, body: dict[str, Any], emulator: OllamaEmulator
) -> None:
    status, answer = call(function, name, {**body, "options": {"num_ctx": CAP + 1}})
    assert (status, answer["code"]) == (400, "invalid_request"), answer
    assert "options.num_ctx" in message(answer) and str(CAP) in message(answer)
    # Refused before any slot or backend call
    assert sent(emulator) == [] and in_flight("gemma") == 0


def test_the_llm_400_carries_the_field_and_the_cap() -> None:
    status, answer = call(
        "llm", "llm_generate.json", {"prompt": "hi", "options": {"num_ctx": 10**6}}
    )
    assert status == 400
    assert (answer["field"], answer["max_num_ctx"]) == ("options.num_ctx", CAP)


@pytest.mark.parametrize(
    ("function", "name", "body"),
    [
        ("llm", "llm_generate.json", {"prompt": "hi"}),
        ("ollama_api", "ollama_generate.json", {"model": "gemma", "prompt": "hi", "stream": False}),
        ("ollama_api", "ollama_chat.json", {"model": "gemma", "messages": []}),
    ],
)
def test_every_request_runs_at_the_models_context_whatever_it_asked_within_it(
    function: str, name: str, body: dict[str, Any], emulator: OllamaEmulator
) -> None:
    """CAP, a smaller context and none: the backend sees CAP each time, so the model is
    loaded once at the context its memory_cost was charged for."""
    for options in ({"num_ctx": CAP}, {"num_ctx": 512}, {}):
        status, _ = call(function, name, {**body, "options": options})
        assert status == 200
    assert [b["options"]["num_ctx"] for b in sent(emulator)] == [CAP, CAP, CAP]


def test_a_model_without_a_cap_takes_any_valid_context(emulator: OllamaEmulator) -> None:
    status, _ = call(
        "ollama_api",
        "ollama_generate.json",
        {"model": "mistral", "prompt": "hi", "options": {"num_ctx": 131072}},
    )
    assert status == 200
    (received,) = sent(emulator)
    assert received["options"]["num_ctx"] == 131072


@pytest.mark.parametrize("value", [True, "4096", 0, -1, 1.5])
def test_a_context_size_that_is_not_a_positive_integer_is_refused(value: Any) -> None:
    status, answer = call(
        "ollama_api",
        "ollama_generate.json",
        {"model": "mistral", "prompt": "hi", "options": {"num_ctx": value}},
    )
    assert status == 400 and "options.num_ctx" in message(answer)


def test_the_openai_routes_have_no_context_field_and_pass_none(
    emulator: OllamaEmulator,
) -> None:
    """OpenAI's API has no context size; extra fields are accepted and ignored, so neither a
    smuggled options.num_ctx nor keep_alive reaches the backend: it runs at max_num_ctx."""
    body = {
        "model": "gemma",
        "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_ctx": 10**6},
        "keep_alive": -1,
    }
    status, _ = call("openai_api", "openai_chat.json", body)
    assert status == 200
    (received,) = sent(emulator)
    assert received["options"]["num_ctx"] == CAP and "keep_alive" not in received


# --- keep_alive ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ollama_generate.json", "ollama_chat.json"])
def test_keep_alive_is_dropped_unless_the_model_allows_it(
    name: str, emulator: OllamaEmulator
) -> None:
    for model in ("gemma", "mistral"):
        body = {"model": model, "prompt": "hi", "keep_alive": -1}
        if name == "ollama_chat.json":
            body = {
                "model": model,
                "messages": [{"role": "user", "content": "hi"}],
                "keep_alive": -1,
            }
        assert call("ollama_api", name, body)[0] == 200
    pinned = {b["model"]: b.get("keep_alive") for b in sent(emulator)}
    assert pinned == {"gemma3:1b": None, "mistral:7b": -1}


# --- only documented fields and options on the Ollama-native routes ----------------------


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("ollama_generate.json", {"model": "gemma", "prompt": "hi", "n_gpu": 1}, "n_gpu"),
        ("ollama_generate.json", {"model": "gemma", "prompt": "hi", "tools": []}, "tools"),
        ("ollama_chat.json", {"model": "gemma", "messages": [], "prompt": "hi"}, "prompt"),
        (
            "ollama_chat.json",
            {"model": "gemma", "messages": [{"role": "user", "content": "x", "name": "bob"}]},
            "messages.0.name",
        ),
        (
            "ollama_generate.json",
            {"model": "gemma", "prompt": "hi", "options": {"num_ctxx": 8}},
            "options.num_ctxx",
        ),
        (
            "ollama_chat.json",
            {"model": "gemma", "messages": [], "options": {"num_gpu": 99}},
            "options.num_gpu",
        ),
    ],
)
def test_an_undocumented_field_or_option_is_a_400_naming_it(
    name: str, body: dict[str, Any], field: str, emulator: OllamaEmulator
) -> None:
    status, answer = call("ollama_api", name, body)
    assert (status, answer["code"]) == (400, "invalid_request"), answer
    assert f"'{field}'" in message(answer)
    assert sent(emulator) == []


def test_every_documented_generate_field_passes_through(emulator: OllamaEmulator) -> None:
    body = {
        "model": "gemma",
        "prompt": "def f(",
        "suffix": "return x",
        "images": [],
        "format": "json",
        "options": {"temperature": 0.1, "min_p": 0.05, "repeat_penalty": 1.1, "num_gpu": None},
        "system": "be brief",
        "template": "{{ .Prompt }}",
        "stream": False,
        "raw": False,
        "keep_alive": "5m",
        "context": [1, 2, 3],
        "think": False,
        "logprobs": False,
        "top_logprobs": 0,
    }
    assert call("ollama_api", "ollama_generate.json", body)[0] == 200
    expected = {k: v for k, v in body.items() if k not in ("stream", "keep_alive")}
    expected["options"] = {"temperature": 0.1, "min_p": 0.05, "repeat_penalty": 1.1}
    expected["options"]["num_ctx"] = CAP  # the context the model runs with
    assert sent(emulator) == [{**expected, "model": "gemma3:1b"}]


def test_every_documented_chat_field_passes_through(emulator: OllamaEmulator) -> None:
    tool = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
    message_ = {
        "role": "user",
        "content": "hi",
        "images": [],
        "thinking": "",
        "tool_calls": [],
        "tool_name": "now",
    }
    body = {
        "model": "mistral",
        "messages": [message_],
        "tools": [tool],
        "format": {"type": "object"},
        "options": {"seed": 1},
        "stream": False,
        "keep_alive": 0,
        "think": "low",
        "logprobs": True,
        "top_logprobs": 3,
    }
    assert call("ollama_api", "ollama_chat.json", body)[0] == 200
    assert sent(emulator) == [
        {**{k: v for k, v in body.items() if k != "stream"}, "model": "mistral:7b"}
    ]


def test_jobs_and_direct_invokes_refuse_a_context_over_the_cap(emulator: OllamaEmulator) -> None:
    over = {"prompt": "hi", "options": {"num_ctx": CAP + 1}}
    job = event("jobs_submit.json", path="/v1/jobs/gemma", body=json.dumps(over))
    job["pathParameters"] = {"model": "gemma"}
    response = load_function("jobs").handler(job, LambdaContext())
    status, answer = response["statusCode"], json.loads(response["body"])
    assert (status, answer["code"]) == (400, "invalid_request")
    assert "options.num_ctx" in message(answer)
    direct = load_function("llm").handler({"model": "gemma", **over}, LambdaContext())
    assert (direct["code"], direct["status"]) == ("invalid_request", 400)
    assert sent(emulator) == [] and in_flight("gemma") == 0
