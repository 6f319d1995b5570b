"""One Lambda sandbox, run by tests.support.frozen_sandbox: imports a function's handler as the
Python runtime does and serves its invocations from a Unix socket, one JSON line each way.

    python frozen_sandbox_child.py SOCKET CODE_URI LAYER_DIR HANDLER FUNCTION TIMEOUT_MS MEMORY_MB

Run as a script (not `-m`), so that the repository is not on sys.path: only the function's
code (Lambda's /var/task) and the layer's content (/opt/python) come before site-packages.
After the init phase and after every invocation the process stops itself with SIGSTOP, as
Lambda freezes a sandbox; the parent sends SIGCONT with the next event.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import signal
import socket
import sys
import time
import traceback
import uuid
from typing import Any


class LambdaContext:
    """What the Python runtime hands a handler (the attributes Hermes and powertools read)."""

    def __init__(self, function: str, timeout_ms: int, memory_mb: int) -> None:
        self.function_name = function
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = memory_mb
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function}"
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function}"
        self.log_stream_name = "frozen-sandbox"
        self.identity = None
        self.client_context = None
        self._deadline = time.monotonic() + timeout_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def die_with_parent() -> None:
    """SIGKILL when the test dies: a stopped process never acts on the SIGTERM that
    local.process asks for (it stays pending until a SIGCONT that would never come)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def freeze() -> None:
    """Every thread stops here and now, until the parent's SIGCONT."""
    os.kill(os.getpid(), signal.SIGSTOP)


def main() -> None:
    path, code_uri, layer, handler_name, function, timeout_ms, memory_mb = sys.argv[1:8]
    die_with_parent()
    sys.path[:1] = [code_uri, layer]  # replaces this script's own directory
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(path)
    reader = connection.makefile("rb")

    def send(message: dict[str, Any]) -> None:
        connection.sendall(json.dumps(message).encode() + b"\n")

    module_name, attr = handler_name.rsplit(".", 1)
    try:  # the init phase
        handler = getattr(importlib.import_module(module_name), attr)
    except BaseException:
        send({"init_error": traceback.format_exc()})
        raise
    hermes = sys.modules.get("hermes")
    send({"ready": True, "hermes": getattr(hermes, "__file__", None)})
    freeze()
    for line in reader:
        request = json.loads(line)
        context = LambdaContext(
            function, int(request.get("timeout_ms") or timeout_ms), int(memory_mb)
        )
        try:
            reply = {"result": handler(request["event"], context)}
        except Exception:  # Lambda reports a handler's exception as the invocation's error
            reply = {"error": traceback.format_exc()}
        send(reply)
        freeze()


if __name__ == "__main__":
    main()
