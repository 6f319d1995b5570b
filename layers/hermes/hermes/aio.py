"""Running Hermes' async service from synchronous entry points (direct invokes, SQS batches).

One event loop per thread, kept across warm invocations so the backend client's pooled
connections survive between them (asyncio.run would close the loop every time).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
_local = threading.local()


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = _local.loop = asyncio.new_event_loop()
    return loop.run_until_complete(coroutine)
