"""Models files for a test: written where the test says, and named by HERMES_MODELS_FILE
for the service in this process (`use_models`), or passed to a runner's environment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from local.template import ROOT

SHIPPED = ROOT / "layers/hermes/hermes/models.json"


def write_models(directory: Path, config: object, name: str = "models.json") -> Path:
    path = directory / name
    path.write_text(json.dumps(config))
    return path


def use_models(monkeypatch: pytest.MonkeyPatch, directory: Path, config: object) -> Path:
    path = write_models(directory, config)
    monkeypatch.setenv("HERMES_MODELS_FILE", str(path))
    return path


def use_shipped_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int, **overrides: dict[str, Any]
) -> None:
    """The shipped models.json with the default host's memory budget and some models' fields
    changed."""
    config = json.loads(SHIPPED.read_text())
    config["hosts"]["default"]["memory_budget"] = budget
    for name, changes in overrides.items():
        config["models"][name].update(changes)
    use_models(monkeypatch, tmp_path, config)
