"""Async helpers.

`run_sync` runs Hermes' async service from synchronous entry points (direct invokes, SQS
batches): one event loop per thread, kept across warm invocations so the backend client's
pooled connections survive between them (asyncio.run would close the loop every time).

`ClosingWith` makes closing a wrapper generator close what it wraps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
_local = threading.local()


class Closeable(Protocol):
    async def aclose(self) -> None: ...


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = _local.loop = asyncio.new_event_loop()
    return loop.run_until_complete(coroutine)


class ClosingWith(Generic[T]):
    """The items of `outer`, an async generator that reads `inner`; closing this closes
    `inner` too, even if `outer` never started: closing an async generator before its first
    item runs none of its code, `finally` included, so `inner` (a stream holding a model's
    slot) would stay open."""

    def __init__(self, outer: AsyncGenerator[T, None], inner: Closeable) -> None:
        self._outer, self._inner = outer, inner

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await anext(self._outer)

    async def aclose(self) -> None:
        try:
            await self._outer.aclose()
        finally:
            await self._inner.aclose()
