"""The dialect wrappers around a service stream: on success they read it to its end, so the
call ends as answered (outcome ok, the pool told what the host did), not as a client that left
(499 client_disconnected: what closing the stream early means to the service)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from hermes import ollama_api, openai_api


class Stream:
    """A service stream stand-in that records how it ended: read to its end, or closed early."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self._chunks = list(chunks)
        self.exhausted = self.closed_early = False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if not self._chunks:
            self.exhausted = True
            raise StopAsyncIteration
        return self._chunks.pop(0)

    async def aclose(self) -> None:
        self.closed_early = self.closed_early or not self.exhausted


CHAT = [
    {"message": {"role": "assistant", "content": "Hel"}, "done": False},
    {"message": {"role": "assistant", "content": "lo"}, "done": False},
    {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
     "prompt_eval_count": 3, "eval_count": 2},
]  # fmt: skip

WRAPPERS: dict[str, Callable[[Stream], AsyncIterator[bytes]]] = {
    "openai": lambda s: openai_api.sse(s, "gemma", True, True),
    "ollama": lambda s: ollama_api.ndjson(s, "gemma"),
}


@pytest.mark.parametrize("dialect", sorted(WRAPPERS))
def test_a_finished_stream_is_read_to_its_end_not_closed_early(dialect: str) -> None:
    stream = Stream(CHAT)

    async def read() -> bytes:
        return b"".join([part async for part in WRAPPERS[dialect](stream)])

    body = asyncio.run(read())
    assert stream.exhausted and not stream.closed_early
    if dialect == "openai":
        assert body.endswith(b"data: [DONE]\n\n") and b'"finish_reason": "stop"' in body
        assert b'"usage"' in body
