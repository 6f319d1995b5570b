from pathlib import Path

import pytest

from hermes.config import ConfigError, get_settings, load_models
from tests.support.models_file import write_models


def test_default_models_are_the_seeds() -> None:
    models = get_settings().models
    assert {n: (m.max_concurrency, m.memory_cost, m.timeout) for n, m in models.items()} == {
        "gemma": (2, "medium", 30_000),
        "llama3": (1, "high", 45_000),
        "mistral": (2, "medium", 30_000),
    }
    assert all(m.backend_model for m in models.values())


def test_environment_defaults_follow_the_seed() -> None:
    settings = get_settings()
    assert settings.ollama_url == "http://localhost:11434"
    assert settings.max_prompt_chars == 100_000


def test_ollama_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_URL", "http://gpu-host:11434/")
    assert get_settings().ollama_url == "http://gpu-host:11434"


def test_a_bad_ollama_url_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_URL", "gpu-host:11434")
    with pytest.raises(ConfigError, match="OLLAMA_URL"):
        get_settings()


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        (
            {"max_concurrency": 0, "memory_cost": "low", "timeout": 1000, "backend_model": "x"},
            "models.m.max_concurrency",
        ),
        (
            {"max_concurrency": 1, "memory_cost": "huge", "timeout": 1000, "backend_model": "x"},
            "models.m.memory_cost",
        ),
        (
            {"max_concurrency": 1, "memory_cost": "low", "timeout": "30s", "backend_model": "x"},
            "models.m.timeout",
        ),
        ({"max_concurrency": 1, "memory_cost": "low", "timeout": 1000}, "models.m.backend_model"),
        (
            {
                "max_concurrency": 1,
                "memory_cost": "low",
                "timeout": 1000,
                "backend_model": "x",
                "tiemout": 1,
            },
            "models.m.tiemout",
        ),
    ],
)
def test_a_bad_model_field_is_named_in_the_error(tmp_path: Path, entry: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_models(write_models(tmp_path, {"models": {"m": entry}}))
    assert f"'{field}'" in str(info.value)


def test_model_names_are_restricted_to_url_safe_characters(tmp_path: Path) -> None:
    entry = {"max_concurrency": 1, "memory_cost": "low", "timeout": 1000, "backend_model": "x"}
    with pytest.raises(ConfigError, match=r"models\.a/b"):
        load_models(write_models(tmp_path, {"models": {"a/b": entry}}))


def test_unreadable_or_invalid_models_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_models(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_models(bad)


def test_models_file_is_chosen_by_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = {
        "max_concurrency": 3,
        "memory_cost": "low",
        "timeout": 5000,
        "backend_model": "tiny:1b",
    }
    monkeypatch.setenv(
        "HERMES_MODELS_FILE", str(write_models(tmp_path, {"models": {"tiny": entry}}))
    )
    assert list(get_settings().models) == ["tiny"]


def test_a_non_numeric_limit_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMES_MAX_PROMPT_CHARS", "lots")
    with pytest.raises(ConfigError, match="HERMES_MAX_PROMPT_CHARS"):
        get_settings()


ENTRY = {"max_concurrency": 1, "memory_cost": "high", "timeout": 1000, "backend_model": "x"}


def test_default_host_budget_and_weights() -> None:
    settings = get_settings()
    assert settings.hosts["default"].memory_budget == 8
    assert settings.memory_weights == {"low": 1, "medium": 2, "high": 4}
    assert all(m.host == "default" and m.queue_timeout_ms == 0 for m in settings.models.values())


def test_a_model_on_an_unknown_host_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'models\.m\.host'"):
        load_models(write_models(tmp_path, {"models": {"m": {**ENTRY, "host": "gpu9"}}}))


def test_a_model_heavier_than_its_hosts_budget_is_rejected(tmp_path: Path) -> None:
    config = {"models": {"m": ENTRY}, "hosts": {"default": {"memory_budget": 3}}}
    with pytest.raises(ConfigError, match="exceeds host 'default' memory_budget 3"):
        load_models(write_models(tmp_path, config))


def test_weights_and_host_urls_are_configurable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {
        "models": {"m": {**ENTRY, "host": "gpu2"}},
        "hosts": {"gpu2": {"memory_budget": 10, "url": "http://gpu2:11434/"}},
        "memory_weights": {"low": 1, "medium": 3, "high": 5},
    }
    monkeypatch.setenv("HERMES_MODELS_FILE", str(write_models(tmp_path, config)))
    settings = get_settings()
    assert settings.weight(settings.models["m"]) == 5
    assert settings.host_url("gpu2") == "http://gpu2:11434"


def test_status_urls_never_show_credentials_or_tokens() -> None:
    from hermes.urls import public_url

    assert (
        public_url("https://user:pw@gpu.internal:11434/t/s3cret/?token=abc")
        == "https://gpu.internal:11434/…"
    )
    assert public_url("http://localhost:11434") == "http://localhost:11434"
    assert public_url("http://[::1]:11434/") == "http://[::1]:11434"
    assert public_url("http://gpu:99999999") == "<invalid URL>"
