"""Running a test's callables in threads of their own without losing their failures: an
assert (or any exception) in a plain `threading.Thread` only prints a
PytestUnhandledThreadExceptionWarning and the test passes. `Background.result()` joins the
thread and raises what it raised, in the test's thread; a thread still running by then is a
failure too, never silently left behind."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """`target(*args)` on a thread named `name` (tests that count per thread need the name),
    started at once."""

    def __init__(self, target: Callable[..., T], *args: Any, name: str | None = None) -> None:
        self._target, self._args = target, args
        self._value: T | None = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._value = self._target(*self._args)
        except BaseException as exc:  # handed to the test's thread by result()
            self._error = exc

    def result(self, timeout_s: float) -> T:
        """Its return value, once it has finished; its exception, re-raised; AssertionError if
        it is still running after `timeout_s` (how long a test may hang, not what it proves)."""
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise AssertionError(f"thread {self.thread.name} still running after {timeout_s:g} s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def results(running: Iterable[Background[T]], timeout_s: float) -> list[T]:
    """Every thread's result, in order; the first failure raised (all are joined first, so no
    thread outlives the test)."""
    running = list(running)
    for each in running:
        each.thread.join(timeout_s)
    return [each.result(0) for each in running]
