"""The embedded model's server: llama-cpp-python's OpenAI-compatible server, serving
completions and embeddings with one vector per input. The server has no option for
llama.cpp's pooling, and a chat model's GGUF asks for none, so with `--embedding` alone it
would answer a vector per token; here every model it loads mean-pools
(LLAMA_POOLING_TYPE_MEAN) with embeddings on, which leaves completions as they were. Run as a
script (the model server's working directory holds no `local` package), with
llama_cpp.server's own command line: `python local/llama_server.py --model ... --port ...`."""

from __future__ import annotations

import runpy
from typing import Any


def main() -> None:
    import llama_cpp

    if hasattr(llama_cpp, "Llama"):  # (the tests' stand-in llama_cpp has no models)
        load = llama_cpp.Llama.__init__

        def pooled(self: Any, *args: Any, **kwargs: Any) -> None:
            kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
            kwargs["embedding"] = True
            load(self, *args, **kwargs)

        llama_cpp.Llama.__init__ = pooled  # type: ignore[method-assign]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
