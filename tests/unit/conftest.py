from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.ollama_emulator import OllamaEmulator


@pytest.fixture(scope="session")
def emulator() -> Iterator[OllamaEmulator]:
    """One in-thread emulator for the unit tests; each test resets what it changes."""
    with OllamaEmulator() as emu:
        yield emu
