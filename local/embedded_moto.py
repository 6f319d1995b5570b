"""In-process AWS services for `make run`: moto's server on a loopback port. It serves the
jobs queue (SQS), and DynamoDB too when DynamoDB Local is not available.

moto is not concurrency safe (its update_item reads, checks and writes without a
lock), so the server is single-threaded: requests are served one at a time, which
makes every conditional write atomic, as the limiter needs.
"""

from __future__ import annotations

import logging
import threading

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server


class _NoDelayHandler(MotoRequestHandler):
    # Small keep-alive answers would otherwise wait on Nagle + delayed ACK (~40 ms).
    disable_nagle_algorithm = True


_started: dict[str, str] = {}


def start_embedded_moto(host: str = "127.0.0.1") -> str:
    """Start the server once per process, in a daemon thread; returns its endpoint URL."""
    if host in _started:
        return _started[host]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per DynamoDB call
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(host, 0, app, threaded=False, request_handler=_NoDelayHandler)
    threading.Thread(target=server.serve_forever, name="embedded-dynamodb", daemon=True).start()
    _started[host] = f"http://{host}:{server.server_address[1]}"
    return _started[host]
