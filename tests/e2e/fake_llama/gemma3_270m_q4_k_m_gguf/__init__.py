"""Stand-in for the GGUF package: a tiny file instead of the model."""

from pathlib import Path

MODEL_NAME = "fake-model-for-tests.gguf"


def assemble(target: Path) -> None:
    target.write_bytes(b"GGUF fake")
